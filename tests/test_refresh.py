"""Transparent refresh against a real fake authorization server on loopback, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.storage import repository
from broker.storage.engine import touch, write_transaction
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error, retry_info
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.integrations import row, store_grant, token
from tests.helpers.providers import provider_settings
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(
        database_url,
        providers=provider_settings(fake),
        refresh={
            "margin_seconds": 30,
            "provider_timeout_seconds": 1,
            "max_attempts": 2,
            "background": False,
        },
    )


async def test_expired_token_is_refreshed_and_rotated(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, old_access, old_refresh = await store_grant(stub, fake)
    got = await token(stub, iid)
    assert got.refreshed
    assert got.access_token != old_access
    assert fake.is_access_token_active(got.access_token)
    assert fake.refresh_calls == 1
    new_refresh = fake.current_refresh_token(old_refresh)
    assert new_refresh is not None
    assert new_refresh != old_refresh
    stored = await row(broker, iid)
    assert stored.integration.last_refreshed_at is not None
    assert stored.integration.version == 2
    # The stored refresh token is the rotated one: a second refresh works and the grant lives.
    again = await token(stub, iid, force_refresh=True)
    assert again.refreshed
    assert again.access_token != got.access_token
    assert fake.refresh_calls == 2
    assert fake.is_grant_active(old_refresh)
    integration = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN
    )
    assert integration.integration.HasField("last_refreshed_at")


async def test_valid_token_is_served_without_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, access, _ = await store_grant(stub, fake, expires_in=3600)
    got = await token(stub, iid)
    assert got.access_token == access
    assert not got.refreshed
    assert fake.refresh_calls == 0


async def test_min_valid_for_decides(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, access, _ = await store_grant(stub, fake, expires_in=120)
    as_is = await token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=60))
    assert as_is.access_token == access
    assert not as_is.refreshed
    assert fake.refresh_calls == 0
    longer = await token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=600))
    assert longer.refreshed
    assert longer.access_token != access
    assert fake.refresh_calls == 1
    expires = longer.expires_at.ToDatetime(tzinfo=UTC)
    assert expires - datetime.now(UTC) > timedelta(seconds=600)


async def test_concurrent_callers_share_one_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    fake.latency = 0.05
    iid, _, old_refresh = await store_grant(stub, fake)
    results = await asyncio.gather(*(token(stub, iid) for _ in range(200)))
    assert fake.refresh_calls == 1
    assert len({r.access_token for r in results}) == 1
    assert fake.is_grant_active(old_refresh)
    assert fake.is_access_token_active(results[0].access_token)


async def test_refresh_keeps_refresh_token_when_response_has_none(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    fake.omit_refresh_token = True
    fake.rotate = False
    iid, _, _ = await store_grant(stub, fake)
    await token(stub, iid)
    second = await token(stub, iid, force_refresh=True)
    assert second.refreshed
    assert fake.refresh_calls == 2


async def test_missing_expires_in_uses_default(database_url: str, fake: FakeAuthServer) -> None:
    fake.expires_in = None
    settings = make_settings(
        database_url,
        providers=provider_settings(fake, default_expires_in_seconds=900),
        refresh={"background": False},
    )
    broker = await start(settings)
    try:
        async with broker_stub(broker.port) as stub:
            iid, _, _ = await store_grant(stub, fake)
            got = await token(stub, iid)
            left = got.expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
            assert timedelta(seconds=880) < left <= timedelta(seconds=900)
    finally:
        await broker.stop(0)


# Provider answer → (status afterwards, gRPC code, ErrorInfo reason), as the Refresh table of
# docs/providers.md.
FAILURES = [
    (
        "invalid_grant",
        "NEEDS_REAUTHORIZATION",
        Code.FAILED_PRECONDITION,
        "REAUTHORIZATION_REQUIRED",
    ),
    (
        "invalid_scope",
        "NEEDS_REAUTHORIZATION",
        Code.FAILED_PRECONDITION,
        "REAUTHORIZATION_REQUIRED",
    ),
    ("invalid_client", "CONNECTED", Code.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"),
    ("unauthorized_client", "CONNECTED", Code.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"),
    ("rate_limited", "CONNECTED", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("server_error", "CONNECTED", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("unavailable", "CONNECTED", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("garbage", "CONNECTED", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("no_access_token", "CONNECTED", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("slow", "CONNECTED", Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
]


@pytest.mark.parametrize(("answer", "status", "code", "reason"), FAILURES)
async def test_provider_failures(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    broker: Broker,
    answer: str,
    status: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    fake.fail_always(answer, retry_after="1", delay=1.5)  # type: ignore[arg-type]
    error = await expect_error(token(stub, iid), code, reason)
    stored = await row(broker, iid)
    assert stored.integration.status.value == status
    if code == Code.UNAVAILABLE:
        info = retry_info(error)
        assert info is not None
        assert info.retry_delay.seconds >= 1
        assert stored.refresh_failures == 1
        # Retried within the call (max_attempts=2) unless the deadline forbids.
        assert fake.refresh_calls in (1, 2)
    else:
        assert fake.refresh_calls == 1
    async with broker.engine.connect() as conn:
        lease = (
            await conn.execute(
                select(integrations.c.refresh_lease_owner).where(integrations.c.id == iid)
            )
        ).scalar_one()
    assert lease is None, "the refresh lease must be released after a failure"
    if status == "NEEDS_REAUTHORIZATION":
        # And it stays that way: no more provider calls for a dead grant.
        await expect_error(token(stub, iid), Code.FAILED_PRECONDITION, "REAUTHORIZATION_REQUIRED")
        assert fake.refresh_calls == 1
    # Error messages never carry a token.
    assert "rt_" not in (error.details() or "")
    assert "at_" not in (error.details() or "")


async def end_cool_down(broker: Broker, iid: str) -> None:
    """Move the integration's back-off after a failure into the past (as time would)."""
    async with write_transaction(broker.engine, broker.refresher.invalidate) as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == iid)
            .values(next_refresh_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await touch(conn, iid)


async def test_transient_failure_serves_current_token_when_it_still_satisfies(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, access, _ = await store_grant(stub, fake, expires_in=20)  # inside the 30 s margin
    fake.fail_always("unavailable")
    got = await token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=10))
    assert got.access_token == access
    assert not got.refreshed
    calls = fake.refresh_calls
    # Backing off after the failure: the provider is not asked again on the next call.
    await expect_error(
        token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=60)),
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    assert fake.refresh_calls == calls
    fake.reset_failures()
    await end_cool_down(broker, iid)
    fresh = await token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=60))
    assert fresh.refreshed


async def test_transient_failure_is_retried_within_the_call(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    fake.fail_next("unavailable", 1)
    got = await token(stub, iid)
    assert got.refreshed
    assert fake.refresh_calls == 2


async def test_invalid_grant_after_a_lost_race_serves_the_new_token(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    fake.fail_next("invalid_grant", 1)
    fake.latency = 1.0
    call = asyncio.ensure_future(token(stub, iid))
    # Once the refresh is at the provider (not after a fixed sleep: a busy host may not have
    # sent it yet), another writer puts newer tokens into the row.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while fake.refresh_calls < 1:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    newer_access, newer_refresh = fake.issue_grant()
    await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="user-1",
            provider="acme",
            access_token=newer_access,
            refresh_token=newer_refresh,
            expires_in_seconds=3600,
        ),
        metadata=ADMIN,
    )
    got = await call
    fake.latency = 0.0
    assert got.access_token == newer_access
    after = await stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN)
    assert after.integration.status == pb.INTEGRATION_STATUS_CONNECTED


async def test_tokens_survive_a_database_failure_after_the_provider_answered(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    iid, _, old_refresh = await store_grant(stub, fake)
    real_write = repository.write_refreshed
    database = {"down": True}

    async def flaky_write(*args: Any, **kwargs: Any) -> Any:
        if database["down"]:
            raise OperationalError("UPDATE integrations", {}, ConnectionResetError("db down"))
        return await real_write(*args, **kwargs)

    monkeypatch.setattr(repository, "write_refreshed", flaky_write)
    got = await token(stub, iid)
    # The caller gets the new token even though the database has not taken it yet ...
    assert got.refreshed
    assert fake.is_access_token_active(got.access_token)
    assert fake.refresh_calls == 1
    stored = await row(broker, iid)
    assert stored.integration.version == 1, "not stored yet"
    # ... the same broker keeps serving it without calling the provider with the dead token ...
    again = await token(stub, iid)
    assert again.access_token == got.access_token
    assert fake.refresh_calls == 1
    # ... and once the database is back the rotated tokens are stored.
    database["down"] = False
    assert await broker.refresher.flush_unsaved() == 0
    stored = await row(broker, iid)
    assert stored.integration.version == 2
    served = await token(stub, iid)
    assert served.access_token == got.access_token
    forced = await token(stub, iid, force_refresh=True)
    assert forced.refreshed
    assert fake.is_grant_active(old_refresh), "the grant survived: no rotated token was lost"


async def test_background_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    soon, access, _ = await store_grant(stub, fake, expires_in=10)
    later, _, _ = await store_grant(stub, fake, expires_in=3600, account_id="other")
    assert await broker.refresher.background_pass() == 1
    assert fake.refresh_calls == 1
    got = await token(stub, soon)
    assert got.access_token != access
    assert not got.refreshed  # already fresh
    assert (await row(broker, later)).integration.version == 1
    assert await broker.refresher.background_pass() == 0


async def test_unconfigured_builtin_refresh_is_provider_misconfigured(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    stored = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="u", provider="x", access_token="at", refresh_token="rt", expires_in_seconds=0
        ),
        metadata=ADMIN,
    )
    assert stored.integration.provider == "twitter"
    await expect_error(
        token(stub, stored.integration.id),
        Code.FAILED_PRECONDITION,
        "PROVIDER_MISCONFIGURED",
        contains="twitter",
    )


@pytest.fixture
async def two_brokers(settings: Settings) -> AsyncIterator[tuple[Broker, Broker]]:
    a = await start(settings)
    b = await start(settings)
    yield a, b
    await a.stop(0)
    await b.stop(0)


# Replicas share PostgreSQL only: no SQLite variant.
@pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_background_refresh_shared_by_replicas(
    two_brokers: tuple[Broker, Broker], fake: FakeAuthServer
) -> None:
    a, b = two_brokers
    fake.latency = 0.05
    async with broker_stub(a.port) as stub:
        for n in range(20):
            await store_grant(stub, fake, expires_in=10, account_id=f"acct-{n}")
    await asyncio.gather(a.refresher.background_pass(), b.refresher.background_pass())
    # Each integration refreshed exactly once between the two replicas, and the work was shared.
    assert fake.refresh_calls == 20
    assert a.refresher.provider_calls > 0
    assert b.refresher.provider_calls > 0
    async with a.engine.connect() as conn:
        versions = (await conn.execute(select(integrations.c.version))).scalars().all()
    assert sorted(versions) == [2] * 20
