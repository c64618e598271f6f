"""Every setting Meterline reads, in one place, from `METERLINE_*` environment variables."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="ignore")

    # No URL means the embedded Postgres (pgserver) inside `data_dir`.
    database_url: str | None = None
    admin_token: SecretStr | None = None
    providers: Path | None = None
    data_dir: Path = Path(".meterline")
    redis_url: str | None = None

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    auto_migrate: bool = True
    log_level: str = "info"
    cors_origins: list[str] = Field(default_factory=list)

    db_pool_size: int = 10
    # Ledger writer: a batch leaves memory when it reaches either bound.
    ledger_batch_size: int = 1000
    ledger_flush_interval_s: float = 0.2
    ledger_queue_max: int = 200_000

    # Proxy: upstream timeouts and the body size a client may send.
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 600.0
    upstream_connect_retries: int = 2
    max_request_body_bytes: int = 8 * 1024 * 1024
    key_cache_refresh_s: float = 5.0

    # Outcome-based pricing defaults; accounts may override margin and failed-task policy.
    quote_margin: Decimal = Decimal("0.20")
    quote_confidence: Decimal = Decimal("0.9")
    quote_min_sample: int = 30
    quote_lookback_days: int = 90
    quote_valid_for_s: int = 3600
    task_cost_cap_multiple: Decimal = Decimal("3")

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
