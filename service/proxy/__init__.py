"""The OpenAI-compatible metering proxy: forward, stream, capture usage, record."""
