"""Upstream providers: the providers file, and which provider serves which model."""
