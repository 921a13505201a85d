"""The canary test: run the broker's flows with unique, recognisable secrets — access and
refresh tokens, the provider's client secret, the caller's bearer token, PKCE state and code —
with every logger at DEBUG, then look for them (and their usual encodings) in every captured
log line (plain and JSON-formatted), every gRPC error the flows produced, and every
audit_events row. Then the same through a real broker process's stderr at
BROKER_LOG_LEVEL=DEBUG with JSON logs."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import grpc
import httpx
import pytest
from sqlalchemy import select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from broker.storage.tables import audit_events, integration_events, integrations
from tests.helpers.fakes import FakeAuthServer, Grant, serve_fake
from tests.helpers.leaks import error_texts, record_texts, scan
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.receiver import Receiver
from tests.helpers.settings import ENVIRONMENT, KEYS, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode
CALLBACK = "https://app.example.test/oauth/callback"
SECRET_ENV = "CANARY_TEST_ACME_CLIENT_SECRET"
WEBHOOK_SECRET_ENV = "CANARY_TEST_WEBHOOK_SECRET"


class Canaries:
    """Every secret of one test run, each unique and easy to grep for."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex
        self.access = f"CANARY-AT-{tag}"
        self.refresh = f"CANARY-RT-{tag}"
        self.access_b = f"CANARY-AT-B-{tag}"
        self.refresh_b = f"CANARY-RT-B-{tag}"
        self.client_secret = f"CANARY-CS-{tag}"
        self.bearer = f"CANARY-BEARER-{tag}"
        self.wrong_bearer = f"CANARY-WRONG-BEARER-{tag}"
        self.oversized = f"CANARY-BIG-{tag}" + "x" * (70 * 1024)
        # A Standard Webhooks secret whose decoded key is itself a canary.
        self.webhook_key = f"CANARY-WH-{tag}"
        self.webhook_secret = "whsec_" + base64.b64encode(self.webhook_key.encode()).decode()
        self.extra: set[str] = set()  # issued by the fake during the run, PKCE state and code

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.bearer}"),)

    def all(self, fake: FakeAuthServer) -> set[str]:
        with fake._lock:  # every token the fake ever issued is a secret too
            issued = set(fake._access) | set(fake._grants)
        return {
            self.access,
            self.refresh,
            self.access_b,
            self.refresh_b,
            self.client_secret,
            self.bearer,
            self.wrong_bearer,
            self.oversized[:200],
            self.webhook_key,
            self.webhook_secret,
            *self.extra,
            *issued,
        }

    def needles(self, fake: FakeAuthServer) -> dict[str, str]:
        """Each secret and the forms a careless log line might carry it in → what it is."""
        found: dict[str, str] = {}
        for secret in self.all(fake):
            for form in (secret, quote(secret), quote_plus(secret)):
                found[form] = secret
            found[base64.b64encode(secret.encode()).decode().rstrip("=")] = secret
        basic = base64.b64encode(f"{fake.client_id}:{self.client_secret}".encode()).decode()
        found[basic] = "client credentials (HTTP Basic)"
        return found


def plant_grant(fake: FakeAuthServer, access: str, refresh: str) -> None:
    """Make the fake know our canary pair as one of its grants, so refresh and revocation of
    the canaries happen for real."""
    with fake._lock:
        grant = Grant(("read",), None, refresh)
        grant.access_tokens.add(access)
        fake._grants[refresh] = grant
        fake._access[access] = grant


class Recorder:
    """Runs calls and keeps every gRPC error they raised."""

    def __init__(self) -> None:
        self.errors: list[grpc.aio.AioRpcError] = []

    async def fails(self, call: Awaitable[Any], code: Code) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        self.errors.append(caught.value)
        assert caught.value.code() == code, f"{caught.value.code()} {caught.value.details()}"
        return caught.value


# -- in process -----------------------------------------------------------------------------


@pytest.fixture
def canaries() -> Canaries:
    return Canaries()


@pytest.fixture
def fake(canaries: Canaries) -> Iterator[FakeAuthServer]:
    yield from serve_fake(client_secret=canaries.client_secret, expires_in=3600)


@pytest.fixture
def settings(
    database_url: str,
    fake: FakeAuthServer,
    canaries: Canaries,
    monkeypatch: pytest.MonkeyPatch,
    receiver: Receiver,
) -> Settings:
    monkeypatch.setenv(SECRET_ENV, canaries.client_secret)
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, canaries.webhook_secret)
    return make_settings(
        database_url,
        providers={
            "acme": {
                "token_url": fake.token_url,
                "authorization_url": fake.authorization_url,
                "revocation_url": fake.revocation_url,
                "client_id": fake.client_id,
                "client_secret_env": SECRET_ENV,
                "redirect_uris": [CALLBACK],
                "scopes": ["read"],
                "rotates_refresh_tokens": True,
            }
        },
        callers={"canary": {"token_sha256": hash_token(canaries.bearer)}},
        # No pause after the unknown outcome ("garbage"): the flow goes on to invalid_grant.
        refresh={
            "provider_timeout_seconds": 2,
            "max_attempts": 1,
            "background": False,
            "outcome_unknown_retry_seconds": 0,
            # The failures below follow each other at once: no back-off between them.
            "failure_backoff_seconds": 0.001,
        },
        logging={"level": "DEBUG", "access_log_level": "DEBUG"},
        webhooks={
            "app": {"url": receiver.url, "secret_env": WEBHOOK_SECRET_ENV, "timeout_seconds": 2}
        },
        events={"poll_seconds": 0.1},
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
async def broker(settings: Settings, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Broker]:
    # Everything at DEBUG from before start-up, libraries included.
    caplog.set_level(logging.DEBUG)
    for name in ("broker", "broker.access", "httpx", "httpcore", "grpc"):
        caplog.set_level(logging.DEBUG, logger=name)
    running = await start(settings)
    yield running
    await running.stop(0)


async def consent(url: str) -> dict[str, str]:
    """The user's browser, which is not the broker: its own HTTP logging (the redirect carries
    state and code) is switched off while it runs; the broker is idle meanwhile."""
    quiet = [
        logging.getLogger(name)
        for name in ["httpx", "httpcore", *logging.root.manager.loggerDict]
        if name.split(".")[0] in ("httpx", "httpcore")
    ]
    for logger in quiet:
        logger.disabled = True
    try:
        async with httpx.AsyncClient(follow_redirects=False) as http:
            response = await http.get(url)
    finally:
        for logger in quiet:
            logger.disabled = False
    assert response.status_code == 302, response.text
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}


async def run_flows(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    canaries: Canaries,
    recorder: Recorder,
) -> None:
    md = canaries.metadata
    plant_grant(fake, canaries.access, canaries.refresh)
    plant_grant(fake, canaries.access_b, canaries.refresh_b)

    # Store (already expired, so the first GetAccessToken refreshes at the fake).
    stored = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="user-1",
            provider="acme",
            access_token=canaries.access,
            refresh_token=canaries.refresh,
            expires_in_seconds=0,
            scopes=["read"],
        ),
        metadata=md,
    )
    iid = stored.integration.id
    first = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=md)
    assert first.refreshed
    again = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-1", provider="acme", force_refresh=True),
        metadata=md,
    )
    assert again.refreshed
    assert fake.refresh_calls == 2
    listed = await stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"), metadata=md)
    assert [i.id for i in listed.integrations] == [iid]
    await stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=md)

    # Failing calls.
    await recorder.fails(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid),
            metadata=(("authorization", f"Bearer {canaries.wrong_bearer}"),),
        ),
        Code.UNAUTHENTICATED,
    )
    await recorder.fails(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid),
            metadata=(("authorization", canaries.wrong_bearer),),  # no scheme
        ),
        Code.UNAUTHENTICATED,
    )
    await recorder.fails(
        stub.StoreIntegration(
            pb.StoreIntegrationRequest(
                user_id="user-1", provider="acme", access_token=canaries.oversized
            ),
            metadata=md,
        ),
        Code.INVALID_ARGUMENT,
    )
    await recorder.fails(
        stub.StoreIntegration(
            pb.StoreIntegrationRequest(
                user_id="user-1",
                provider="no-such-provider",
                access_token=canaries.access_b,
                refresh_token=canaries.refresh_b,
            ),
            metadata=md,
        ),
        Code.INVALID_ARGUMENT,
    )
    # A second integration whose refresh the provider refuses, then one it cannot serve.
    b = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="user-2",
            provider="acme",
            access_token=canaries.access_b,
            refresh_token=canaries.refresh_b,
            expires_in_seconds=0,
        ),
        metadata=md,
    )
    fake.fail_next("unavailable")
    await recorder.fails(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=b.integration.id), metadata=md),
        Code.UNAVAILABLE,
    )
    fake.fail_next("garbage")
    await recorder.fails(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=b.integration.id), metadata=md),
        Code.UNAVAILABLE,
    )
    fake.fail_next("invalid_grant")
    await recorder.fails(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=b.integration.id), metadata=md),
        Code.FAILED_PRECONDITION,
    )

    # Disconnect: the provider is down first (PENDING), then the retry revokes.
    fake.fail_next("unavailable", path="/revoke")
    gone = await stub.Disconnect(
        pb.DisconnectRequest(integration_id=iid, reason="canary test"), metadata=md
    )
    assert gone.revocation == pb.REVOCATION_OUTCOME_PENDING
    await recorder.fails(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=md),
        Code.FAILED_PRECONDITION,
    )
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == iid)
            .values(next_revocation_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert await broker.runtime.revoker.retry_pending() == 1
    assert not fake.is_grant_active(canaries.refresh)
    assert [r.path for r in fake.requests].count("/revoke") == 3

    # PKCE: Begin, the user's consent, Complete; then a code used twice.
    begun = await stub.BeginAuthorization(
        pb.BeginAuthorizationRequest(user_id="user-3", provider="acme", redirect_uri=CALLBACK),
        metadata=md,
    )
    canaries.extra.add(begun.state)
    callback = await consent(begun.authorization_url)
    canaries.extra.add(callback["code"])
    done = await stub.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(
            state=callback["state"], code=callback["code"], user_id="user-3"
        ),
        metadata=md,
    )
    assert done.integration.user_id == "user-3"
    await recorder.fails(
        stub.CompleteAuthorization(
            pb.CompleteAuthorizationRequest(
                state=callback["state"], code=callback["code"], user_id="user-3"
            ),
            metadata=md,
        ),
        Code.FAILED_PRECONDITION,
    )


async def test_no_canary_in_logs_errors_or_audit_rows(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    canaries: Canaries,
    caplog: pytest.LogCaptureFixture,
    receiver: Receiver,
) -> None:
    recorder = Recorder()
    await run_flows(stub, broker, fake, canaries, recorder)
    # Failure audit events are written after the status has left; let them land.
    await asyncio.sleep(0.2)
    async with broker.engine.connect() as conn:
        event_rows = (await conn.execute(select(integration_events))).all()
    for _ in range(200):  # every event delivered to the webhook
        if len(receiver.delivered_ids()) >= len(event_rows):
            break
        await asyncio.sleep(0.05)
    needles = canaries.needles(fake)
    # Ours (8), PKCE state and code, and the fake's: 2 refreshes and the PKCE grant.
    assert len(canaries.all(fake)) >= 8 + 2 + 2 * 2 + 2

    leaks: list[str] = []
    records = list(caplog.records)
    for record in records:
        for text in record_texts(record):
            leaks += scan(text, needles, f"log record {record.name}")
    for error in recorder.errors:
        for text in error_texts(error):
            leaks += scan(text, needles, f"gRPC error {error.code().name}")
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(audit_events))).all()
    for row in rows:
        leaks += scan(repr(tuple(row)), needles, "audit_events")
    for row in event_rows:
        leaks += scan(repr(tuple(row)), needles, "integration_events")
    hooks = receiver.received()
    for request in hooks:
        leaks += scan(request.body.decode() + repr(request.headers), needles, "webhook request")
    assert not leaks, "\n".join(sorted(set(leaks)))
    # Events of the flows were written and went out by webhook.
    assert len(event_rows) >= 5
    assert len(receiver.delivered_ids()) == len(event_rows)

    # The scan looked at something: the flows were logged, errored and audited.
    messages = [r.getMessage() for r in records]
    access = [r for r in records if r.name == "broker.access"]
    assert len(access) >= 15, "one access-log line per RPC at DEBUG"
    assert any("rpc GetAccessToken" in m and "UNAUTHENTICATED" in m for m in messages)
    assert any(r.name == "broker.revocation" for r in records)
    assert len(recorder.errors) == 9
    assert {r.method for r in rows} >= {
        "StoreIntegration",
        "GetAccessToken",
        "ListIntegrations",
        "GetIntegration",
        "Disconnect",
        "BeginAuthorization",
        "CompleteAuthorization",
    }


# -- a broker process -------------------------------------------------------------------------


async def test_no_canary_in_a_broker_process_debug_log(
    database_url: str, tmp_path: Path, canaries: Canaries, fake: FakeAuthServer
) -> None:
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": database_url},
            "refresh": {"background": False, "max_attempts": 1, "provider_timeout_seconds": 2},
            "logging": {"access_log_level": "DEBUG"},
            "callers": {"canary": {"token_sha256": hash_token(canaries.bearer)}},
            "providers": {
                "acme": {
                    "token_url": fake.token_url,
                    "revocation_url": fake.revocation_url,
                    "client_id": fake.client_id,
                    "client_secret_env": SECRET_ENV,
                    "rotates_refresh_tokens": True,
                }
            },
        },
    )
    env = {
        "BROKER_KEYS": KEYS,
        SECRET_ENV: canaries.client_secret,
        "BROKER_LOG_LEVEL": "DEBUG",
        "BROKER_LOG_FORMAT": "json",
    }
    process = BrokerProcess(config, env)
    await process.start()
    recorder = Recorder()
    md = canaries.metadata
    try:
        plant_grant(fake, canaries.access, canaries.refresh)
        async with broker_stub(process.port) as stub:
            stored = await stub.StoreIntegration(
                pb.StoreIntegrationRequest(
                    user_id="user-1",
                    provider="acme",
                    access_token=canaries.access,
                    refresh_token=canaries.refresh,
                    expires_in_seconds=0,
                ),
                metadata=md,
            )
            iid = stored.integration.id
            got = await stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=iid), metadata=md
            )
            assert got.refreshed
            await stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"), metadata=md)
            await recorder.fails(
                stub.GetAccessToken(
                    pb.GetAccessTokenRequest(integration_id=iid),
                    metadata=(("authorization", f"Bearer {canaries.wrong_bearer}"),),
                ),
                Code.UNAUTHENTICATED,
            )
            fake.fail_next("invalid_client")
            await recorder.fails(
                stub.GetAccessToken(
                    pb.GetAccessTokenRequest(integration_id=iid, force_refresh=True), metadata=md
                ),
                Code.FAILED_PRECONDITION,
            )
            gone = await stub.Disconnect(pb.DisconnectRequest(integration_id=iid), metadata=md)
            assert gone.revocation == pb.REVOCATION_OUTCOME_REVOKED
            await recorder.fails(
                stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=md),
                Code.FAILED_PRECONDITION,
            )
    finally:
        code = await process.stop()
    assert code == 0
    assert not fake.is_grant_active(canaries.refresh)

    needles = canaries.needles(fake)
    leaks: list[str] = []
    for line in process.log:
        leaks += scan(line, needles, "broker stderr")
    for error in recorder.errors:
        for text in error_texts(error):
            leaks += scan(text, needles, f"gRPC error {error.code().name}")
    assert not leaks, "\n".join(sorted(set(leaks)))
    # DEBUG JSON lines were there to be searched: the access log of every call among them.
    access = [line for line in process.log if '"logger": "broker.access"' in line]
    assert len(access) >= 7, "\n".join(process.log)
    assert any('"code": "UNAUTHENTICATED"' in line for line in access)
