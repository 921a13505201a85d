"""Proxy: the broker calls a provider's API with an integration's credential, so the token
never leaves the broker.

A request names the integration (as GetAccessToken does, under the same policy and grant) and
a path relative to the provider's API base, which only the operator configures. The path is
checked as text (every decoding of it) and the URL built from it is checked again as parsed by
the parser that sends it, so nothing a caller writes can move the request to another host or
above the base. The credential is made valid first (the service's normal serve, single-flight
refresh included); a 401 gets one forced refresh and one replay. Redirects are returned, not
followed. Bodies are capped both ways, the answer is read as a stream and abandoned past its
cap, and each provider's proxied requests share a concurrency lane of the refresh throttle.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import unquote

import httpx

from broker import egress, metrics
from broker.config import ProxySettings
from broker.domain import context
from broker.errors import (
    InvalidArgument,
    PermissionDenied,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
    ProxyNotConfigured,
    ProxyRequestTooLarge,
    ProxyResponseTooLarge,
    Throttled,
)
from broker.model import AccessToken, Selector, StoredIntegration, TokenRequest
from broker.providers.profile import ProviderProfile
from broker.providers.throttle import ProviderThrottle

_METHOD = re.compile(r"[A-Z]{1,16}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
MAX_PATH = 2048
MAX_HEADERS = 64
MAX_QUERY = 256
MAX_FIELD = 8 * 1024
# Caller headers that would carry or replace credentials, or move the request elsewhere.
_REFUSED = frozenset({"authorization", "cookie", "host"})
# Hop-by-hop (RFC 9110 §7.6.1) and framing headers: meaningless across the broker, dropped.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# Not returned: cookies belong to the broker's connection, not the caller; the body comes back
# decoded, so its encoding and length headers would lie.
_DROPPED_RESPONSE = _HOP_BY_HOP | {
    "set-cookie",
    "set-cookie2",
    "content-encoding",
    "proxy-authenticate",
    "proxy-authorization",
}
_WAIT_STATUSES = (429, 503)
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProxyCall:
    selector: Selector
    method: str
    path: str
    query: Sequence[tuple[str, str]] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    api_host: str = ""
    # Seconds the caller will still wait (its deadline); None: no deadline.
    deadline_seconds: float | None = None
    # The provider the caller named besides an integration id (the HTTP front's URL): the
    # integration must be of it.
    expected_provider: str = ""


@dataclass(frozen=True, slots=True)
class ProxyResult:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)
    refreshed: bool
    # The provider's Retry-After on a 429/503, in seconds.
    retry_after: float | None = None


class Serving(Protocol):
    """The integration service's read and serve (``broker.domain.integrations``)."""

    def canonical(self, provider: str) -> str: ...

    async def read(self, sel: Selector) -> StoredIntegration: ...

    async def serve(self, stored: StoredIntegration, req: TokenRequest) -> AccessToken: ...


class Profiles(Protocol):
    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> ProviderProfile: ...


class ProxyService:
    def __init__(
        self,
        service: Serving,
        profiles: Profiles,
        builtins: Mapping[str, ProviderProfile],
        http: httpx.AsyncClient,
        throttle: ProviderThrottle,
        settings: ProxySettings,
    ) -> None:
        self.service = service
        self.profiles = profiles
        self.builtins = builtins
        self.http = http
        self.throttle = throttle
        self.settings = settings

    async def call(self, req: ProxyCall) -> ProxyResult:
        started = time.perf_counter()
        method = _method(req.method)
        path = relative_path(req.path)
        headers = _request_headers(req.headers)
        query = _query(req.query)
        limit = self.settings.max_request_bytes
        if len(req.body) > limit:
            metrics.PROXY_TOO_LARGE.labels("request").inc()
            raise ProxyRequestTooLarge(
                f"the request body has {len(req.body)} bytes; proxy.max_request_bytes is "
                f"{limit}; nothing was sent",
                "proxy.max_request_bytes",
                limit,
            )
        stored = await self.service.read(req.selector)
        provider = stored.integration.provider
        if req.expected_provider and self.service.canonical(req.expected_provider) != provider:
            raise InvalidArgument(
                "provider",
                f"integration {stored.integration.id} is not a {req.expected_provider!r} one",
            )
        base = self._base(provider, req.api_host, stored.integration.metadata)
        url = build_url(base, path, query)
        token_request = TokenRequest(selector=req.selector, deadline_seconds=req.deadline_seconds)
        token = await self.service.serve(stored, token_request)
        _check_credential_clash(headers, query, token)
        refreshed = token.refreshed
        response = await self._send(provider, method, url, headers, req.body, token, req)
        if response.status == 401 and stored.renewable:
            # The provider refused a token we believed valid (revoked, rotated elsewhere):
            # one forced refresh and one replay, never more.
            metrics.PROXY_REPLAYS.labels(provider).inc()
            current = await self.service.read(req.selector)
            token = await self.service.serve(
                current,
                TokenRequest(
                    selector=req.selector,
                    force_refresh=True,
                    deadline_seconds=_left(req.deadline_seconds, started),
                ),
            )
            refreshed = True
            response = await self._send(provider, method, url, headers, req.body, token, req)
        retry_after = None
        if response.status in _WAIT_STATUSES:
            retry_after = _retry_after(response.headers.get("retry-after"))
            if retry_after is not None:
                # The provider asked this broker to wait: its other proxied calls wait too.
                self.throttle.pause(_lane(provider), retry_after)
        _note(
            method,
            url,
            path,
            response.status,
            len(req.body),
            len(response.body),
            time.perf_counter() - started,
        )
        return ProxyResult(
            status=response.status,
            headers=response.headers,
            body=response.body,
            refreshed=refreshed,
            retry_after=retry_after,
        )

    def _base(self, provider: str, api_host: str, metadata: Mapping[str, object]) -> str:
        if provider in self.profiles:
            profile: ProviderProfile | None = self.profiles.get(provider)
        else:
            profile = self.builtins.get(provider)
        if profile is not None:
            # An API host templated per integration ({subdomain}.zendesk.com): the value is
            # one DNS label under the provider's own domain, never a host of the caller's.
            profile = profile.resolved(metadata)
        base = profile.api_base_url if profile is not None else None
        if api_host:
            hosts = profile.api_hosts if profile is not None else ()
            for candidate in hosts:
                if httpx.URL(candidate).host == api_host.lower():
                    return candidate
            raise InvalidArgument(
                "api_host",
                f"is not one of provider {provider!r}'s API hosts (providers.{provider}.api_hosts)",
            )
        if not base:
            raise ProxyNotConfigured(
                f"provider {provider!r} has no API base: set providers.{provider}.api_base_url "
                "to proxy its API",
                provider=provider,
            )
        return base

    async def _send(
        self,
        provider: str,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        body: bytes,
        token: AccessToken,
        req: ProxyCall,
    ) -> _Answer:
        send_headers = {**headers, **token.headers}
        if token.query:
            url = url.copy_merge_params(token.query)
        budget = self.settings.timeout_seconds
        if req.deadline_seconds is not None:
            budget = max(0.001, min(budget, req.deadline_seconds))
        loop = asyncio.get_running_loop()
        until = loop.time() + budget
        try:
            async with self.throttle.turn(
                _lane(provider), until, max_concurrent=self.settings.max_concurrent_per_provider
            ):
                try:
                    async with asyncio.timeout_at(until):
                        response = await egress.send(
                            self.http,
                            method,
                            url,
                            headers=send_headers,
                            content=body or None,
                            timeouts=httpx.Timeout(budget),
                            stream=True,
                        )
                        try:
                            return await self._read(provider, response)
                        finally:
                            await response.aclose()
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    metrics.PROXY_REQUESTS.labels(provider, "unreachable").inc()
                    raise ProviderUnavailable(
                        f"provider {provider!r}'s API cannot be reached; nothing was sent",
                        provider=provider,
                    ) from None
                except (TimeoutError, httpx.TimeoutException):
                    metrics.PROXY_REQUESTS.labels(provider, "timeout").inc()
                    raise ProviderOutcomeUnknown(
                        f"provider {provider!r}'s API did not answer within {budget:.1f}s "
                        "(proxy.timeout_seconds or the call's deadline); the request may have been "
                        "processed",
                        provider=provider,
                    ) from None
                except httpx.HTTPError:
                    metrics.PROXY_REQUESTS.labels(provider, "error").inc()
                    raise ProviderOutcomeUnknown(
                        f"the connection to provider {provider!r}'s API failed before its answer "
                        "was complete; the request may have been processed",
                        provider=provider,
                    ) from None
        except Throttled:
            # Not sent: the provider's lane is full or paused (its Retry-After) past the
            # call's budget.
            metrics.PROXY_REQUESTS.labels(provider, "throttled").inc()
            raise

    async def _read(self, provider: str, response: httpx.Response) -> _Answer:
        limit = self.settings.max_response_bytes
        declared = response.headers.get("content-length", "")
        if (
            declared.isdigit()
            and int(declared) > limit
            and "content-encoding" not in (response.headers)
        ):
            self._too_large(provider, limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes(_CHUNK):
            size += len(chunk)
            if size > limit:
                # Stop reading: the rest is never buffered.
                self._too_large(provider, limit)
            chunks.append(chunk)
        metrics.PROXY_REQUESTS.labels(provider, f"{response.status_code // 100}xx").inc()
        return _Answer(response.status_code, response_headers(response.headers), b"".join(chunks))

    def _too_large(self, provider: str, limit: int) -> None:
        metrics.PROXY_TOO_LARGE.labels("response").inc()
        metrics.PROXY_REQUESTS.labels(provider, "too_large").inc()
        raise ProxyResponseTooLarge(
            f"provider {provider!r}'s answer is larger than proxy.max_response_bytes ({limit})",
            "proxy.max_response_bytes",
            limit,
        )


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)


def _lane(provider: str) -> str:
    # A lane of its own in the refresh throttle: API traffic cannot take the slots of the
    # refreshes it depends on, and a provider's Retry-After holds back its proxied calls.
    return f"{provider} (proxy)"


def _left(deadline: float | None, started: float) -> float | None:
    return None if deadline is None else max(0.0, deadline - (time.perf_counter() - started))


# -- the request, checked ---------------------------------------------------------------------


def _method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise InvalidArgument("method", "must be an HTTP method in upper case, e.g. GET or POST")
    call = context.current_call.get()
    allowed = call.caller.proxy_methods if call is not None else None
    if allowed is not None and value not in allowed:
        assert call is not None
        raise PermissionDenied(
            f"caller {call.caller.name!r} may not send {value} requests through Proxy "
            f"(callers.{call.caller.name}.proxy_methods)"
        )
    return value


def _bad_text(value: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


def relative_path(path: str) -> str:
    """``path`` if it stays under the API base whatever decodes it; INVALID_ARGUMENT (field
    ``path``) otherwise. Checked on every percent-decoding of it (a server or a framework
    behind the provider's edge may decode twice)."""
    if not path:
        raise InvalidArgument("path", "is required (relative to the provider's API base)")
    if len(path) > MAX_PATH:
        raise InvalidArgument("path", f"is longer than {MAX_PATH} characters")
    if not path.startswith("/"):
        raise InvalidArgument("path", "must start with '/' (it is relative to the API base)")
    seen = path
    for _depth in range(4):
        _check_path_text(seen)
        decoded = unquote(seen)
        if decoded == seen:
            break
        seen = decoded
    else:
        raise InvalidArgument("path", "is percent-encoded too many times over")
    return path


def _check_path_text(text: str) -> None:
    if _bad_text(text):
        raise InvalidArgument("path", "must not contain control characters")
    if "\\" in text:
        raise InvalidArgument("path", "must not contain backslashes")
    if "@" in text:
        raise InvalidArgument("path", "must not contain '@'")
    if "//" in text:
        raise InvalidArgument("path", "must not contain '//' (another host)")
    if "?" in text or "#" in text:
        raise InvalidArgument("path", "must not contain '?' or '#': give the query in query")
    for segment in text.split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            raise InvalidArgument("path", "must not contain '.' or '..' segments")


def build_url(base: str, path: str, query: Sequence[tuple[str, str]]) -> httpx.URL:
    """The URL to send, parsed as httpx sends it, verified to be under ``base``."""
    root = httpx.URL(base)
    prefix = root.path.rstrip("/")
    try:
        url = root.copy_with(path=prefix + path, params=list(query) or None, fragment=None)
    except httpx.InvalidURL:
        raise InvalidArgument("path", "is not a valid URL path") from None
    if (
        url.scheme != root.scheme
        or url.host != root.host
        or url.port != root.port
        or url.userinfo
        or not url.raw_path.decode("ascii").startswith(
            root.copy_with(path=prefix + "/").raw_path.decode("ascii")
        )
    ):
        raise InvalidArgument("path", "leaves the provider's API base")
    try:
        return egress.target(url)
    except egress.Refused:
        raise ProxyNotConfigured("the provider's API base may not be sent to") from None


def _request_headers(given: Mapping[str, str]) -> dict[str, str]:
    if len(given) > MAX_HEADERS:
        raise InvalidArgument("headers", f"has {len(given)} entries; the limit is {MAX_HEADERS}")
    headers: dict[str, str] = {}
    for name, value in given.items():
        lower = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            raise InvalidArgument("headers", "a header name is not a valid HTTP field name")
        if len(value) > MAX_FIELD or any(
            (ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value
        ):
            raise InvalidArgument(
                f"headers.{lower}", "must be at most 8 KiB without control characters"
            )
        if lower in _REFUSED or lower.startswith("proxy-"):
            raise InvalidArgument(
                f"headers.{lower}",
                "may not be set by the caller: the broker adds the credential itself",
            )
        if lower in _HOP_BY_HOP or lower.startswith("x-broker-"):
            continue
        headers[name] = value
    return headers


def _query(given: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if len(given) > MAX_QUERY:
        raise InvalidArgument("query", f"has {len(given)} entries; the limit is {MAX_QUERY}")
    for name, value in given:
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD or _bad_text(name + value):
            raise InvalidArgument("query", "names and values are at most 8 KiB, no control chars")
    return list(given)


def _check_credential_clash(
    headers: Mapping[str, str], query: Sequence[tuple[str, str]], token: AccessToken
) -> None:
    """A caller may not set (and so learn or replace) what carries the credential."""
    used = {name.lower() for name in token.headers}
    for name in headers:
        if name.lower() in used:
            raise InvalidArgument(
                f"headers.{name.lower()}",
                "is the header this integration's credential uses; the broker sets it",
            )
    params = set(token.query)
    for name, _value in query:
        if name in params:
            raise InvalidArgument(
                "query",
                f"parameter {name!r} carries this integration's credential; the broker sets it",
            )


def response_headers(given: httpx.Headers) -> dict[str, str]:
    """The provider's headers, lower case, repeated ones joined; cookies and hop-by-hop
    headers dropped."""
    headers: dict[str, str] = {}
    for name, value in given.multi_items():
        lower = name.lower()
        if lower in _DROPPED_RESPONSE:
            continue
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return headers


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _note(
    method: str, url: httpx.URL, path: str, status: int, sent: int, got: int, took: float
) -> None:
    """The call's audit detail: never bodies, query values or header values."""
    call = context.current_call.get()
    if call is None:
        return
    tail = f" status={status} sent={sent} received={got} ms={took * 1000:.0f}"
    head = f"{method} {url.host} "
    room = 255 - len(head) - len(tail)
    shown = path if len(path) <= room else path[: max(0, room - 3)] + "..."
    call.detail = head + shown + tail
