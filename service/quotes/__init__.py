"""Fixed-price task quotes, learned from the history of completed tasks."""
