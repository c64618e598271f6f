"""Signed webhooks (Standard Webhooks) of business events, from a durable outbox."""
