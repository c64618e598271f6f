"""The margin report: what quoted tasks and token usage earned against what they cost."""
