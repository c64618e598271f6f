"""The providers file (`METERLINE_PROVIDERS`): where each model is forwarded, and how.

```yaml
providers:
  - name: hyperbolic
    base_url: https://api.hyperbolic.xyz/v1
    api_key_env: HYPERBOLIC_API_KEY     # the provider key never leaves the server
    models: ["meta-llama/*", "deepseek-ai/*", "Qwen/*"]   # glob patterns
    stream_usage: inject                # inject | native | none
  - name: infuzu
    base_url: https://chat.infuzu.com/api/v1
    api_key_env: INFUZU_API_KEY
    auth_header: Infuzu-API-Key         # sent as the bare key (default: Authorization: Bearer)
    headers: {X-Client: meterline}      # optional static headers, never a secret
    models: ["infuzu/*"]
    cost_table: costs/infuzu.csv        # optional: what the provider charges the operator
```

`cost_table` names a price table (CSV or YAML, the format of `meterline prices import`;
relative to the providers file) of what the provider charges per model: its versions are
loaded into the provider costs at start-up when not stored yet.

A provider whose `api_key_env` is unset is reported at start-up, and requests for its
models answer 503 `provider_not_configured`: the provider's own 401 would read to a customer
as "your key is bad".

`stream_usage` says how the provider reports usage when streaming:

- `inject`: only when asked with `stream_options.include_usage`; Meterline asks on the
  client's behalf and hides the extra usage chunk from a client that did not ask.
- `native`: whatever was asked, in the last chunk or in every chunk; forwarded as is.
- `none`: never; the provider may even reject `stream_options`, so Meterline strips it
  and estimates the tokens.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from service.ledger.record import has_control_characters

StreamUsage = Literal["inject", "native", "none"]
STREAM_USAGE_MODES: tuple[StreamUsage, ...] = ("inject", "native", "none")


class ProvidersFileError(ValueError):
    """The providers file cannot be used; the message names the provider and the field."""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str  # without a trailing slash, e.g. https://api.example.com/v1
    models: tuple[str, ...]
    stream_usage: StreamUsage
    # Resolved from `api_key_env` at load time. Kept out of repr so it never reaches a log.
    api_key: str | None = None
    api_key_env: str | None = None
    # The header carrying the key: `Authorization` as `Bearer <key>`, any other as the bare key.
    auth_header: str = "Authorization"
    headers: tuple[tuple[str, str], ...] = ()  # static, sent with every request
    # The provider's default cost table (a path), loaded at start-up.
    cost_table: str | None = None

    @property
    def configured(self) -> bool:
        """False when the file names a key variable that is not set: nothing can be sent."""
        return self.api_key_env is None or bool(self.api_key)

    def auth_headers(self) -> dict[str, str]:
        """The static headers and the key, as the provider expects them."""
        headers = dict(self.headers)
        if self.api_key:
            bearer = self.auth_header.lower() == "authorization"
            headers[self.auth_header] = f"Bearer {self.api_key}" if bearer else self.api_key
        return headers

    def __repr__(self) -> str:
        return f"Provider(name={self.name!r}, base_url={self.base_url!r})"

    def url(self, path: str) -> str:
        """`path` is relative to the OpenAI `/v1` root, e.g. `chat/completions`."""
        return f"{self.base_url}/{path}"


def _provider(index: int, raw: Any, environ: dict[str, str]) -> Provider:
    if not isinstance(raw, dict):
        raise ProvidersFileError(f"providers[{index}] must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProvidersFileError(f"providers[{index}].name must be a non-empty string")
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ProvidersFileError(f"provider {name}: base_url must be an http(s) URL")
    models = raw.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise ProvidersFileError(f"provider {name}: models must be a list of patterns")
    mode = raw.get("stream_usage", "native")
    if mode not in STREAM_USAGE_MODES:
        raise ProvidersFileError(
            f"provider {name}: stream_usage must be one of {', '.join(STREAM_USAGE_MODES)}"
        )
    key_env = raw.get("api_key_env")
    if key_env is not None and not isinstance(key_env, str):
        raise ProvidersFileError(f"provider {name}: api_key_env must be a variable name")
    if "api_key" in raw:
        # A key written in the file would end up in backups and repositories.
        raise ProvidersFileError(f"provider {name}: use api_key_env, not api_key")
    cost_table = raw.get("cost_table")
    if cost_table is not None and (not isinstance(cost_table, str) or not cost_table):
        raise ProvidersFileError(f"provider {name}: cost_table must be a file path")
    auth_header = raw.get("auth_header", "Authorization")
    if not isinstance(auth_header, str) or not _HEADER_NAME.fullmatch(auth_header):
        raise ProvidersFileError(f"provider {name}: auth_header must be a header name")
    return Provider(
        name=name,
        base_url=base_url.rstrip("/"),
        models=tuple(models),
        stream_usage=cast(StreamUsage, mode),
        api_key=environ.get(key_env) if key_env else None,
        api_key_env=key_env,
        auth_header=auth_header,
        headers=_static_headers(name, raw.get("headers", {}), auth_header),
        cost_table=cost_table,
    )


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# Set by the proxy itself for every request: a static header must not override them.
_PROXY_HEADERS = frozenset({"content-type", "accept", "accept-encoding", "content-length", "host"})


def _static_headers(name: str, raw: Any, auth_header: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ProvidersFileError(f"provider {name}: headers must be a mapping of name: value")
    headers = []
    for header, value in raw.items():
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
            raise ProvidersFileError(f"provider {name}: headers: {header!r} is not a header name")
        if not isinstance(value, str) or has_control_characters(value):
            raise ProvidersFileError(f"provider {name}: headers.{header} must be one line of text")
        lowered = header.lower()
        if lowered in _PROXY_HEADERS or lowered in {auth_header.lower(), "authorization"}:
            # The key comes from api_key_env only, so it never sits in the file.
            raise ProvidersFileError(f"provider {name}: headers.{header} is set by Meterline")
        headers.append((header, value))
    return tuple(headers)


def parse_providers(text: str, environ: dict[str, str] | None = None) -> list[Provider]:
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or not isinstance(data.get("providers", []), list):
        raise ProvidersFileError("the providers file must hold a `providers:` list")
    env = dict(os.environ) if environ is None else environ
    providers = [_provider(i, raw, env) for i, raw in enumerate(data.get("providers") or [])]
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise ProvidersFileError("provider names must be unique")
    return providers


def load_providers(path: Path | None) -> list[Provider]:
    """The providers of the file at `path`; none when no file is configured."""
    if path is None:
        return []
    providers = parse_providers(Path(path).read_text())
    # A cost table's path is relative to the providers file.
    return [
        replace(p, cost_table=str(Path(path).parent / p.cost_table)) if p.cost_table else p
        for p in providers
    ]
