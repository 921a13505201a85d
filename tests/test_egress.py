"""No caller-chosen destination (issue 20): a credential's token endpoint is one the operator
configured, every request leaves through broker.egress.send, and what a provider answers never
reaches a caller. Real brokers, a real hostile HTTP server on loopback, both backends."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import socket
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import json_format
from pydantic import ValidationError
from sqlalchemy import select

from broker import egress
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import ProviderSettings, Settings, load_settings
from broker.domain.events import Event, EventType
from broker.domain.webhooks import WebhookDispatcher, build_endpoints
from broker.errors import BrokerError, ConfigError
from broker.providers import OAuthClient, ProviderProfile, Quirk, RevocationNotSupported
from broker.providers.catalog import build_registry
from broker.providers.mint import Minter
from broker.server.app import Broker, start
from broker.storage.tables import integration_events, integrations
from tests.helpers.errors import error_info, expect_error
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.http import LoopbackServer, QuietHandler
from tests.helpers.leaks import error_texts, record_texts
from tests.helpers.receiver import Receiver, new_secret
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode
CANARY = "INTERNAL-RESPONSE-CANARY db_password=hunter2"
# What must never show: the canary's distinctive parts.
NEEDLES = ("INTERNAL-RESPONSE-CANARY", "hunter2")
KINDS = ["client_credentials", "service_account"]
SA_EMAIL = "robot@project.iam.gserviceaccount.com"


def _rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


SA_KEY = _rsa_pem()


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    body: bytes


class Hostile(LoopbackServer):
    """A server a caller would like the broker to talk to (an internal service, a metadata
    endpoint): records every request and answers with the canary, in the way ``mode`` says."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "description"
        self.hits: list[Hit] = []
        self.lock = threading.Lock()

    def answer(self) -> tuple[int, str, bytes]:
        if self.mode == "description":
            body = {
                "error": "invalid_request",
                "error_description": f"{CANARY}\nFORGED line " + "y" * 300 + " PAST-THE-CAP",
            }
            return 400, "application/json", json.dumps(body).encode()
        if self.mode == "code":
            # Code-like enough to pass a pattern check: only a list of known codes stops it.
            return 400, "application/json", b'{"error": "INTERNAL-RESPONSE-CANARY"}'
        if self.mode == "html200":
            return 200, "text/html", f"<html><p>{CANARY}</p></html>".encode()
        if self.mode == "json200":
            return 200, "application/json", json.dumps({"debug": CANARY}).encode()
        return 200, "application/json", b'{"access_token": "at-hostile", "expires_in": 600}'

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hostile = self

        class Handler(QuietHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with hostile.lock:
                    hostile.hits.append(Hit(self.command, self.path, body))
                status, content_type, answer = hostile.answer()
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_DELETE = do_PUT = _any

        return Handler

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/internal/token"

    def received(self) -> list[Hit]:
        with self.lock:
            return list(self.hits)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    with Hostile() as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=300)


def egress_settings(database_url: str, fake: FakeAuthServer, allowed: list[str]) -> Settings:
    return make_settings(
        database_url,
        providers={
            # No endpoint of its own: every credential must name one, from the list.
            "open": {"kinds": KINDS, "allowed_token_urls": allowed},
            # Its own endpoint (the fake): a credential may name nothing else.
            "fixed": {"kinds": KINDS, "token_url": fake.token_url},
        },
        refresh={"provider_timeout_seconds": 2, "max_attempts": 2},
        cache={"enabled": False},
    )


@pytest.fixture
async def running(
    database_url: str, fake: FakeAuthServer, hostile: Hostile
) -> AsyncIterator[Broker]:
    broker = await start(egress_settings(database_url, fake, []))
    yield broker
    await broker.stop(0)


@pytest.fixture
async def stub(running: Broker) -> AsyncIterator[pb_grpc.CredentialBrokerAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.CredentialBrokerStub(channel)


def credential(kind: str, **fields: Any) -> pb.Credential:
    message = pb.Credential()
    getattr(message, kind).SetInParent()
    json_format.ParseDict(fields, getattr(message, kind))
    return message


def key_file(token_uri: str) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "private_key_id": "kid-1",
            "private_key": SA_KEY,
            "client_email": SA_EMAIL,
            "token_uri": token_uri,
        }
    )


def client_credentials(token_url: str) -> pb.Credential:
    return credential("client_credentials", client_id="c", client_secret="s", token_url=token_url)


def service_account(token_url: str) -> pb.Credential:
    return credential("service_account", private_key=SA_KEY, issuer=SA_EMAIL, token_url=token_url)


async def store(
    stub: pb_grpc.CredentialBrokerAsyncStub, provider: str, cred: pb.Credential, user: str
) -> pb.Integration:
    response = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(user_id=user, provider=provider, credential=cred),
        metadata=ADMIN,
    )
    return response.integration


# -- StoreIntegration ---------------------------------------------------------------------------


async def test_a_credential_cannot_name_an_unlisted_token_endpoint(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    running: Broker,
    hostile: Hostile,
    fake: FakeAuthServer,
) -> None:
    url = hostile.token_url
    cases = [
        ("open", client_credentials(url), "credential.client_credentials.token_url"),
        ("fixed", client_credentials(url), "credential.client_credentials.token_url"),
        ("open", service_account(url), "credential.service_account.token_url"),
        ("fixed", service_account(url), "credential.service_account.token_url"),
        (
            "open",
            credential("service_account", json_key=key_file(url)),
            "credential.service_account.json_key.token_uri",
        ),
        # Looks like loopback to a naive check, goes to evil.example.
        (
            "open",
            client_credentials(f"http://127.0.0.1:{hostile.port}@evil.example/token"),
            "credential.client_credentials.token_url",
        ),
    ]
    for n, (provider, cred, field) in enumerate(cases):
        error = await expect_error(
            stub.StoreIntegration(
                pb.StoreIntegrationRequest(user_id=f"u{n}", provider=provider, credential=cred),
                metadata=ADMIN,
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            contains=field,
        )
        info = error_info(error)
        assert info is not None
        assert info.metadata["field"] == field
    async with running.engine.connect() as conn:
        assert (await conn.execute(select(integrations))).all() == []
    assert hostile.received() == []


async def test_a_key_files_unlisted_token_uri_gives_way_to_the_profiles(
    stub: pb_grpc.CredentialBrokerAsyncStub, hostile: Hostile, fake: FakeAuthServer
) -> None:
    # A downloaded key file always names its issuer's endpoint; a profile with its own serves
    # it, as before, and the file's endpoint is never used.
    fake.register_service_account(SA_EMAIL, _public(SA_KEY))
    stored = await store(
        stub, "fixed", credential("service_account", json_key=key_file(hostile.token_url)), "u"
    )
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=stored.id), metadata=ADMIN
    )
    assert got.refreshed
    assert fake.mint_calls == 1
    assert hostile.received() == []


def _public(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# -- mint time ----------------------------------------------------------------------------------


async def test_a_row_stored_under_an_older_allowlist_is_refused_at_mint(
    database_url: str, fake: FakeAuthServer, hostile: Hostile
) -> None:
    listed = await start(egress_settings(database_url, fake, [hostile.token_url]))
    try:
        async with broker_stub(listed.port) as stub:
            ids = [
                (await store(stub, "open", client_credentials(hostile.token_url), "u1")).id,
                (await store(stub, "open", service_account(hostile.token_url), "u2")).id,
            ]
    finally:
        await listed.stop(0)
    assert hostile.received() == [], "nothing is minted at StoreIntegration"

    # The operator takes the URL off the list: the rows are still there, and must not be sent.
    unlisted = await start(egress_settings(database_url, fake, []))
    try:
        async with broker_stub(unlisted.port) as stub:
            for iid, kind in zip(ids, KINDS, strict=True):
                error = await expect_error(
                    stub.GetAccessToken(
                        pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN
                    ),
                    Code.FAILED_PRECONDITION,
                    "PROVIDER_MISCONFIGURED",
                    contains="allowed_token_urls",
                )
                info = error_info(error)
                assert info is not None
                assert info.metadata["field"] == f"credential.{kind}.token_url"
    finally:
        await unlisted.stop(0)
    assert hostile.received() == []


# -- what a provider answers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("description", Code.FAILED_PRECONDITION),
        ("code", Code.FAILED_PRECONDITION),
        ("html200", Code.UNAVAILABLE),
        ("json200", Code.UNAVAILABLE),
    ],
)
async def test_a_providers_answer_never_reaches_the_caller(
    database_url: str,
    fake: FakeAuthServer,
    hostile: Hostile,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    code: grpc.StatusCode,
) -> None:
    caplog.set_level(logging.DEBUG)
    hostile.mode = mode
    broker = await start(egress_settings(database_url, fake, [hostile.token_url]))
    try:
        async with broker_stub(broker.port) as stub:
            errors = []
            for n, cred in enumerate(
                [client_credentials(hostile.token_url), service_account(hostile.token_url)]
            ):
                stored = await store(stub, "open", cred, f"user-{n}")
                for _ in range(2):
                    errors.append(
                        await expect_error(
                            stub.GetAccessToken(
                                pb.GetAccessTokenRequest(integration_id=stored.id),
                                metadata=ADMIN,
                            ),
                            code,
                        )
                    )
            async with broker.engine.connect() as conn:
                rows = [
                    repr(row._mapping)
                    for table in (integrations, integration_events)
                    for row in (await conn.execute(select(table))).all()
                ]
    finally:
        await broker.stop(0)
    assert hostile.received(), "the listed endpoint was asked"
    texts = [text for error in errors for text in error_texts(error)] + rows
    leaks = [text for text in texts for needle in NEEDLES if needle in text]
    assert leaks == []
    logged = [text for record in caplog.records for text in record_texts(record)]
    if mode in ("description", "code"):
        # The operator's log gets the provider's error and description: one line, capped, so a
        # provider can neither forge a log line nor flood the log. A body, never.
        lines = [r.getMessage() for r in caplog.records if "INTERNAL-RESPONSE" in r.getMessage()]
        assert lines
        assert all("\n" not in line and "PAST-THE-CAP" not in line for line in lines)
    else:
        assert [text for text in logged for needle in NEEDLES if needle in text] == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_every_unreachable_endpoint_reads_the_same(
    database_url: str, fake: FakeAuthServer
) -> None:
    # A closed port refuses at once; a port whose backlog is full never answers the SYN
    # (connect timeout). A caller must not be able to tell them apart.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)
    urls = [
        f"http://127.0.0.1:{_closed_port()}/token",
        f"http://127.0.0.1:{full.getsockname()[1]}/token",
    ]
    settings = make_settings(
        database_url,
        providers={"open": {"kinds": KINDS, "allowed_token_urls": urls}},
        refresh={
            "provider_timeout_seconds": 2,
            "provider_connect_timeout_seconds": 0.3,
            "max_attempts": 1,
        },
    )
    broker = await start(settings)
    try:
        async with broker_stub(broker.port) as stub:
            seen = []
            for n, url in enumerate(urls):
                stored = await store(stub, "open", client_credentials(url), f"user-{n}")
                error = await expect_error(
                    stub.GetAccessToken(
                        pb.GetAccessTokenRequest(integration_id=stored.id), metadata=ADMIN
                    ),
                    Code.UNAVAILABLE,
                    "PROVIDER_UNAVAILABLE",
                )
                info = error_info(error)
                assert info is not None
                metadata = dict(info.metadata)
                metadata.pop("integration_id", None)
                seen.append((error.details(), metadata))
    finally:
        await broker.stop(0)
        for sock in [full, *fillers]:
            sock.close()
    assert seen[0] == seen[1], seen
    assert "could not reach open" in (seen[0][0] or "")
    for port in (url.rsplit(":", 1)[1] for url in urls):
        assert port.split("/")[0] not in (seen[0][0] or "")


# -- configuration --------------------------------------------------------------------------


def test_user_information_in_a_configured_url_is_refused() -> None:
    trick = "http://127.0.0.1:80@evil.example/hook"
    with pytest.raises(ValidationError, match="user information"):
        Settings.model_validate({"webhooks": {"app": {"url": trick, "secret_env": "S"}}})
    with pytest.raises(ConfigError, match=r"webhooks\.app\.url: must not contain user"):
        load_settings(env={"BROKER_CONFIG": ""}, config_path=_toml(trick))
    for key in ("token_url", "revocation_url"):
        data = {"token_url": "https://a.test/t", "client_id": "c", "client_secret": "s"}
        with pytest.raises(ConfigError, match=rf"providers\.acme\.{key}: must not contain user"):
            build_registry(_providers({"acme": {**data, key: trick}}), {})
    with pytest.raises(ConfigError, match=r"providers\.acme\.allowed_token_urls: must be an https"):
        build_registry(
            Settings.model_validate(
                {"providers": {"acme": {"kinds": KINDS, "allowed_token_urls": ["ftp://x/t"]}}}
            ).providers,
            {},
        )


def _providers(data: dict[str, Any]) -> dict[str, ProviderSettings]:
    return Settings.model_validate({"providers": data}).providers


def _toml(url: str) -> Path:
    path = Path(tempfile.mkdtemp()) / "broker.toml"
    path.write_text(f'[webhooks.app]\nurl = "{url}"\nsecret_env = "S"\n', encoding="utf-8")
    return path


def test_allowed_token_urls_compare_as_parsed() -> None:
    profile = ProviderProfile(
        name="p", token_url="https://auth.test/t", allowed_token_urls=("https://Tenant.test/t",)
    )
    assert profile.allows_token_url("https://auth.test:443/t")
    assert profile.allows_token_url("HTTPS://tenant.test/t")
    assert not profile.allows_token_url("https://tenant.test/t?x=1")
    assert not profile.allows_token_url("https://tenant.test:8443/t")
    assert not profile.allows_token_url("https://u@tenant.test/t")
    assert not profile.allows_token_url("http://tenant.test/t")


# -- one way out ----------------------------------------------------------------------------


async def test_every_provider_and_webhook_request_leaves_through_egress(
    monkeypatch: pytest.MonkeyPatch, fake: FakeAuthServer
) -> None:
    sent: list[tuple[str, bool]] = []
    original = httpx.AsyncClient.send
    through = egress.send.__code__

    async def spy(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        frame = sys._getframe(1)
        found = False
        while frame is not None:
            found = found or frame.f_code is through
            frame = frame.f_back  # type: ignore[assignment]
        sent.append((f"{request.method} {request.url.path}", found))
        return await original(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", spy)
    fake.register_service_account(SA_EMAIL, _public(SA_KEY))
    profile = ProviderProfile(
        name="fake",
        token_url=fake.token_url,
        revocation_url=fake.revocation_url,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        api_url=fake.api_url,
    )
    github = ProviderProfile(
        name="gh",
        token_url=fake.token_url,
        revocation_url=fake.url + "/applications/{client_id}/grant",
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        quirks=frozenset({Quirk.GITHUB_REVOCATION}),
    )
    async with httpx.AsyncClient() as http:
        client = OAuthClient(http, timeout=2)
        minter = Minter(client)
        _, refresh = fake.issue_grant()
        await client.refresh(profile, refresh)
        await client.revoke(profile, refresh, "refresh_token")
        for attempt in (
            client.exchange_code(profile, "no-such-code", "https://app.test/cb", None),
            client.revoke(github, "at"),
            minter.mint(
                profile,
                "client_credentials",
                {
                    "client_id": fake.client_id,
                    "client_secret": fake.client_secret,
                    "scopes": [],
                    "audience": "",
                    "resource": "",
                    "token_url": "",
                    "auth_method": "",
                },
            ),
            minter.mint(
                profile,
                "service_account",
                {
                    "private_key": SA_KEY,
                    "algorithm": "RS256",
                    "key_id": "",
                    "issuer": SA_EMAIL,
                    "subject": "",
                    "scopes": [],
                    "token_url": "",
                    "audience": "",
                },
            ),
            minter.mint(
                profile,
                "github_app_installation",
                {
                    "app_id": "1",
                    "installation_id": "2",
                    "private_key": SA_KEY,
                    "repositories": [],
                    "permissions": {},
                },
            ),
            minter.revoke_installation_token(profile, "ghs_x"),
        ):
            # The answers do not matter here, only the way the requests left.
            with contextlib.suppress(BrokerError, RevocationNotSupported):
                await attempt
    with Receiver() as receiver:
        hooks = Settings.model_validate(
            {"webhooks": {"app": {"url": receiver.url, "secret_env": "WH"}}}
        ).webhooks
        endpoints = build_endpoints(hooks, {"WH": new_secret()})
        event = Event(
            id=1,
            occurred_at=datetime.now(UTC),
            integration_id="i-1",
            user_id="u",
            provider="p",
            account_id="",
            type=EventType.CONNECTED,
            reason="TEST",
            message="m",
            failure_count=None,
            revocation=None,
        )
        dispatcher = WebhookDispatcher(None, endpoints, None, "me", 1.0)  # type: ignore[arg-type]
        try:
            assert (await dispatcher.send(endpoints[0], event)) == (200, None)
        finally:
            await dispatcher.close()
        assert len(receiver.received()) == 1
    assert len(sent) >= 9, sent
    assert [what for what, found in sent if not found] == []


def test_no_module_sends_on_an_http_client_but_egress() -> None:
    """The static half: a call like ``self._http.post(...)`` anywhere else would bypass the
    destination rules."""
    root = Path(__file__).resolve().parents[1] / "broker"
    verbs = {"send", "request", "stream", "get", "post", "put", "patch", "delete", "head"}
    offenders = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root.parent)
        if path.name == "egress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in verbs
                and "http" in ast.unparse(node.func.value).lower()
            ):
                offenders.append(f"{relative}:{node.lineno}: {ast.unparse(node.func)}")
    assert offenders == []
