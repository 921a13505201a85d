"""Keep-alive: a grant nobody uses is refreshed before its refresh token lapses from disuse; a
refresh token with its own expiry is tracked, renewed where the provider rotates, and an
unrenewable one gets one INTEGRATION_EXPIRING event before it lapses; last_used_at is written
in batches, without a version bump.

The broker's clock is the test's (the background pass is driven by the test), so half a year
takes no time; the fake authorization server is real.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic import command
from prometheus_client import REGISTRY
from sqlalchemy import Connection, insert, inspect, select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings, Settings
from broker.server.app import Broker, start
from broker.storage import schema
from broker.storage.engine import create_engine
from broker.storage.tables import integrations
from tests.helpers import cli
from tests.helpers.authorization import begin, complete, consent
from tests.helpers.clock import FakeClock
from tests.helpers.errors import expect_error
from tests.helpers.events import all_events
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.integrations import row, store_grant
from tests.helpers.providers import CALLBACK, endpoints
from tests.helpers.settings import ADMIN, ENVIRONMENT, make_settings
from tests.helpers.stubs import broker_stub

T = pb.IntegrationEventType
IDLE = 3600  # the provider's refresh_token_idle_lifetime_seconds
PASS = timedelta(seconds=30)  # refresh.background_interval_seconds (the default)
MONTH = 30 * 86400
DAY = timedelta(days=1)
ISO_8601 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    # Access tokens that live a month: only the refresh token's upkeep makes a pass refresh.
    yield from serve_fake(expires_in=MONTH)


def acme(fake: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    """Acme rotating refresh tokens with an idle lifetime; an ``extra`` of None drops a key."""
    values = {
        **endpoints(fake),
        "redirect_uris": [CALLBACK],
        "scopes": ["read"],
        "rotates_refresh_tokens": True,
        "refresh_token_idle_lifetime_seconds": IDLE,
        **extra,
    }
    return {"acme": {k: v for k, v in values.items() if v is not None}}


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(database_url, providers=acme(fake), refresh={"background": False})


@pytest.fixture
async def broker(settings: Settings, clock: FakeClock) -> AsyncIterator[Broker]:
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


def keepalives(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "broker_keepalive_refresh_total", {"provider": "acme", "outcome": outcome}
    )
    return value or 0.0


async def test_an_unused_grant_is_refreshed_before_half_its_idle_lifetime_once_per_period(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, clock: FakeClock
) -> None:
    iid, _, refresh = await store_grant(stub, fake, expires_in=MONTH)
    stored_at = clock.now
    ok = keepalives("ok")
    # Nobody asks for its access token; a pass now, and one just before the keep-alive is due.
    await broker.refresher.background_pass()
    clock.advance(timedelta(seconds=IDLE / 2) - 2 * PASS)
    await broker.refresher.background_pass()
    assert fake.refresh_calls == 0
    # The pass before half the idle lifetime has passed refreshes it, once.
    clock.advance(PASS + timedelta(seconds=1))
    await broker.refresher.background_pass()
    assert fake.refresh_calls == 1
    assert clock.now - stored_at < timedelta(seconds=IDLE / 2)
    assert keepalives("ok") == ok + 1
    kept = await row(broker, iid)
    assert kept.refresh_token_used_at == clock.now
    assert kept.integration.version == 2
    assert fake.is_grant_active(refresh)
    # Not again in the same period, however many passes run.
    for _ in range(5):
        clock.advance(PASS)
        await broker.refresher.background_pass()
    assert fake.refresh_calls == 1
    # ... and once in the next.
    clock.advance(timedelta(seconds=IDLE / 2))
    await broker.refresher.background_pass()
    assert fake.refresh_calls == 2
    assert keepalives("ok") == ok + 2


async def test_serving_the_access_token_does_not_keep_the_refresh_token_alive(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, clock: FakeClock
) -> None:
    # The provider's idle clock counts uses of the refresh token, not of the access token.
    iid, _, _ = await store_grant(stub, fake, expires_in=MONTH)
    clock.advance(timedelta(seconds=IDLE / 2))
    await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert fake.refresh_calls == 0
    await broker.refresher.background_pass()
    assert fake.refresh_calls == 1


async def test_refresh_token_expiry_is_tracked_on_exchange_and_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, clock: FakeClock
) -> None:
    fake.refresh_token_expires_in = 40 * 86400
    # The code exchange's answer.
    flow = await begin(stub)
    callback = await consent(flow.authorization_url)
    done = await complete(stub, state=callback["state"], code=callback["code"])
    iid = done.integration.id
    first = clock.now + timedelta(days=40)
    assert done.integration.refresh_token_expires_at.ToDatetime().timestamp() == pytest.approx(
        first.timestamp(), abs=1
    )
    assert (await row(broker, iid)).integration.refresh_token_expires_at == first
    # A refresh that rotates: the new refresh token's own expiry.
    clock.advance(DAY)
    await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid, force_refresh=True), metadata=ADMIN
    )
    second = clock.now + timedelta(days=40)
    assert (await row(broker, iid)).integration.refresh_token_expires_at == second
    # A refresh that keeps the refresh token (no refresh_token, no refresh_token_expires_in
    # in the answer): it keeps its expiry.
    fake.omit_refresh_token = True
    clock.advance(DAY)
    await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid, force_refresh=True), metadata=ADMIN
    )
    kept = await row(broker, iid)
    assert kept.integration.version == 3
    assert kept.integration.refresh_token_expires_at == second
    shown = await stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN)
    assert shown.integration.refresh_token_expires_at.ToDatetime().timestamp() == pytest.approx(
        second.timestamp(), abs=1
    )


async def test_store_integration_takes_a_refresh_token_expiry_checked_like_expires_at(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, clock: FakeClock
) -> None:
    iid, _, _ = await store_grant(stub, fake, refresh_token_expires_in_seconds=86400)
    assert (await row(broker, iid)).integration.refresh_token_expires_at == clock.now + DAY
    access, refresh = fake.issue_grant()
    base: dict[str, Any] = {"user_id": "u2", "provider": "acme", "access_token": access}
    for fields in (
        {"refresh_token_expires_in_seconds": -1, "refresh_token": refresh},
        {"refresh_token_expires_in_seconds": 60},
    ):
        await expect_error(
            stub.StoreIntegration(pb.StoreIntegrationRequest(**base, **fields), metadata=ADMIN),
            grpc.StatusCode.INVALID_ARGUMENT,
            contains="refresh_token_expires_in_seconds",
        )


async def test_an_unrenewable_refresh_token_gets_one_expiring_event_before_it_lapses(
    database_url: str, fake: FakeAuthServer, clock: FakeClock
) -> None:
    # A provider that does not rotate refresh tokens (LinkedIn-like, absolute expiry).
    async with running(database_url, fake, clock, rotates_refresh_tokens=False) as (broker, stub):
        iid, _, _ = await store_grant(
            stub, fake, expires_in=MONTH, refresh_token_expires_in_seconds=10 * 86400
        )
        lapses = clock.now + timedelta(days=10)
        await broker.refresher.background_pass()
        assert await expiring(stub) == []
        # Seven days before it lapses (refresh.expiring_notice_seconds): one event.
        clock.advance(timedelta(days=3))
        await broker.refresher.background_pass()
        assert await expiring(stub) == [iid]
        for _ in range(3):
            clock.advance(timedelta(hours=6))
            await broker.refresher.background_pass()
        assert await expiring(stub) == [iid]
        assert clock.now < lapses
        # Nothing was sent to the provider: refreshing would not renew it.
        assert fake.refresh_calls == 0
        # The user connected again: a new expiry, its own event in time.
        await store_grant(stub, fake, expires_in=MONTH, refresh_token_expires_in_seconds=2 * 86400)
        await broker.refresher.background_pass()
        assert await expiring(stub) == [iid, iid]
        events = await all_events(stub, types=[T.INTEGRATION_EVENT_TYPE_EXPIRING])
        assert events[-1].reason == "REFRESH_TOKEN_EXPIRING"


async def test_a_rotating_provider_renews_the_refresh_token_before_it_lapses(
    database_url: str, fake: FakeAuthServer, clock: FakeClock
) -> None:
    fake.refresh_token_expires_in = 10 * 86400
    async with running(database_url, fake, clock) as (broker, stub):
        iid, _, _ = await store_grant(
            stub, fake, expires_in=MONTH, refresh_token_expires_in_seconds=10 * 86400
        )
        await broker.refresher.background_pass()
        assert fake.refresh_calls == 0
        # Half its life left (less than the notice time): a refresh renews it, and no event.
        clock.advance(timedelta(days=5))
        await broker.refresher.background_pass()
        assert fake.refresh_calls == 1
        renewed = await row(broker, iid)
        assert renewed.integration.refresh_token_expires_at == clock.now + timedelta(days=10)
        assert await expiring(stub) == []
        # Once a refresh no longer extends it, the application hears of it, once.
        fake.refresh_token_expires_in = None
        fake.omit_refresh_token = True
        clock.advance(timedelta(days=5))
        await broker.refresher.background_pass()
        assert fake.refresh_calls == 2
        assert await expiring(stub) == [iid]
        clock.advance(timedelta(hours=1))
        await broker.refresher.background_pass()
        assert fake.refresh_calls == 2
        assert await expiring(stub) == [iid]


async def test_a_renewal_that_keeps_failing_writes_one_expiring_event_and_goes_on(
    database_url: str, fake: FakeAuthServer, clock: FakeClock
) -> None:
    fake.refresh_token_expires_in = 10 * 86400
    async with running(database_url, fake, clock) as (broker, stub):
        iid, _, _ = await store_grant(
            stub, fake, expires_in=MONTH, refresh_token_expires_in_seconds=10 * 86400
        )
        lapses = clock.now + timedelta(days=10)
        # The provider answers 503 to every refresh from here on.
        fake.fail_always("unavailable")
        clock.advance(timedelta(days=5))
        await broker.refresher.background_pass()
        failed = await row(broker, iid)
        assert failed.refresh_failures > 0
        assert failed.integration.refresh_token_expires_at == lapses
        # The renewal failed within the notice time: the application hears of it now.
        assert await expiring(stub) == [iid]
        # Renewal goes on after each back-off, still failing: no second event.
        sent = len(fake.requests)
        for _ in range(3):
            clock.advance(timedelta(hours=2))
            await broker.refresher.background_pass()
        assert len(fake.requests) > sent
        assert await expiring(stub) == [iid]
        # The provider recovers: the next attempt renews it.
        fake.reset_failures()
        clock.advance(timedelta(hours=2))
        await broker.refresher.background_pass()
        renewed = await row(broker, iid)
        assert renewed.refresh_failures == 0
        assert renewed.integration.refresh_token_expires_at == clock.now + timedelta(days=10)
        assert await expiring(stub) == [iid]


async def test_last_used_at_is_written_in_batches_without_a_version_bump(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, clock: FakeClock
) -> None:
    iid, _, _ = await store_grant(stub, fake, expires_in=MONTH)
    used_at = clock.now
    for _ in range(3):
        await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    # No write on the call path.
    assert (await row(broker, iid)).integration.last_used_at is None
    usage = broker.runtime.service.usage
    assert usage is not None
    assert await usage.flush() == 1
    stored = await row(broker, iid)
    assert stored.integration.last_used_at == used_at
    assert stored.integration.version == 1, "no version bump: a refresh's CAS still holds"
    shown = await stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN)
    assert shown.integration.last_used_at.ToDatetime().timestamp() == pytest.approx(
        used_at.timestamp(), abs=0.001
    )
    # Used again within the flush precision: nothing to write.
    clock.advance(timedelta(seconds=5))
    await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert await usage.flush() == 0
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN
    )
    assert listed.integrations[0].HasField("last_used_at")


def _at_0010_with_a_grant(connection: Connection, stamp: Any) -> None:
    command.downgrade(schema._config(connection), "0010")
    columns = {c["name"] for c in inspect(connection).get_columns("integrations")}
    assert "refresh_token_used_at" not in columns
    connection.execute(
        insert(integrations).values(  # the columns 0010 has
            id="old-1",
            user_id="u",
            provider="acme",
            account_id="",
            status="CONNECTED",
            refresh_token_ct=b"x",
            scopes=[],
            metadata={},
            created_at=stamp,
            updated_at=stamp,
        )
    )


async def test_migration_0011_upgrades_an_existing_database(
    database_url: str, clock: FakeClock
) -> None:
    engine = create_engine(DatabaseSettings(url=database_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_at_0010_with_a_grant, clock.now)
        assert await schema.migrate(engine, ENVIRONMENT) == schema.head_revision()
        async with engine.connect() as conn:
            found = (
                await conn.execute(
                    select(
                        integrations.c.refresh_token_used_at,
                        integrations.c.refresh_token_expires_at,
                        integrations.c.last_used_at,
                    ).where(integrations.c.id == "old-1")
                )
            ).one()
        # The idle clock of an existing grant starts at its last write.
        assert found[0] is not None
        assert found[0].replace(tzinfo=None) == clock.now.replace(tzinfo=None)
        assert found[1] is None
        assert found[2] is None
    finally:
        await engine.dispose()


async def expiring(stub: pb_grpc.CredentialBrokerAsyncStub) -> list[str]:
    events = await all_events(stub, types=[T.INTEGRATION_EVENT_TYPE_EXPIRING])
    return [e.integration_id for e in events]


@contextlib.asynccontextmanager
async def running(
    database_url: str, fake: FakeAuthServer, clock: FakeClock, **provider: Any
) -> AsyncIterator[tuple[Broker, pb_grpc.CredentialBrokerAsyncStub]]:
    """A broker whose acme has no idle lifetime (only the refresh token's own expiry counts)
    unless ``provider`` says otherwise."""
    extra = {"refresh_token_idle_lifetime_seconds": None, **provider}
    settings = make_settings(
        database_url,
        providers=acme(fake, **extra),
        refresh={"background": False},
    )
    broker = await start(settings, clock=clock)
    try:
        async with broker_stub(broker.port) as stub:
            yield broker, stub
    finally:
        await broker.stop(0)


async def test_the_cli_shows_refresh_token_expiry_and_last_use(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    iid, _, _ = await store_grant(
        stub, fake, expires_in=MONTH, refresh_token_expires_in_seconds=86400
    )
    await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    usage = broker.runtime.service.usage
    assert usage is not None
    await usage.flush()
    cfg = cli.config(tmp_path, database_url)
    shown = json.loads((await cli.broker(capsys, cfg, "integrations", "show", iid, "--json")).out)
    listed = json.loads((await cli.broker(capsys, cfg, "integrations", "list", "--json")).out)
    for record in (shown, listed[0]):
        for name in ("refresh_token_expires_at", "last_used_at"):
            assert ISO_8601.match(record[name] or ""), (name, record)
        assert "last_refreshed_at" in record
    table = (await cli.broker(capsys, cfg, "integrations", "list")).out
    assert "LAST_USED" in table
