"""Where a webhook may be sent: a public http(s) address, never this host's or a private
network's (a webhook URL must not let a caller reach what only the server can).

A URL is checked when an endpoint is created or changed and again at every delivery, after
resolving its host (DNS may change); the delivery's connection goes only to an address that
passed, through the resolver of `http.py`, so a name that resolves to a public address for the
check and a private one for the connection is still refused. Tests, and operators whose
receivers live on their own network, set `METERLINE_WEBHOOKS_ALLOW_PRIVATE`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


class UnsafeDestination(Exception):
    """The URL is not one webhooks are sent to; the message says why."""


def is_forbidden(address: str) -> bool:
    """Whether webhooks must not connect to `address` (an IP address, as text)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def parse(url: str) -> tuple[str, int]:
    """The host and port of a webhook URL (http or https, a host, no credentials)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeDestination("the URL must be http:// or https://")
    if not parts.hostname:
        raise UnsafeDestination("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeDestination("the URL must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeDestination("the URL's port is invalid") from exc
    return parts.hostname, port


async def _addresses(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnsafeDestination(f"the host {host!r} does not resolve") from exc
    return [str(info[4][0]) for info in infos]


async def check(url: str, allow_private: bool) -> None:
    """Refuse a URL that is malformed, or whose host resolves to a non-public address."""
    host, port = parse(url)
    if allow_private:
        return
    addresses = await _addresses(host, port)
    if not addresses or any(is_forbidden(a) for a in addresses):
        raise UnsafeDestination(
            f"the host {host!r} resolves to a loopback, private or reserved address"
        )
