"""Every setting Meterline reads, in one place, from `METERLINE_*` environment variables."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """The user's data directory (XDG): one for every command, from whatever folder it runs,
    so `meterline invoices …` finds the embedded Postgres `meterline serve` made."""
    # The XDG spec ignores a relative XDG_DATA_HOME, as it would move with the folder.
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "meterline"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="ignore")

    # No URL means the embedded Postgres (pgserver) inside `data_dir`.
    database_url: str | None = None
    admin_token: SecretStr | None = None
    providers: Path | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    redis_url: str | None = None

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    auto_migrate: bool = True
    log_level: str = "info"
    # One key=value line per proxied request on stderr (service/proxy/access.py).
    access_log: bool = True
    cors_origins: list[str] = Field(default_factory=list)

    db_pool_size: int = 10
    # Ledger writer: a batch leaves memory when it reaches either bound. A batch is kept
    # small because Postgres spends ~16 µs of CPU per row storing it, in one burst that
    # takes a core from the proxy: at 8 connections on 2 cores, batches of 1,000 (16 ms
    # bursts) added 3.4-4.4 ms at p99, batches of 100 2.5-2.9 ms (`python -m bench proxy`,
    # alternated); Postgres then spends ~15 % more CPU per row, still ≥ 64,000 rows/s.
    ledger_batch_size: int = 100
    ledger_flush_interval_s: float = 0.2
    ledger_queue_max: int = 200_000

    # Proxy: upstream timeouts and the body size a client may send.
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 600.0
    upstream_connect_retries: int = 2
    max_request_body_bytes: int = 8 * 1024 * 1024
    # A client has this long to send its whole body once it has started (a slow or stalled
    # body holds a connection and its buffers): past it, 408.
    client_body_timeout_s: float = 30.0
    # Bounds of one streamed answer. `upstream_read_timeout_s` is already the longest gap
    # between two pieces; these cap its whole duration and the bytes of one line, so a
    # provider that never sends a newline cannot grow a worker's memory. Both are far past
    # any healthy generation (a line is one event; the largest are a few kilobytes).
    stream_max_duration_s: float = 2 * 3600.0
    stream_max_line_bytes: int = 4 * 1024 * 1024
    # Routing (service/routing): attempts per request across the providers of its
    # candidates (a failed attempt is retried elsewhere only before the client got a byte),
    # and no new attempt once the request is this old.
    routing_max_attempts: int = Field(default=3, ge=1, le=9)
    routing_deadline_s: float = Field(default=60.0, gt=0)
    # A provider failing this many times in a row is passed over for `routing_cooldown_s`,
    # then tried again (one request probes it; a success ends the cooldown).
    routing_cooldown_failures: int = Field(default=3, ge=1)
    routing_cooldown_s: float = Field(default=30.0, ge=0)
    # How often a worker publishes its routing statistics to Redis and reads the others'.
    routing_stats_sync_s: float = Field(default=0.25, gt=0)
    key_cache_refresh_s: float = 5.0
    # Headers a client may carry its Meterline key in besides `Authorization: Bearer`, so a
    # client written for a provider that reads its own header migrates by base URL alone.
    key_headers: list[str] = Field(
        default_factory=lambda: ["X-API-Key", "Infuzu-API-Key", "X-Infuzu-API-Key"]
    )

    # Outcome-based pricing defaults; accounts may override margin and failed-task policy.
    quote_margin: Decimal = Decimal("0.20")
    quote_confidence: Decimal = Decimal("0.9")
    quote_min_sample: int = 30
    quote_lookback_days: int = 90
    quote_valid_for_s: int = 3600
    task_cost_cap_multiple: Decimal = Decimal("3")
    # How often each process reloads open quoted tasks' costs and newly closed tasks (the
    # proxy refuses closed or capped tasks from memory), and how long after completion a
    # task's history cost is still settled from late ledger rows.
    task_guard_refresh_s: float = 2.0
    task_settle_window_s: float = 600.0
    # An open quoted task expires this long after its quote was accepted (then billed by
    # the account's expired_task_policy); how often the background job looks (0: never;
    # invoices expire the tasks past their deadline anyway).
    task_expiry_s: float = 7 * 24 * 3600.0
    task_expiry_interval_s: float = 60.0
    # Invoices: how often newly recorded usage is folded into the rollup (0: never).
    usage_rollup_interval_s: float = 60.0
    # How long finalizing waits for a ledger write begun before the month ended to commit.
    invoice_finalize_wait_s: float = 5.0

    # Limits. Per-minute tier defaults (None = unlimited); an account's or key's own
    # rate_limit_rpm / rate_limit_tpm overrides them.
    tier_basic_rpm: int | None = 60
    tier_basic_tpm: int | None = None
    tier_pro_rpm: int | None = 600
    tier_pro_tpm: int | None = None
    tier_custom_rpm: int | None = None
    tier_custom_tpm: int | None = None
    # A basic account whose purchased credits reach this moves to pro (Hyperbolic's rule).
    pro_tier_min_deposit_usd: Decimal = Field(default=Decimal(5), ge=0)
    # A budget reservation assumes this many completion tokens when a request sets no max_tokens.
    budget_default_completion_tokens: int = 4096
    # Budget counters are raised to the ledger's monthly sum this often (catches spend of
    # other processes without Redis, and a Redis that lost its data).
    budget_resync_s: float = 60.0
    # A reservation never settled (its process died) stops holding budget after this long.
    budget_reservation_ttl_s: float = 3600.0
    # Namespace of every Redis key, so several deployments (or test runs) can share a Redis.
    redis_prefix: str = "meterline:"

    # Webhooks (service/webhooks). URLs resolving to loopback or private addresses are
    # refused unless this is set (receivers on the operator's own network, tests).
    webhooks_allow_private: bool = False
    # A failed delivery is retried after base * 2^(attempt - 1) seconds, each delay at most
    # the max, until the window after its event was raised has passed.
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_max_delay_s: float = Field(default=4 * 3600.0, gt=0)
    webhook_retry_window_s: float = Field(default=24 * 3600.0, gt=0)
    # One attempt's bound, connection included.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    # How often each process's sender looks for due deliveries (besides being woken by
    # NOTIFY as events are raised); 0 runs no sender in this process.
    webhook_poll_interval_s: float = Field(default=1.0, ge=0)

    # The web console: how long a sign-in lasts (the cookie and the stored session).
    console_session_ttl_s: int = Field(default=12 * 3600, ge=60)
    # Who issues the invoices, as printed on every invoice PDF.
    invoice_issuer_name: str | None = None
    invoice_issuer_address: list[str] = Field(default_factory=list)
    invoice_issuer_tax_id: str | None = None

    @field_validator("key_headers")
    @classmethod
    def _key_headers_are_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                raise ValueError(f"{name!r} is not a header name")
            if name.lower() == "authorization":
                raise ValueError("Authorization is always read (as Bearer); do not list it")
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _blank_admin_token_disables_admin(cls, value: Any) -> Any:
        # `METERLINE_ADMIN_TOKEN=` must not make an empty credential the administrator.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(text, str) and not text.strip() else value

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
