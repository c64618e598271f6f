"""`meterline accounts …` and `meterline keys …`: the billing API from the command line
(API clients: `service/commands/api.py`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

import typer

from service.commands.api import BillingClient, TokenOption, UrlOption
from service.commands.output import (
    JsonOption,
    err,
    fail,
    print_json,
    print_record,
    print_result,
)

accounts_app = typer.Typer(help="Customer accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of accounts.", no_args_is_help=True)

ACCOUNT_COLUMNS = [
    "id",
    "name",
    "tier",
    "monthly_budget_usd",
    "low_balance_threshold_usd",
    "quote_margin",
    "failed_task_policy",
    "customer_reported_outcomes",
    "expired_task_policy",
    "rate_limit_rpm",
    "rate_limit_tpm",
    "created_at",
]
LIST_COLUMNS = ["id", "name", "tier", "monthly_budget_usd", "created_at"]
KEY_COLUMNS = ["id", "name", "prefix", "status", "created_at", "last_used_at", "expires_at"]
KEY_LIMIT_COLUMNS = ["rate_limit_rpm", "rate_limit_tpm", "monthly_budget_usd"]

# The account's settings, as options of `accounts create` and `accounts update` alike:
# each parameter is named after the API field it sets.
ACCOUNT_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
    for name, option in {
        "tier": Annotated[str | None, typer.Option(help="basic | pro | custom.")],
        "monthly_budget_usd": Annotated[
            Decimal | None, typer.Option("--budget", help="Monthly budget, USD.")
        ],
        "low_balance_threshold_usd": Annotated[
            Decimal | None,
            typer.Option(
                "--low-balance-threshold",
                help="USD: a prepaid balance below it raises one credits.low event.",
            ),
        ],
        "quote_margin": Annotated[Decimal | None, typer.Option(help="Quote margin (0.2 = 20 %).")],
        "failed_task_policy": Annotated[
            str | None, typer.Option(help="free | cost: billing of failed tasks.")
        ],
        "customer_reported_outcomes": Annotated[
            bool | None,
            typer.Option(
                "--customer-reported-outcomes/--operator-reported-outcomes",
                help="Whether the account's keys may report task outcomes"
                " (a new account: only the admin may).",
                show_default=False,
            ),
        ],
        "expired_task_policy": Annotated[
            str | None,
            typer.Option(
                help="fixed_price | cost | free: billing of quoted tasks that expired open."
            ),
        ],
        "rate_limit_rpm": Annotated[
            int | None, typer.Option("--rpm", help="Requests per minute limit.")
        ],
        "rate_limit_tpm": Annotated[
            int | None, typer.Option("--tpm", help="Tokens per minute limit.")
        ],
    }.items()
]


class Clearable(StrEnum):
    """The optional settings `accounts update --clear` sets back to none, by option name."""

    budget = "budget"
    low_balance_threshold = "low-balance-threshold"
    quote_margin = "quote-margin"
    rpm = "rpm"
    tpm = "tpm"

    @property
    def field(self) -> str:
        return {
            "budget": "monthly_budget_usd",
            "low-balance-threshold": "low_balance_threshold_usd",
            "quote-margin": "quote_margin",
            "rpm": "rate_limit_rpm",
            "tpm": "rate_limit_tpm",
        }[self.value]


def with_account_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the account's options, before `--url`; it takes them as **fields."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    at = next(i for i, p in enumerate(own) if p.name == "url")
    parameters = [*own[:at], *ACCOUNT_OPTIONS, *own[at:]]
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return command


def _fields(**values: Any) -> dict[str, Any]:
    """The options given, as JSON fields (money as strings, never floats)."""
    return {
        name: str(value) if isinstance(value, Decimal) else value
        for name, value in values.items()
        if value is not None
    }


@accounts_app.command("create")
@with_account_options
def create_account(
    name: Annotated[str, typer.Argument(help="The account's name.")],
    *,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
    **fields: Any,
) -> None:
    """Create an account (admin)."""
    with BillingClient(url, token) as client:
        account = client.request("POST", "/billing/accounts", json=_fields(name=name, **fields))
    print_result(account, as_json)


@accounts_app.command("list")
def list_accounts(
    url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """List every account (admin)."""
    with BillingClient(url, token) as client:
        accounts = list(client.pages("/billing/accounts", {"limit": 200}))
    print_result(accounts, as_json, LIST_COLUMNS, f"{len(accounts)} accounts")


@accounts_app.command("show")
def show_account(
    account_id: str,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one account."""
    with BillingClient(url, token) as client:
        print_result(client.request("GET", f"/billing/accounts/{account_id}"), as_json)


@accounts_app.command("update")
@with_account_options
def update_account(
    account_id: str,
    *,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    clear: Annotated[
        list[Clearable] | None,
        typer.Option(help="Set this back to none (repeatable).", show_default=False),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
    **fields: Any,
) -> None:
    """Change the fields given (admin)."""
    body = _fields(name=name, **fields)
    for option in clear or []:
        if option.field in body:
            fail(f"--{option.value} and --clear {option.value} contradict each other")
        body[option.field] = None  # the API's way to clear a field: null
    with BillingClient(url, token) as client:
        account = client.request("PATCH", f"/billing/accounts/{account_id}", json=body)
    print_result(account, as_json)


@keys_app.command("create")
def create_key(
    account_id: str,
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    expires_at: Annotated[
        datetime | None, typer.Option(help="When the key stops working (UTC unless an offset).")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key (admin). The key is printed once; store it now."""
    body = _fields(name=name, expires_at=expires_at.isoformat() if expires_at else None)
    with BillingClient(url, token) as client:
        key = client.request("POST", f"/billing/accounts/{account_id}/keys", json=body)
    if as_json:
        print_json(key)
        return
    print_record(key, [*KEY_COLUMNS, "account_id"])
    typer.echo(key["key"])
    err.print("This is the only time the key is shown.", style="yellow")


class KeyClearable(StrEnum):
    """The settings `keys update --clear` sets back to none, by option name."""

    label = "name"
    budget = "budget"
    rpm = "rpm"
    tpm = "tpm"
    expires_at = "expires-at"

    @property
    def field(self) -> str:
        return {
            "name": "name",
            "budget": "monthly_budget_usd",
            "rpm": "rate_limit_rpm",
            "tpm": "rate_limit_tpm",
            "expires-at": "expires_at",
        }[self.value]


@keys_app.command("update")
def update_key(
    key_id: str,
    name: Annotated[str | None, typer.Option(help="A new label.")] = None,
    rate_limit_rpm: Annotated[
        int | None, typer.Option("--rpm", help="The key's requests per minute.")
    ] = None,
    rate_limit_tpm: Annotated[
        int | None, typer.Option("--tpm", help="The key's tokens per minute.")
    ] = None,
    monthly_budget_usd: Annotated[
        Decimal | None, typer.Option("--budget", help="The key's monthly budget, USD.")
    ] = None,
    expires_at: Annotated[
        datetime | None, typer.Option(help="When the key stops working (UTC unless an offset).")
    ] = None,
    clear: Annotated[
        list[KeyClearable] | None,
        typer.Option(help="Set this back to none (repeatable).", show_default=False),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a key's settings given (admin); the proxy applies them within seconds."""
    body = _fields(
        name=name,
        rate_limit_rpm=rate_limit_rpm,
        rate_limit_tpm=rate_limit_tpm,
        monthly_budget_usd=monthly_budget_usd,
        expires_at=expires_at.isoformat() if expires_at else None,
    )
    for option in clear or []:
        if option.field in body:
            fail(f"--{option.value} and --clear {option.value} contradict each other")
        body[option.field] = None  # the API's way to clear a field: null
    with BillingClient(url, token) as client:
        key = client.request("PATCH", f"/billing/keys/{key_id}", json=body)
    print_result(key, as_json, [*KEY_COLUMNS, *KEY_LIMIT_COLUMNS])


@keys_app.command("list")
def list_keys(
    account_id: str,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List an account's keys (revoked and expired included)."""
    with BillingClient(url, token) as client:
        keys = list(client.pages(f"/billing/accounts/{account_id}/keys", {"limit": 200}))
    print_result(keys, as_json, KEY_COLUMNS, f"{len(keys)} keys")


@keys_app.command("revoke")
def revoke_key(
    key_id: str,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a key (admin); the proxy refuses it at once. Revoking twice is harmless."""
    with BillingClient(url, token) as client:
        key = client.request("DELETE", f"/billing/keys/{key_id}")
    print_result(key, as_json, [*KEY_COLUMNS[:4], "revoked_at"])
