"""Token counts of requests and responses, with one offline tokenizer loaded on first use."""
