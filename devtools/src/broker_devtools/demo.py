"""``broker dev-provider`` (and ``broker serve --dev --demo-provider``): the test authorization
server (``broker_devtools.fakeauth``) on a fixed loopback port, as a provider named ``demo``,
so refresh, background refresh, revocation and the PKCE flow can be tried with copy-paste only.

It is a strict provider: refresh tokens rotate on every use and a reused one revokes the grant.
Besides the OAuth endpoints (/authorize consents at once and redirects with a code, /token,
/revoke) it answers:

- ``GET /grant?user_id=U&expires_in=S`` — a new grant, as the JSON body of a StoreIntegration
  request (pipe it to ``grpcurl -d @``); the first access token lasts S seconds, refreshed ones
  an hour;
- ``POST /consent?user_id=U`` with a BeginAuthorization response as JSON body — the user's
  consent from a terminal: answers ``{"state", "code", "user_id"}``, the body of a
  CompleteAuthorization request (U: the user whose session receives the callback);
- ``GET /callback`` — the redirect_uri, where a browser lands after /authorize: shows the same
  ``{"state", "code"}`` (or the error);
- ``GET /stats`` — how many refreshes it answered and how many tokens it revoked.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from broker.config import ProviderSettings, Settings
from broker.errors import ConfigError
from broker_devtools.fakeauth import FakeAuthServer

NAME = "demo"
DEFAULT_PORT = 8765
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret"
SCOPES = ("read", "write")
# A margin shorter than the hour a refreshed token lasts, longer than the background pass
# (30 s): a token stored with expires_in=60 is refreshed by a call at once, or in the background.
REFRESH_MARGIN_SECONDS = 90


def start(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> FakeAuthServer:
    fake = FakeAuthServer(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        expires_in=3600,
        rotate=True,
        port=port,
        host=host,
    )
    fake.routes["/grant"] = lambda query, _body: _grant(fake, query)
    fake.routes["/consent"] = lambda query, body: _consent(fake, body, query.get("user_id", ""))
    fake.routes["/callback"] = lambda query, _body: _callback(query)
    fake.routes["/stats"] = lambda _query, _body: (
        200,
        {"refresh_calls": fake.refresh_calls, "revoked_tokens": len(fake.revoked)},
    )
    try:
        return fake.start()
    except OSError as exc:
        raise ConfigError(
            f"dev provider: cannot listen on {host}:{port} ({exc.strerror}); "
            "pick another port with --port"
        ) from None


def _grant(fake: FakeAuthServer, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
    scopes = tuple(query.get("scope", " ".join(SCOPES)).split())
    try:
        expires_in = int(query.get("expires_in", "3600"))
    except ValueError:
        return 400, {"error": "expires_in must be a number of seconds"}
    access, refresh = fake.issue_grant(scopes)
    return 200, {
        "user_id": query.get("user_id", "alice"),
        "provider": query.get("provider", NAME),
        "access_token": access,
        "refresh_token": refresh,
        "expires_in_seconds": expires_in,
        "scopes": list(scopes),
    }


def _consent(
    fake: FakeAuthServer, body: dict[str, Any], user_id: str = ""
) -> tuple[int, dict[str, Any]]:
    """``user_id`` plays the signed-in user of the session that receives the callback, which
    CompleteAuthorization needs (the flow is bound to the user who began it)."""
    url = body.get("authorization_url") or body.get("authorizationUrl")
    if not isinstance(url, str):
        return 400, {"error": "send the BeginAuthorization response (its authorization_url)"}
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    try:
        answer = _callback(fake.consent(query))[1]
        return 200, {**answer, "user_id": user_id} if user_id else answer
    except ValueError as exc:
        return 400, {"error": str(exc)}


def _callback(query: dict[str, str]) -> tuple[int, dict[str, Any]]:
    keep = ("state", "code", "error", "error_description")
    return 200, {name: query[name] for name in keep if name in query}


def provider_settings(fake: FakeAuthServer) -> ProviderSettings:
    return ProviderSettings.model_validate(_fields(fake))


def _fields(fake: FakeAuthServer) -> dict[str, Any]:
    return {
        "authorization_url": fake.authorization_url,
        "token_url": fake.token_url,
        "revocation_url": fake.revocation_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [fake.url + "/callback"],
        "scopes": list(SCOPES),
        "rotates_refresh_tokens": True,
        "refresh_margin_seconds": REFRESH_MARGIN_SECONDS,
        "pkce": True,
    }


def provider_toml(fake: FakeAuthServer, name: str = NAME) -> str:
    import json

    lines = [f"[providers.{name}]"]
    for key, value in _fields(fake).items():
        lines.append(f"{key} = {json.dumps(value).lower() if value is True else json.dumps(value)}")
    return "\n".join(lines) + "\n"


def helpers(fake: FakeAuthServer) -> str:
    return f"""Provider {NAME!r}: a strict OAuth server (rotating refresh tokens) on {fake.url}
  mint a grant (a StoreIntegration request body):  curl -s '{fake.url}/grant?user_id=alice'
  consent (BeginAuthorization's answer on stdin):  curl -s --json @- {fake.url}/consent
  refreshes answered, tokens revoked:              curl -s {fake.url}/stats
"""


def usage(fake: FakeAuthServer) -> str:
    return f"""Paste into your broker's TOML file (or run `broker serve --dev --demo-provider`):

{provider_toml(fake)}
{helpers(fake)}"""


class DemoProvider:
    """``serve --dev --demo-provider``: the demo provider added to a dev broker's settings.
    One server per process, started at the first ``apply`` and kept across reloads."""

    option = "--demo-provider"

    def __init__(self, port: int) -> None:
        self.port = port
        self._fake: FakeAuthServer | None = None

    def apply(self, settings: Settings) -> Settings:
        if self._fake is None:
            self._fake = start(self.port)
        if NAME in settings.providers:
            raise ConfigError(f"providers.{NAME}: already configured; {self.option} adds its own")
        providers = {**settings.providers, NAME: provider_settings(self._fake)}
        return settings.model_copy(update={"providers": providers})

    def banner(self) -> str:
        return helpers(self._fake) if self._fake is not None else ""


class _AddDemoProvider(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        port = values if isinstance(values, int) else DEFAULT_PORT
        namespace.dev_additions = (*namespace.dev_additions, DemoProvider(port))


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    serve: argparse.ArgumentParser,
) -> None:
    """The ``broker`` entry point (``credential_broker.cli``): ``dev-provider``, and
    ``--demo-provider`` on ``serve``."""
    serve.add_argument(
        "--demo-provider",
        nargs="?",
        type=int,
        const=DEFAULT_PORT,
        action=_AddDemoProvider,
        metavar="PORT",
        help="with --dev: also run the local test OAuth server as provider 'demo' "
        f"(port {DEFAULT_PORT}); see `broker dev-provider`",
    )
    dev_provider = subparsers.add_parser(
        "dev-provider",
        help="run a local test OAuth server and print its [providers.demo] settings",
        description="A strict OAuth 2.0 server on loopback for trying refresh, revocation and "
        "PKCE: /authorize consents at once, /grant mints a grant, /callback shows the code.",
    )
    dev_provider.add_argument("--port", type=int, default=DEFAULT_PORT)
    dev_provider.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 in a container; the broker reaches it on loopback)",
    )
    dev_provider.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fake = start(args.port, args.host)
    print(usage(fake), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        fake.stop()
    return 0
