"""The block `meterline serve` prints as it starts: what it runs with, and what looks wrong.

Every line comes from the settings and the providers file; no secret is printed (URLs lose
their passwords, the admin token and provider keys are only said to be set or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from service.providers.config import Provider
from service.settings import Settings


@dataclass(frozen=True)
class Serving:
    """How this `serve` runs: where it listens and which database it uses."""

    host: str
    port: int
    workers: int
    database_url: str
    embedded_pgdata: Path | None  # the embedded Postgres' folder; None for a server's URL


def meterline_version() -> str:
    try:
        return version("meterline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def without_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unreadable URL)"


def _limits_apply(settings: Settings) -> bool:
    tiers = (
        settings.tier_basic_rpm,
        settings.tier_basic_tpm,
        settings.tier_pro_rpm,
        settings.tier_pro_tpm,
        settings.tier_custom_rpm,
        settings.tier_custom_tpm,
    )
    return any(limit is not None for limit in tiers)


def startup_warnings(
    settings: Settings, serving: Serving, providers: list[Provider], environ: dict[str, str]
) -> list[str]:
    """What an operator should fix, each saying what a customer would otherwise meet."""
    warnings = []
    if settings.providers is None:
        warnings.append(
            "no providers file (METERLINE_PROVIDERS): every model answers 404 model_not_found"
        )
    for provider in providers:
        if provider.api_key_env and not environ.get(provider.api_key_env):
            warnings.append(
                f"provider {provider.name}: {provider.api_key_env} is not set, so requests for"
                " its models answer 503 provider_not_configured until it is"
            )
    if settings.admin_token is None:
        warnings.append(
            "no admin token (METERLINE_ADMIN_TOKEN): nobody can create accounts or keys,"
            " and the billing API and console accept customer keys only"
        )
    if serving.workers > 1 and not settings.redis_url and _limits_apply(settings):
        warnings.append(
            f"{serving.workers} workers without METERLINE_REDIS_URL: each worker counts rate"
            " limits and budgets for itself, so together they admit up to"
            f" {serving.workers} times each limit"
        )
    return warnings


def _database_line(serving: Serving) -> str:
    if serving.embedded_pgdata is not None:
        return f"embedded Postgres in {serving.embedded_pgdata}"
    return f"Postgres at {without_password(serving.database_url)}"


def _redis_line(settings: Settings) -> str:
    if not settings.redis_url:
        return "none: rate limits and budgets are counted in each worker"
    return (
        f"{without_password(settings.redis_url)} (prefix {settings.redis_prefix}):"
        " limits shared by every worker and replica"
    )


def _provider_lines(settings: Settings, providers: list[Provider]) -> list[str]:
    if settings.providers is None:
        return ["  providers   none"]
    lines = [f"  providers   {settings.providers}"]
    for provider in providers:
        key = f", key from {provider.api_key_env}" if provider.api_key_env else ""
        lines.append(
            f"    {provider.name}: {provider.base_url} (stream usage {provider.stream_usage}"
            f"{key}) models {', '.join(provider.models)}"
        )
    return lines


def startup_summary(
    settings: Settings, serving: Serving, providers: list[Provider], environ: dict[str, str]
) -> str:
    """The whole block, ending with its warnings (if any)."""
    lines = [
        f"Meterline {meterline_version()}",
        f"  listening   http://{serving.host}:{serving.port} (OpenAI API under /v1, billing"
        " API under /billing, console at /console)",
        f"  database    {_database_line(serving)}"
        + ("" if settings.auto_migrate else " (migrations not applied at start)"),
        *_provider_lines(settings, providers),
        f"  redis       {_redis_line(settings)}",
        f"  workers     {serving.workers}",
        f"  data dir    {settings.data_dir.resolve()} (spool and journal of this replica)",
        f"  admin       {'token set' if settings.admin_token is not None else 'none'}",
        f"  access log  {'on' if settings.access_log else 'off'} (METERLINE_ACCESS_LOG)",
    ]
    lines += [
        f"  warning: {warning}"
        for warning in startup_warnings(settings, serving, providers, environ)
    ]
    return "\n".join(lines)
