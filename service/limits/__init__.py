"""Rate limits and monthly budgets, enforced by the proxy before a request is forwarded.

Counters live in Redis when `METERLINE_REDIS_URL` is set (shared by every worker and
replica, updated by atomic Lua scripts) and in the process otherwise.
"""
