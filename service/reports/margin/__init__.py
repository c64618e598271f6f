"""The margin report: fixed-price revenue against actual token cost."""
