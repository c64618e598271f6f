"""Tasks: units of customer work that span many requests, quoted or metered per token."""
