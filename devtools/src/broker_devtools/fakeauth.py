"""A fake OAuth 2.0 authorization server: a real HTTP server on 127.0.0.1, ephemeral port.

It behaves like a strict provider: refresh tokens rotate on every use, and presenting a refresh
token that was already rotated revokes the whole grant (RFC 9700 §4.14.2). Authorization codes
check PKCE (S256 or plain). It can be told to misbehave for the next N requests or for good.

    with FakeAuthServer(expires_in=60) as fake:
        access, refresh = fake.issue_grant(scopes=("read",))
        profile = ProviderProfile(name="fake", token_url=fake.token_url, client_id=fake.client_id,
                                  client_secret=fake.client_secret)
        fake.fail_next("rate_limited", retry_after=3)
        ...
        assert fake.refresh_calls == 2

Minted credential kinds are served too: the client-credentials grant (the fake's
client, until ``revoke_client()``), the RFC 7523 JWT-bearer grant (assertions signed by a key
given to ``register_service_account``; signature, ``aud``, ``exp`` and ``iat`` checked), and a
GitHub-style ``POST /app/installations/{id}/access_tokens`` (App JWT signed by a key given to
``register_app``) with ``DELETE /installation/token``. ``mint_calls`` counts the mints.

Endpoints templated per tenant are served too: ``/tenants/{label}/token`` (and ``/revoke``,
``/authorize``) answer as ``/token`` does, and the request records the full path.

The server runs in its own thread, so it serves sync and async tests alike; every public method
is thread-safe.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import jwt

Failure = Literal[
    "invalid_grant",
    "invalid_client",
    "invalid_scope",
    "unauthorized_client",
    "rate_limited",  # 429 with Retry-After
    "server_error",  # 500
    "unavailable",  # 503
    "slow",  # answers normally after `delay` seconds
    "garbage",  # 200 with an HTML body
    "no_access_token",  # 200 JSON without access_token
    "slack_error",  # 200 {"ok": false, "error": error}
]
Route = Callable[[dict[str, str], dict[str, Any]], tuple[int, dict[str, Any]]]
_ERROR_STATUS = {
    "invalid_grant": 400,
    "invalid_client": 400,
    "invalid_scope": 400,
    "unauthorized_client": 401,
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]  # parsed form or JSON
    # client_secret_basic, client_secret_post, none, or "multiple" when both were sent.
    auth_method: str
    client_id: str | None
    received_at: float = 0.0  # time.monotonic() when it arrived


@dataclass
class Grant:
    scopes: tuple[str, ...]
    expires_in: int | None
    refresh_token: str
    used_refresh_tokens: set[str] = field(default_factory=set)
    access_tokens: set[str] = field(default_factory=set)
    active: bool = True


@dataclass
class _Code:
    client_id: str
    redirect_uri: str | None
    scopes: tuple[str, ...]
    challenge: str | None
    method: str | None
    used: bool = False
    grant: Grant | None = None


@dataclass
class _Script:
    kind: Failure
    remaining: int | None  # None: for good
    path: str
    retry_after: str
    delay: float
    error: str


class FakeAuthServer:
    def __init__(
        self,
        *,
        client_id: str = "fake-client",
        client_secret: str = "fake-secret",  # noqa: S107 - a test double's own credential
        auth_methods: tuple[str, ...] = ("client_secret_basic", "client_secret_post"),
        expires_in: int | None = 3600,
        rotate: bool = True,
        omit_refresh_token: bool = False,
        slack_style: bool = False,
        latency: float = 0.0,
        refresh_token_expires_in: int | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = port  # 0: an ephemeral one (tests); `broker dev-provider` uses a fixed one
        self.host = host
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth_methods = auth_methods
        self.expires_in = expires_in
        self.rotate = rotate
        # Google-like: refresh responses carry no refresh_token and the old one stays valid.
        self.omit_refresh_token = omit_refresh_token
        # Slack-like: success bodies say "ok": true, errors are 200 {"ok": false}.
        self.slack_style = slack_style
        self.latency = latency
        # Sent as refresh_token_expires_in with every refresh token issued (None: not sent).
        self.refresh_token_expires_in = refresh_token_expires_in
        # Extra members merged into every successful token response, e.g. {"team": {...}}.
        self.extra_token_fields: dict[str, Any] = {}
        # Provider shapes the broker's adapters handle (docs/providers.md, "Adapters"):
        # token members nested under this dotted path ("data", "authed_user"),
        self.nest_tokens: str | None = None
        # expires_in sent as a string of digits,
        self.string_expires_in = False
        # scopes joined (in requests and answers) with this separator,
        self.scope_separator = " "
        # token and revocation requests accepted only with a JSON body.
        self.json_only = False
        self.deny_authorization = False
        self.revoked: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._grants: dict[str, Grant] = {}  # every refresh token ever issued -> its grant
        self._access: dict[str, Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._scripts: list[_Script] = []
        self._requests: list[RecordedRequest] = []
        self._refresh_calls = 0
        self._mint_calls = 0
        self.client_revoked = False
        # issuer -> public key PEM (service accounts); app id -> (public key PEM, installations)
        self._service_accounts: dict[str, str] = {}
        self._apps: dict[str, tuple[str, set[str]]] = {}
        self._minted: dict[str, str] = {}  # minted access token -> what minted it
        # Extra endpoints: path -> function(query, body) -> (status, JSON body). The dev provider
        # adds its conveniences (mint a grant, consent from a terminal, show the callback) here.
        self.routes: dict[str, Route] = {}
        self._rotations = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._reuse_revocations = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeAuthServer:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._stopping.clear()
        self._server = _Server((self.host, self.port), Handler)
        # A short poll interval keeps stop() (and so every test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on "slow" or latency
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAuthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeAuthServer is not started"
        host, port = self._server.server_address[:2]
        if host == "0.0.0.0":  # noqa: S104 - listening everywhere; loopback reaches it here
            host = "127.0.0.1"
        return f"http://{host!s}:{port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def revocation_url(self) -> str:
        return self.url + "/revoke"

    @property
    def authorization_url(self) -> str:
        return self.url + "/authorize"

    # -- seeding and inspection --------------------------------------------------------------

    def issue_grant(
        self, scopes: tuple[str, ...] = ("read",), expires_in: int | None = None
    ) -> tuple[str, str]:
        """A grant as if the user had just authorized: (access_token, refresh_token)."""
        with self._lock:
            grant = self._new_grant(tuple(scopes), expires_in)
            return self._new_access(grant), grant.refresh_token

    def is_grant_active(self, refresh_token: str) -> bool:
        with self._lock:
            grant = self._grants.get(refresh_token)
            return grant is not None and grant.active

    def is_access_token_active(self, access_token: str) -> bool:
        with self._lock:
            grant = self._access.get(access_token)
            return grant is not None and grant.active and access_token not in self.revoked

    def current_refresh_token(self, refresh_token: str) -> str | None:
        """The newest refresh token of the grant ``refresh_token`` belongs to."""
        with self._lock:
            grant = self._grants.get(refresh_token)
            return grant.refresh_token if grant is not None else None

    def refresh_times(self, refresh_token: str) -> list[float]:
        """When (time.monotonic()) each refresh request of the grant ``refresh_token`` belongs
        to arrived, whichever of its refresh tokens it presented."""
        with self._lock:
            grant = self._grants.get(refresh_token)
            tokens = {token for token, owner in self._grants.items() if owner is grant}
            return [
                r.received_at
                for r in self._requests
                if r.path == "/token"
                and r.body.get("grant_type") == "refresh_token"
                and r.body.get("refresh_token") in tokens
            ]

    @property
    def refresh_calls(self) -> int:
        with self._lock:
            return self._refresh_calls

    @property
    def mint_calls(self) -> int:
        """Tokens minted (client credentials, JWT bearer, installation tokens), failures too."""
        with self._lock:
            return self._mint_calls

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    def revoke_client(self) -> None:
        """The fake's client is revoked: client-credentials grants fail with invalid_client."""
        with self._lock:
            self.client_revoked = True

    def register_service_account(self, issuer: str, public_key_pem: str) -> None:
        with self._lock:
            self._service_accounts[issuer] = public_key_pem

    def register_app(self, app_id: str, public_key_pem: str, installations: set[str]) -> None:
        with self._lock:
            self._apps[app_id] = (public_key_pem, set(installations))

    def uninstall(self, app_id: str, installation_id: str) -> None:
        with self._lock:
            self._apps[app_id][1].discard(installation_id)

    def is_minted_token_active(self, token: str) -> bool:
        with self._lock:
            return token in self._minted and token not in self.revoked

    @property
    def rotations(self) -> int:
        """Refresh tokens issued by rotation (each one the broker must store)."""
        with self._lock:
            return self._rotations

    @property
    def in_flight(self) -> int:
        """Requests received and not answered yet (a dead client's included)."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests it was handling at once (the peak of ``in_flight``)."""
        with self._lock:
            return self._max_in_flight

    @property
    def reuse_revocations(self) -> int:
        """Grants revoked because an already rotated refresh token came back."""
        with self._lock:
            return self._reuse_revocations

    def revoked_grants(self, refresh_tokens: list[str]) -> int:
        """How many of the grants these (original) refresh tokens belong to are revoked."""
        with self._lock:
            return sum(
                1
                for token in refresh_tokens
                if (grant := self._grants.get(token)) is None or not grant.active
            )

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def fail_next(
        self,
        kind: Failure,
        times: int | None = 1,
        *,
        path: str = "/token",
        retry_after: str = "2",
        delay: float = 1.0,
        error: str = "invalid_refresh_token",
    ) -> None:
        """Answer the next ``times`` requests to ``path`` (None: all of them) with ``kind``."""
        with self._lock:
            self._scripts.append(_Script(kind, times, path, retry_after, delay, error))

    def fail_always(self, kind: Failure, **options: Any) -> None:
        self.fail_next(kind, None, **options)

    def reset_failures(self) -> None:
        with self._lock:
            self._scripts.clear()

    # -- internals (called with self._lock held unless noted) ----------------------------------

    def _new_grant(self, scopes: tuple[str, ...], expires_in: int | None) -> Grant:
        grant = Grant(scopes, expires_in, _token("rt"))
        self._grants[grant.refresh_token] = grant
        return grant

    def _new_access(self, grant: Grant) -> str:
        token = _token("at")
        grant.access_tokens.add(token)
        self._access[token] = grant
        return token

    def _revoke_grant(self, grant: Grant) -> None:
        grant.active = False
        self.revoked.update(grant.access_tokens, grant.used_refresh_tokens)
        self.revoked.add(grant.refresh_token)

    def consent(self, query: dict[str, str]) -> dict[str, str]:
        """What /authorize sends back to the redirect_uri for these authorization request
        parameters, as if the user had consented: ``code`` and ``state`` (or ``error``)."""
        if query.get("client_id") != self.client_id or not query.get("redirect_uri"):
            raise ValueError("unknown client or missing redirect_uri")
        params = {"state": query.get("state", "")}
        if self.deny_authorization:
            params["error"] = "access_denied"
            return params
        code = _token("code")
        with self._lock:
            self._codes[code] = _Code(
                client_id=self.client_id,
                redirect_uri=query["redirect_uri"],
                scopes=_split_scopes(query.get("scope", ""), self.scope_separator),
                challenge=query.get("code_challenge"),
                method=query.get("code_challenge_method", "plain")
                if "code_challenge" in query
                else None,
            )
        params["code"] = code
        return params

    def _take_script(self, path: str) -> _Script | None:
        for script in self._scripts:
            if script.path == path:
                if script.remaining is not None:
                    script.remaining -= 1
                    if script.remaining <= 0:
                        self._scripts.remove(script)
                return script
        return None

    def _sleep(self, seconds: float) -> None:
        # Called without the lock; stop() cuts it short.
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out on a "slow" answer has hung up; that is the point of the test.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(18)}"


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeAuthServer
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately; without this each answer waits on delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean

    # -- plumbing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        fake = self.server_fake
        with fake._lock:
            fake._in_flight += 1
            fake._max_in_flight = max(fake._max_in_flight, fake._in_flight)
        try:
            self._handle(method)
        finally:
            with fake._lock:
                fake._in_flight -= 1

    def _handle(self, method: str) -> None:
        fake = self.server_fake
        parts = urlsplit(self.path)
        tenant = _TENANT_PATH.fullmatch(parts.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = self._parse_body(raw)
        auth_method, client_id, secret = self._client_credentials(body)
        with fake._lock:
            fake._requests.append(
                RecordedRequest(
                    method=method,
                    path=parts.path,
                    query=query,
                    headers={name.lower(): value for name, value in self.headers.items()},
                    body=body,
                    auth_method=auth_method,
                    client_id=client_id,
                    received_at=time.monotonic(),
                )
            )
            if parts.path == "/token" and body.get("grant_type") == "refresh_token":
                fake._refresh_calls += 1
            if body.get("grant_type") in _MINT_GRANTS or _INSTALLATION.fullmatch(parts.path):
                fake._mint_calls += 1
            script = fake._take_script(parts.path)
        if tenant is not None:
            parts = parts._replace(path=tenant.group(2))
        fake._sleep(fake.latency)
        if script is not None and script.kind != "slow":
            self._scripted(script)
            return
        if script is not None:
            fake._sleep(script.delay)
        if (method, parts.path) == ("GET", "/authorize"):
            self._authorize(query)
            return
        route = fake.routes.get(parts.path)
        if route is not None:
            self._send(*route(query, body))
            return
        if self._github(method, parts.path):
            return
        if (method, parts.path, body.get("grant_type")) == ("POST", "/token", _JWT_BEARER):
            # The signed assertion authenticates the client (RFC 7523 §3.1).
            with fake._lock:
                self._jwt_bearer(body)
            return
        if method != "POST" or parts.path not in {"/token", "/revoke"}:
            self._send(404, {"error": "not_found"})
            return
        if fake.json_only and "json" not in (self.headers.get("content-type") or ""):
            self._oauth_error("invalid_request", 400, "this server takes JSON bodies only")
            return
        if not self._client_ok(auth_method, client_id, secret):
            self._oauth_error("invalid_client", 401, "client authentication failed")
            return
        with fake._lock:
            if parts.path == "/revoke":
                self._revoke(body)
            else:
                self._token(body)

    def _parse_body(self, raw: bytes) -> dict[str, Any]:
        if "json" in (self.headers.get("content-type") or ""):
            try:
                parsed = json.loads(raw or b"{}")
            except ValueError:
                return {}
            return parsed if isinstance(parsed, dict) else {}
        return dict(parse_qsl(raw.decode(), keep_blank_values=True))

    def _client_credentials(self, body: dict[str, Any]) -> tuple[str, str | None, str | None]:
        header = self.headers.get("authorization") or ""
        basic = None
        if header.lower().startswith("basic "):
            try:
                pair = base64.b64decode(header[6:], validate=True).decode()
            except ValueError:
                pair = ""
            user, _, password = pair.partition(":")
            basic = (unquote_plus(user), unquote_plus(password))
        posted = body.get("client_secret")
        if basic is not None and posted is not None:
            return "multiple", basic[0], basic[1]
        if basic is not None:
            return "client_secret_basic", basic[0], basic[1]
        if posted is not None:
            return "client_secret_post", body.get("client_id"), posted
        return "none", body.get("client_id"), None

    def _client_ok(self, auth_method: str, client_id: str | None, secret: str | None) -> bool:
        fake = self.server_fake
        if auth_method not in fake.auth_methods or client_id != fake.client_id:
            return False
        if fake.client_revoked:
            return False
        return auth_method == "none" or secret == fake.client_secret

    def _send(
        self,
        status: int,
        payload: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        data = raw if raw is not None else json.dumps(payload or {}).encode()
        self.send_response(status)
        content_type = "text/html" if raw is not None else "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _oauth_error(self, error: str, status: int = 400, description: str = "") -> None:
        if self.server_fake.slack_style:
            self._send(200, {"ok": False, "error": _SLACK_ERRORS.get(error, error)})
            return
        payload = {"error": error}
        if description:
            payload["error_description"] = description
        self._send(status, payload)

    def _scripted(self, script: _Script) -> None:
        kind = script.kind
        if kind in _ERROR_STATUS:
            self._send(_ERROR_STATUS[kind], {"error": kind, "error_description": "scripted"})
        elif kind == "rate_limited":
            self._send(429, {"error": "rate_limited"}, headers={"Retry-After": script.retry_after})
        elif kind == "server_error":
            self._send(500, raw=b"<html>Internal Server Error</html>")
        elif kind == "unavailable":
            self._send(503, raw=b"<html>Service Unavailable</html>")
        elif kind == "garbage":
            self._send(200, raw=b"<html>definitely not json</html>")
        elif kind == "no_access_token":
            self._send(200, {"token_type": "Bearer", "expires_in": 3600})
        elif kind == "slack_error":
            self._send(200, {"ok": False, "error": script.error})
        else:  # pragma: no cover - Failure is a closed set
            raise AssertionError(kind)

    # -- endpoints (token and revoke run with the fake's lock held) ---------------------------

    def _authorize(self, query: dict[str, str]) -> None:
        try:
            params = self.server_fake.consent(query)
        except ValueError as exc:
            self._send(400, raw=f"<html>{exc}</html>".encode())
            return
        redirect_uri = query["redirect_uri"]
        separator = "&" if "?" in redirect_uri else "?"
        location = redirect_uri + separator + urlencode(params)
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _token(self, body: dict[str, Any]) -> None:
        grant_type = body.get("grant_type")
        if grant_type == "refresh_token":
            self._refresh(body)
        elif grant_type == "authorization_code":
            self._exchange(body)
        elif grant_type == "client_credentials":
            self._mint(str(body.get("scope") or ""), "client_credentials")
        else:
            self._oauth_error("unsupported_grant_type")

    def _refresh(self, body: dict[str, Any]) -> None:
        fake = self.server_fake
        presented = body.get("refresh_token") or ""
        grant = fake._grants.get(presented)
        if grant is None or not grant.active:
            self._oauth_error("invalid_grant", description="unknown or revoked refresh token")
            return
        if presented != grant.refresh_token:
            # A rotated token came back: someone holds a stale copy (or stole it), so the whole
            # grant goes, as RFC 9700 §4.14.2 recommends.
            fake._revoke_grant(grant)
            fake._reuse_revocations += 1
            self._oauth_error("invalid_grant", description="refresh token reuse detected")
            return
        scopes = grant.scopes
        if body.get("scope"):
            scopes = _split_scopes(str(body["scope"]), fake.scope_separator)
            if not set(scopes) <= set(grant.scopes):
                self._oauth_error("invalid_scope", description="scope exceeds the grant")
                return
        rotated = fake.rotate and not fake.omit_refresh_token
        if rotated:
            grant.used_refresh_tokens.add(grant.refresh_token)
            grant.refresh_token = _token("rt")
            fake._grants[grant.refresh_token] = grant
            fake._rotations += 1
        self._issue(grant, scopes, include_refresh=not fake.omit_refresh_token)

    def _exchange(self, body: dict[str, Any]) -> None:
        fake = self.server_fake
        code = fake._codes.get(body.get("code") or "")
        if code is None:
            self._oauth_error("invalid_grant", description="unknown authorization code")
            return
        if code.used:
            # RFC 6749 §4.1.2: a code used twice revokes what it issued.
            if code.grant is not None:
                fake._revoke_grant(code.grant)
            self._oauth_error("invalid_grant", description="authorization code already used")
            return
        code.used = True
        if code.redirect_uri != body.get("redirect_uri"):
            self._oauth_error("invalid_grant", description="redirect_uri does not match")
            return
        if code.challenge is not None:
            verifier = body.get("code_verifier") or ""
            expected = _s256(verifier) if code.method == "S256" else verifier
            if not verifier or not secrets.compare_digest(expected, code.challenge):
                self._oauth_error("invalid_grant", description="PKCE verification failed")
                return
        code.grant = fake._new_grant(code.scopes, None)
        self._issue(code.grant, code.scopes, include_refresh=True)

    def _issue(self, grant: Grant, scopes: tuple[str, ...], *, include_refresh: bool) -> None:
        fake = self.server_fake
        payload: dict[str, Any] = {
            "access_token": fake._new_access(grant),
            "token_type": "Bearer",
            "scope": fake.scope_separator.join(scopes),
        }
        expires_in = grant.expires_in if grant.expires_in is not None else fake.expires_in
        if expires_in is not None:
            payload["expires_in"] = str(expires_in) if fake.string_expires_in else expires_in
        if include_refresh:
            payload["refresh_token"] = grant.refresh_token
            if fake.refresh_token_expires_in is not None:
                payload["refresh_token_expires_in"] = fake.refresh_token_expires_in
        payload.update(fake.extra_token_fields)
        if fake.nest_tokens:
            for part in reversed(fake.nest_tokens.split(".")):
                payload = {part: payload}
        if fake.slack_style:
            payload["ok"] = True
        self._send(200, payload)

    def _mint(self, scope: str, source: str) -> None:
        fake = self.server_fake
        token = _token("mt")
        fake._minted[token] = source
        payload: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if fake.expires_in is not None:
            payload["expires_in"] = fake.expires_in
        if scope:
            payload["scope"] = scope
        self._send(200, payload)

    def _jwt_bearer(self, body: dict[str, Any]) -> None:
        fake = self.server_fake
        assertion = str(body.get("assertion") or "")
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
            key = fake._service_accounts.get(str(issuer))
            if key is None:
                raise jwt.InvalidTokenError("unknown issuer")
            claims = jwt.decode(
                assertion,
                key,
                algorithms=["RS256", "ES256", "ES384", "ES512"],
                audience=fake.token_url,
                options={"require": ["iss", "aud", "exp", "iat"]},
            )
            if claims["exp"] - claims["iat"] > 3600 or claims["iat"] > time.time() + 60:
                raise jwt.InvalidTokenError("lifetime")
        except jwt.InvalidTokenError:
            # Google's answer to a bad signature, an unknown key or a stale assertion.
            self._oauth_error("invalid_grant", description="invalid JWT signature or claims")
            return
        self._mint(str(claims.get("scope") or ""), "service_account")

    def _github(self, method: str, path: str) -> bool:
        """GitHub's App installation endpoints; False when ``path`` is not one of them."""
        fake = self.server_fake
        auth = self.headers.get("authorization") or ""
        bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
        if (method, path) == ("DELETE", "/api/installation/token"):
            with fake._lock:
                if bearer not in fake._minted or bearer in fake.revoked:
                    self._send(401, {"message": "Bad credentials"})
                else:
                    fake.revoked.add(bearer)
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
            return True
        found = _INSTALLATION.fullmatch(path)
        if found is None or method != "POST":
            return False
        installation = found.group(1)
        try:
            app_id = str(jwt.decode(bearer, options={"verify_signature": False}).get("iss"))
            with fake._lock:
                key, installations = fake._apps[app_id]
            claims = jwt.decode(
                bearer, key, algorithms=["RS256"], options={"require": ["iss", "exp", "iat"]}
            )
            if claims["exp"] - claims["iat"] > 660:
                raise jwt.InvalidTokenError("GitHub App JWTs live at most 10 minutes")
        except (jwt.InvalidTokenError, KeyError):
            self._send(401, {"message": "A JSON web token could not be decoded"})
            return True
        if installation not in installations:
            self._send(404, {"message": "Not Found"})
            return True
        with fake._lock:
            token = "ghs_" + secrets.token_urlsafe(24)
            fake._minted[token] = "github_app_installation"
        lifetime = fake.expires_in if fake.expires_in is not None else 3600
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + lifetime))
        self._send(201, {"token": token, "expires_at": expires, "permissions": {}})
        return True

    def _revoke(self, body: dict[str, Any]) -> None:
        fake = self.server_fake
        token = body.get("token") or ""
        grant = fake._grants.get(token)
        if grant is not None:
            # RFC 7009 §2.1: revoking a refresh token revokes the grant's access tokens too.
            fake._revoke_grant(grant)
        elif token in fake._access:
            fake.revoked.add(token)
        # Unknown tokens get 200 as well (RFC 7009 §2.2): the client's goal is reached.
        if fake.slack_style:
            self._send(200, {"ok": True, "revoked": True})
        else:
            self._send(200, raw=b"")


def _split_scopes(value: str, separator: str) -> tuple[str, ...]:
    # A space-separated server also reads commas (as the fake always did); a comma-separated
    # one reads only commas, so a space-joined list is one unknown scope.
    if separator == " ":
        return tuple(value.replace(",", " ").split())
    return tuple(part for part in value.split(separator) if part)


_TENANT_PATH = re.compile(r"/tenants/([a-z0-9-]{1,63})(/token|/revoke|/authorize)")
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_MINT_GRANTS = frozenset({"client_credentials", _JWT_BEARER})
_INSTALLATION = re.compile(r"/api/app/installations/([^/]+)/access_tokens")
_SLACK_ERRORS = {"invalid_grant": "invalid_refresh_token", "invalid_client": "invalid_client_id"}
