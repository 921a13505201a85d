"""OAuth 2.0 calls (refresh, code exchange, revocation) on one shared ``httpx.AsyncClient``.

Every provider answer becomes a TokenResponse or one of the errors the refresh engine acts on:

    GrantRejected            invalid_grant, invalid_scope (and Slack's and GitHub's spellings):
                             the user has to authorize again
    ProviderMisconfigured    invalid_client, unauthorized_client, any other 4xx: our client
                             or request is wrong, and asking again will not change the answer
    ProviderUnavailable      429, 5xx, timeout, connection error, malformed 200: try later
    └── ProviderOutcomeUnknown  the request was (or may have been) sent and no usable answer
                             came back: a read timeout, a connection dropped after sending,
                             500/502/504, a malformed 200. The provider may have rotated the
                             refresh token, so sending the same one again may look like reuse.
    RevocationNotSupported   revoke() on a provider without a revocation endpoint

Only what provably never reached the provider's token logic is a plain ProviderUnavailable,
safe to send again at once: connection refused, DNS failure, connect timeout, no free pooled
connection, and the answers that by definition mean "not processed" — 429 Too Many Requests,
503 Service Unavailable, 408 Request Timeout and the OAuth ``temporarily_unavailable`` error.
The connect phase has its own short timeout; once the request is on the wire the answer gets
the (generous) read timeout.

The client never retries; the refresh engine owns retries and backoff. Messages go back to
callers, so they are the broker's own words: the provider's name and, from its answer, only an
OAuth error code the broker knows (any other is ``unrecognized_error``). The provider's
error_description, and the code it really sent, go to the log only, on one line and at most
200 characters; a response body never goes anywhere. A provider that cannot be reached is
"could not reach", whatever the cause (refused, DNS, timeout): no host, port or errno a caller
could probe with. Every request leaves through ``broker.egress.send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from base64 import b64encode
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import httpx

from broker import egress
from broker.errors import (
    BrokerError,
    GrantRejected,
    ProviderAskedToWait,
    ProviderMisconfigured,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
)
from broker.providers.profile import INSTANCE_METADATA_FIELDS, ProviderProfile, Quirk

log = logging.getLogger("broker.providers")

# Provider error codes, standard (RFC 6749 §5.2) first, then the spellings Slack and GitHub
# use for the same situations. Grant errors map to the standard code GrantRejected carries.
_GRANT_ERRORS = {
    "invalid_grant": "invalid_grant",
    "invalid_scope": "invalid_scope",
    "invalid_refresh_token": "invalid_grant",
    "token_revoked": "invalid_grant",
    "token_expired": "invalid_grant",
    "invalid_code": "invalid_grant",
    "code_already_used": "invalid_grant",
    "bad_refresh_token": "invalid_grant",
    "bad_verification_code": "invalid_grant",
}
_CLIENT_ERRORS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_client_id",
        "bad_client_secret",
        "bad_redirect_uri",
        "oauth_authorization_url_mismatch",
        "incorrect_client_credentials",
        "redirect_uri_mismatch",
    }
)
_TRANSIENT_ERRORS = frozenset(
    {
        "temporarily_unavailable",
        "server_error",
        "ratelimited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
    }
)
# Answers to a revocation that mean the token is already unusable, which is what we wanted.
# Google says invalid_token for a token it no longer knows; Slack says invalid_auth.
_ALREADY_REVOKED = frozenset(_GRANT_ERRORS) | {
    "invalid_token",
    "invalid_auth",
    "not_authed",
    "account_inactive",
}
# Codes a caller may see: RFC 6749 §4.1.2.1 and §5.2, RFC 7009 §2.2.1, and the spellings above.
# Anything else a provider puts in "error" is its own text, and stays in the log.
_KNOWN_ERRORS = (
    frozenset(
        {
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
            "access_denied",
            "unsupported_response_type",
            "server_error",
            "temporarily_unavailable",
            "unsupported_token_type",
        }
    )
    | frozenset(_GRANT_ERRORS)
    | _CLIENT_ERRORS
    | _TRANSIENT_ERRORS
    | _ALREADY_REVOKED
)
UNRECOGNIZED = "unrecognized_error"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_DESCRIPTION_LIMIT = 200
_DEFAULT_RETRY_AFTER = 1.0
_STALL_GRACE = 0.2


class RevocationNotSupported(Exception):
    """The provider has no token revocation endpoint; the caller reports NOT_SUPPORTED."""

    def __init__(self, provider: str) -> None:
        super().__init__(f"{provider} does not support token revocation")
        self.provider = provider


@dataclass(frozen=True, slots=True, repr=False, kw_only=True)
class TokenResponse:
    access_token: str
    refresh_token: str | None
    # When the response arrived, so expiry is measured from the provider's clock tick, not
    # from whenever the caller gets around to storing it.
    received_at: datetime
    token_type: str = "Bearer"
    expires_in: int | None = None
    # None: the provider did not say, which RFC 6749 §5.1 allows when the scopes are the ones
    # requested or already granted.
    scopes: tuple[str, ...] | None = None
    account_id: str | None = None
    # Lifetime of the refresh token itself, when the provider says (``refresh_token_expires_in``,
    # or the member a refresh_expiry_field adapter names).
    refresh_token_expires_in: int | None = None
    # Members of the answer kept in the integration's metadata (instance_url_metadata).
    metadata: Mapping[str, str] = field(default_factory=dict)

    def refresh_token_expires_at(self) -> datetime | None:
        """When the refresh token lapses, if the provider said (0 or absent: not known)."""
        if not self.refresh_token_expires_in:
            return None
        return self.received_at + timedelta(seconds=self.refresh_token_expires_in)

    def expires_at(self, default_expires_in: int | None) -> datetime | None:
        """Absolute expiry; ``default_expires_in`` covers a missing expires_in; 0 = never."""
        seconds = self.expires_in if self.expires_in is not None else default_expires_in
        if not seconds:
            return None
        return self.received_at + timedelta(seconds=seconds)

    def __repr__(self) -> str:
        refresh = "None" if self.refresh_token is None else "<hidden>"
        return (
            f"TokenResponse(access_token=<hidden>, refresh_token={refresh}, "
            f"token_type={self.token_type!r}, expires_in={self.expires_in!r}, "
            f"scopes={self.scopes!r}, received_at={self.received_at.isoformat()}, "
            f"account_id={self.account_id!r}, "
            f"refresh_token_expires_in={self.refresh_token_expires_in!r}, "
            f"metadata={dict(self.metadata)!r})"
        )

    __str__ = __repr__


def _utcnow() -> datetime:
    return datetime.now(UTC)


class OAuthClient:
    """Talks to providers' token and revocation endpoints.

    ``http`` is the process-wide client created at start-up (its connection pool is shared by
    every provider). ``timeout`` is how long a request that was sent waits for its answer;
    ``connect_timeout`` (default: the same) bounds getting a connection, before anything is
    sent.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        timeout: float,
        *,
        connect_timeout: float | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._http = http
        connect = timeout if connect_timeout is None else min(connect_timeout, timeout)
        self._timeout = timeout
        # The answer's timeout is ours (see _await), not httpx's read timeout.
        self._timeouts = httpx.Timeout(timeout, connect=connect, pool=connect, read=None)
        self._clock = clock

    async def refresh(
        self,
        profile: ProviderProfile,
        refresh_token: str,
        scopes: Sequence[str] | None = None,
    ) -> TokenResponse:
        fields = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scopes is None and profile.has(Quirk.SCOPE_ON_REFRESH) and profile.scopes:
            scopes = profile.scopes
        if scopes:
            separator = "," if profile.has(Quirk.COMMA_SCOPES) else " "
            fields["scope"] = separator.join(scopes)
        return await self.token_request(profile, fields)

    async def exchange_code(
        self,
        profile: ProviderProfile,
        code: str,
        redirect_uri: str,
        code_verifier: str | None,
    ) -> TokenResponse:
        fields = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            fields["code_verifier"] = code_verifier
        return await self.token_request(profile, fields)

    async def revoke(
        self, profile: ProviderProfile, token: str, token_type_hint: str | None = None
    ) -> None:
        """Revoke a token (RFC 7009). Returns normally if it is revoked or was already invalid.

        Revoking a refresh token revokes the whole grant at providers that follow RFC 7009
        §2.1, so disconnecting should pass the refresh token when there is one. GitHub only
        takes an access token.
        """
        _require_client(profile)
        if not profile.revocation_url:
            raise RevocationNotSupported(profile.name)
        if profile.has(Quirk.GITHUB_REVOCATION):
            await self._revoke_github(profile, profile.revocation_url, token)
            return
        fields = {"token": token}
        if token_type_hint:
            fields["token_type_hint"] = token_type_hint
        response, _ = await self._send(profile, profile.revocation_url, fields, "revocation")
        raise_for_transient(profile, response)
        body = read_body(response)
        code = _error_code(body)
        if response.is_success and (body is None or body.get("ok") is not False):
            return
        if code in _ALREADY_REVOKED:
            return
        if code == "unsupported_token_type":
            raise RevocationNotSupported(profile.name)
        raise classify(profile, response.status_code, body, "revocation")

    async def token_request(
        self, profile: ProviderProfile, fields: dict[str, str]
    ) -> TokenResponse:
        """A token request of any grant type to ``profile``'s token URL with its client
        authentication, the answer read as RFC 6749 section 5 says (mint uses it too)."""
        token_url = _require_client(profile)
        response, received_at = await self._send(profile, token_url, fields, "token request")
        raise_for_transient(profile, response)
        body = read_body(response)
        if not response.is_success:
            raise classify(profile, response.status_code, body, "token request")
        if body is None:
            # A 200 that may carry tokens we cannot read: the provider may have rotated.
            raise ProviderOutcomeUnknown(
                f"{profile.name} answered the token request with a malformed response "
                "(not a JSON object)",
                provider=profile.name,
            )
        if body.get("ok") is False:
            raise classify(profile, response.status_code, body, "token request")
        tokens = _tokens(profile, body)
        access_token = tokens.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            if "error" in body:
                # GitHub reports errors with HTTP 200 and an "error" member.
                raise classify(profile, 400, body, "token request")
            raise ProviderOutcomeUnknown(
                f"{profile.name} answered the token request with a malformed response "
                "(no access_token)",
                provider=profile.name,
            )
        refresh_token = tokens.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            refresh_token = None
        return TokenResponse(
            access_token=access_token,
            refresh_token=refresh_token,
            received_at=received_at,
            token_type=_token_type(profile, tokens.get("token_type")),
            expires_in=_expires_in(tokens.get("expires_in")),
            scopes=_scopes(tokens.get("scope")),
            account_id=_lookup(body, profile.account_id_path),
            refresh_token_expires_in=_refresh_expiry(profile, tokens),
            metadata=_kept_metadata(profile, body),
        )

    async def _send(
        self, profile: ProviderProfile, url: str, fields: dict[str, str], what: str
    ) -> tuple[httpx.Response, datetime]:
        headers = {"Accept": "application/json", **profile.extra_headers}
        body = dict(fields)
        client_id = profile.client_id or ""
        if profile.auth_method == "client_secret_basic":
            headers["Authorization"] = _basic(client_id, profile.client_secret or "")
        elif profile.auth_method == "client_secret_post":
            body["client_id"] = client_id
            body["client_secret"] = profile.client_secret or ""
        else:
            body["client_id"] = client_id
        if profile.body_encoding == "json":
            request = egress.send(
                self._http, "POST", url, json=body, headers=headers, timeouts=self._timeouts
            )
        else:
            request = egress.send(
                self._http, "POST", url, data=body, headers=headers, timeouts=self._timeouts
            )
        return await self._await(profile, request, what)

    async def _revoke_github(self, profile: ProviderProfile, url: str, token: str) -> None:
        request = egress.send(
            self._http,
            "DELETE",
            url.format(client_id=quote(profile.client_id or "", safe="")),
            json={"access_token": token},
            headers={
                "Accept": "application/vnd.github+json",
                "Authorization": _basic(profile.client_id or "", profile.client_secret or ""),
            },
            timeouts=self._timeouts,
        )
        response, _ = await self._await(profile, request, "revocation")
        raise_for_transient(profile, response)
        # 404: GitHub no longer knows the token or the grant, so there is nothing to revoke.
        if response.is_success or response.status_code == 404:
            return
        raise classify(profile, response.status_code, read_body(response), "revocation")

    async def call(
        self,
        profile: ProviderProfile,
        method: str,
        url: str,
        what: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, datetime]:
        """Any other request to a provider (GitHub's installation tokens): through egress,
        with this client's timeouts and its mapping of transport failures; the response is
        the caller's to read."""
        request = egress.send(
            self._http, method, url, json=json, headers=headers, timeouts=self._timeouts
        )
        return await self._await(profile, request, what)

    async def _await(
        self, profile: ProviderProfile, request: Awaitable[httpx.Response], what: str
    ) -> tuple[httpx.Response, datetime]:
        sending = asyncio.ensure_future(request)
        try:
            done, _ = await asyncio.wait({sending}, timeout=self._timeout)
            if not done:
                # The timer may have run out while this process was frozen (SIGSTOP, a long
                # pause) with the answer already in its socket; on waking, the timer and the
                # read are due together and the timer can win. One short look more lets an
                # answer that is already here be read instead of thrown away.
                done, _ = await asyncio.wait({sending}, timeout=_STALL_GRACE)
            if not done:
                raise httpx.ReadTimeout("no answer")
            response = sending.result()
        except egress.Refused as exc:
            # Configuration is checked at start-up, so only a URL from elsewhere gets here;
            # nothing was sent.
            raise ProviderMisconfigured(
                f"the {what} URL of {profile.name} {exc}; nothing was sent",
                provider=profile.name,
            ) from None
        except _NEVER_SENT as exc:
            # One message for every cause (refused, no route, DNS, timeout): telling them apart
            # would tell a caller which hosts and ports answer. The operator gets the cause.
            log.warning(
                "could not reach %s for the %s (%s)", profile.name, what, type(exc).__name__
            )
            raise ProviderUnavailable(
                f"could not reach {profile.name} for the {what}", provider=profile.name
            ) from exc
        except httpx.TimeoutException as exc:
            raise ProviderOutcomeUnknown(
                f"{profile.name} did not answer the {what} within {self._timeout:g}s",
                provider=profile.name,
            ) from exc
        except httpx.TransportError as exc:
            log.warning(
                "the connection to %s failed after the %s was sent (%s)",
                profile.name,
                what,
                type(exc).__name__,
            )
            raise ProviderOutcomeUnknown(
                f"the connection to {profile.name} failed after the {what} was sent",
                provider=profile.name,
            ) from exc
        finally:
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
        return response, self._clock()


def _require_client(profile: ProviderProfile) -> str:
    missing = profile.missing_settings()
    if missing or profile.token_url is None:
        raise ProviderMisconfigured(
            f"providers.{profile.name}: {', '.join(missing)} not configured",
            provider=profile.name,
        )
    if profile.unfilled_templates:
        # Only a profile resolved for an integration may be sent with: nothing goes out to a
        # URL with a placeholder in it.
        raise ProviderMisconfigured(
            f"providers.{profile.name}: the endpoints need "
            f"{', '.join(profile.unfilled_templates)} (template_values or the integration's "
            "metadata); nothing was sent",
            provider=profile.name,
        )
    return profile.token_url


def _basic(client_id: str, client_secret: str) -> str:
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding, so a ':' or a
    # non-ASCII character in either cannot break the pair apart.
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + b64encode(pair.encode()).decode("ascii")


def read_body(response: httpx.Response) -> dict[str, Any] | None:
    content_type = response.headers.get("content-type", "")
    try:
        if "application/x-www-form-urlencoded" in content_type:
            # What GitHub answers when it is not asked for JSON.
            return dict(parse_qsl(response.text, keep_blank_values=True))
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


# Failures before a single byte of the request reached the provider.
_NEVER_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
# Answers that say the request was not processed (RFC 9110 §15.5.9, §15.6.4; RFC 6585 §4).
_NOT_PROCESSED = frozenset({408, 429, 503})


def raise_for_transient(profile: ProviderProfile, response: httpx.Response) -> None:
    status = response.status_code
    if status in _NOT_PROCESSED or status >= 500:
        # A 500, 502 or 504 may come after the provider rotated the token (a gateway timing
        # out on a slow backend, a crash after the commit): the outcome is unknown.
        kind = ProviderUnavailable if status in _NOT_PROCESSED else ProviderOutcomeUnknown
        header = response.headers.get("retry-after")
        if status in (429, 503) and header is not None:
            kind = ProviderAskedToWait
        raise kind(
            f"{profile.name} answered HTTP {status}",
            retry_after=parse_retry_after(header),
            provider=profile.name,
            http_status=str(status),
        )


def classify(
    profile: ProviderProfile, status: int, body: Mapping[str, Any] | None, what: str
) -> BrokerError:
    code = _error_code(body)
    name = profile.name
    # Slack lists many transient-looking errors on every method; anything in an ok:false
    # envelope that is not a known grant or client error is treated as transient.
    envelope = body is not None and body.get("ok") is False
    if code is None and envelope:
        return ProviderUnavailable(f"{name} could not handle the {what}", provider=name)
    if code is None:
        # No OAuth error code: a wrong URL (404, 405, a redirect) or a proxy in the way.
        hint = " (check token_url)" if what == "token request" else ""
        return ProviderMisconfigured(
            f"{name} answered the {what} with HTTP {status} and no OAuth error{hint}",
            provider=name,
            http_status=str(status),
        )
    log_answer(name, what, status, body)
    detail = code
    if code in _GRANT_ERRORS:
        return GrantRejected(
            f"{name} rejected the grant: {detail}",
            error=_GRANT_ERRORS[code],
            provider=name,
            provider_error=code,
        )
    if code in _TRANSIENT_ERRORS or (envelope and code not in _CLIENT_ERRORS):
        return ProviderUnavailable(f"{name} could not handle the {what}: {detail}", provider=name)
    # invalid_client and friends, and every other error code on a 4xx (invalid_request,
    # unsupported_grant_type, codes we do not know): the grant was not rejected, so sending
    # the user through authorization again would not help, and the same request would get
    # the same answer. The operator has to look at the provider settings.
    return ProviderMisconfigured(
        f"{name} rejected the broker's {what}: {detail}; check providers.{name}",
        provider=name,
        provider_error=code,
    )


def _error_code(body: Mapping[str, Any] | None) -> str | None:
    if body is None:
        return None
    code = body.get("error")
    if not isinstance(code, str):
        return None
    # The code ends up in messages, events and ErrorInfo metadata: only one the broker knows.
    return code if code in _KNOWN_ERRORS else UNRECOGNIZED


def log_answer(name: str, what: str, status: int, body: Mapping[str, Any] | None) -> None:
    """The provider's own words, for the operator: its error code and description, each on
    one line and capped (a provider cannot forge log lines or flood the log)."""
    code = _one_line((body or {}).get("error"), 64)
    description = _one_line((body or {}).get("error_description"), _DESCRIPTION_LIMIT)
    log.warning(
        "%s refused the %s (HTTP %d): error=%s description=%s",
        name,
        what,
        status,
        code or "-",
        description or "-",
    )


def _one_line(value: object, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    text = " ".join(_CONTROL.sub(" ", value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def parse_retry_after(value: str | None, now: datetime | None = None) -> float:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date); 1 if absent."""
    if not value or not value.strip():
        return _DEFAULT_RETRY_AFTER
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return _DEFAULT_RETRY_AFTER
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or _utcnow())).total_seconds()
    if not math.isfinite(seconds):
        return _DEFAULT_RETRY_AFTER
    return max(0.0, seconds)


def _token_type(profile: ProviderProfile, value: object) -> str:
    if not isinstance(value, str) or not value:
        return "Bearer"
    if value.lower() == "bearer":
        return "Bearer"
    if profile.has(Quirk.SLACK_ENVELOPE) and value in {"bot", "user"}:
        return "Bearer"
    return value


def _expires_in(value: object) -> int | None:
    # Some providers send a string; a value we cannot read falls back to the configured
    # default lifetime rather than failing a refresh that did succeed.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        try:
            seconds = float(value)
        except ValueError:
            return None
        if math.isfinite(seconds):
            # A lifetime past any real token's (and past what datetime can add) is "a century".
            return min(max(0, int(seconds)), _LONGEST_EXPIRES_IN)
    return None


_LONGEST_EXPIRES_IN = 100 * 365 * 24 * 3600


def _scopes(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        scopes = tuple(part for part in re.split(r"[\s,]+", value) if part)
        return scopes or None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value) or None
    return None


def _tokens(profile: ProviderProfile, body: dict[str, Any]) -> dict[str, Any]:
    """The object of the answer that holds the token members (the response adapters)."""
    if "access_token" in body:
        return body
    paths = []
    if profile.has(Quirk.SLACK_ENVELOPE):
        paths.append("authed_user")
    if profile.has(Quirk.NESTED_TOKENS):
        paths.append(profile.argument(Quirk.NESTED_TOKENS))
    for path in paths:
        node: object = body
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    return body


def _refresh_expiry(profile: ProviderProfile, tokens: Mapping[str, Any]) -> int | None:
    """The refresh token's lifetime: the standard member, else the one a refresh_expiry_field
    adapter names (Intuit's x_refresh_token_expires_in)."""
    standard = _expires_in(tokens.get("refresh_token_expires_in"))
    if standard is None and profile.has(Quirk.REFRESH_EXPIRY_FIELD):
        return _expires_in(tokens.get(profile.argument(Quirk.REFRESH_EXPIRY_FIELD)))
    return standard


_METADATA_LIMIT = 2048


def _kept_metadata(profile: ProviderProfile, body: Mapping[str, Any]) -> dict[str, str]:
    if not profile.has(Quirk.INSTANCE_URL_METADATA):
        return {}
    return {
        name: value
        for name in INSTANCE_METADATA_FIELDS
        if isinstance(value := body.get(name), str) and 0 < len(value) <= _METADATA_LIMIT
    }


def _lookup(body: Mapping[str, Any], path: str | None) -> str | None:
    if not path:
        return None
    node: object = body
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    if isinstance(node, bool) or not isinstance(node, str | int):
        return None
    return str(node) or None
