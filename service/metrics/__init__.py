"""`GET /metrics` in Prometheus' text format, summed over every worker of `meterline serve`."""
