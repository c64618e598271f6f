"""An OpenAI-compatible fake provider with deterministic usage (tests, benchmarks, demo)."""
