"""The one way out: every HTTP request the broker sends (token, revocation, installation-token,
webhook) leaves through :func:`send`.

Hosts come from the operator's configuration only; a caller never names one. The URL is parsed
once, by the parser that sends it (``httpx.URL``), and the rules are checked on that parsed URL,
so a check and the request cannot disagree about the host: ``http://127.0.0.1:80@evil.example``
is a request to evil.example with user information, and it is refused, not taken for loopback.

    https://HOST/...                 any host
    http://localhost|127.0.0.1|[::1] loopback only (tests and local fakes): secrets travel in
                                     these requests and must not cross a network in the clear
    user:password@                   never: it hides the host from a reader of the URL

Redirects are never followed: a 3xx would otherwise lead the request (and its secrets) to a
host nobody configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"https": 443, "http": 80}
HTTPS_ONLY = "must be an https:// URL (http:// only for localhost)"


class Refused(ValueError):
    """The URL breaks the egress rules; the message says which (it never echoes the URL)."""


def target(url: str | httpx.URL) -> httpx.URL:
    """``url`` parsed as it will be sent; raises Refused when the rules do not allow it."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise Refused("is not a valid URL") from None
    if parsed.userinfo:
        raise Refused("must not contain user information (user:password@ before the host)")
    if parsed.scheme == "https" and parsed.host:
        return parsed
    if parsed.scheme == "http" and parsed.host in LOOPBACK:
        return parsed
    raise Refused(HTTPS_ONLY)


def problem(url: str) -> str | None:
    """What is wrong with ``url`` as a destination, or None: for validating settings."""
    try:
        target(url)
    except Refused as exc:
        return str(exc)
    return None


def canonical(url: str) -> str | None:
    """One spelling per destination (scheme and host lower case, the default port written
    out), for comparing a URL with a list; None if ``url`` may not be sent to at all."""
    try:
        parsed = target(url)
    except Refused:
        return None
    port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{parsed.scheme}://{host}:{port}{parsed.raw_path.decode('ascii')}"


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
    json: Any = None,
    content: bytes | None = None,
    timeouts: httpx.Timeout | float,
    stream: bool = False,
) -> httpx.Response:
    """Send one request after checking its destination; raises Refused before anything is
    sent, httpx's errors after. With ``stream`` the body is left unread (the caller reads
    it as far as it wants, then closes the response)."""
    request = http.build_request(
        method,
        target(url),
        headers=headers,
        data=data,
        json=json,
        content=content,
        timeout=timeouts,
    )
    return await http.send(request, follow_redirects=False, stream=stream)
