"""The usage ledger's write path: in-memory queue, batched idempotent inserts, durable spool."""
