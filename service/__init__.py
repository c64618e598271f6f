"""Meterline: the imperative shell around the pure `pricing` core."""
