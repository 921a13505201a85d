"""Integration events on both backends: one event per state change in the same transaction,
the stream (cursor, filters, replay then live, resume without gap or duplicate under
concurrent writers, heartbeats, shutdown), the paged list, caller policies and retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from sqlalchemy import func, select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.domain import events
from broker.server.app import Broker, start
from broker.storage import events as event_store
from broker.storage.tables import integration_events, integrations
from tests.helpers.errors import expect_error
from tests.helpers.events import (
    EVENTS_CALLBACK,
    Reader,
    all_events,
    event_settings,
    read_resuming,
    store,
)
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.settings import ADMIN
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually, holds

Code = grpc.StatusCode
T = pb.IntegrationEventType
ONLY_ACME = (("authorization", "Bearer acme-only-token"),)


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return event_settings(database_url, fake)


async def kinds(stub: pb_grpc.CredentialBrokerAsyncStub, iid: str) -> list[int]:
    return [e.type for e in await all_events(stub) if e.integration_id == iid]


async def token(stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, force: bool = False) -> Any:
    return await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid, force_refresh=force), metadata=ADMIN
    )


# -- one event per state change ------------------------------------------------------------------


async def expire(broker: Broker, iid: str) -> None:
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == iid)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    broker.runtime.cache.flush()


async def end_backoff(broker: Broker, iid: str) -> None:
    """The provider is fixed: end the (millisecond) back-off of the failures now, so the next
    call does not depend on how fast it follows the last failure."""
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integrations).where(integrations.c.id == iid).values(next_refresh_at=None)
        )
    broker.runtime.cache.flush()


async def test_each_state_change_writes_exactly_one_event(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    # Created, then reconnected (tokens replaced).
    iid = await store(stub, fake, expires_in=3600)
    await store(stub, fake, expires_in=3600)
    assert await kinds(stub, iid) == [T.INTEGRATION_EVENT_TYPE_CONNECTED] * 2
    listed = await all_events(stub)
    assert [e.reason for e in listed] == ["CREATED", "RECONNECTED"]
    assert listed[0].id < listed[1].id

    # A plain refresh is not an event.
    await token(stub, iid, force=True)
    assert len(await kinds(stub, iid)) == 2

    # Transient failures: one REFRESH_FAILED when the run reaches the threshold (2) ...
    # 503: nothing was processed, so each call is one more failure of the run (a 500 is an
    # unknown outcome, after which the broker waits out a cool-down instead).
    fake.fail_always("unavailable")
    await expire(broker, iid)
    for _ in range(3):
        await expect_error(token(stub, iid, force=True), Code.UNAVAILABLE)
    failed = [
        e for e in await all_events(stub) if e.type == T.INTEGRATION_EVENT_TYPE_REFRESH_FAILED
    ]
    assert len(failed) == 1
    assert failed[0].failure_count == 2
    # ... and RECOVERED when a refresh succeeds after it.
    fake.reset_failures()
    await end_backoff(broker, iid)
    await token(stub, iid, force=True)
    await token(stub, iid, force=True)
    assert (await kinds(stub, iid))[2:] == [
        T.INTEGRATION_EVENT_TYPE_REFRESH_FAILED,
        T.INTEGRATION_EVENT_TYPE_RECOVERED,
    ]

    # The provider rejects our client: once per run, however many refreshes hit it.
    fake.fail_always("invalid_client")
    for _ in range(2):
        await expect_error(token(stub, iid, force=True), Code.FAILED_PRECONDITION)
    fake.reset_failures()
    await end_backoff(broker, iid)
    await token(stub, iid, force=True)
    assert (await kinds(stub, iid))[4:] == [
        T.INTEGRATION_EVENT_TYPE_PROVIDER_MISCONFIGURED,
        T.INTEGRATION_EVENT_TYPE_RECOVERED,
    ]

    # invalid_grant: NEEDS_REAUTHORIZATION.
    fake.fail_next("invalid_grant")
    await expect_error(token(stub, iid, force=True), Code.FAILED_PRECONDITION)
    assert (await kinds(stub, iid))[6:] == [T.INTEGRATION_EVENT_TYPE_NEEDS_REAUTHORIZATION]

    # Disconnect: DISCONNECTED, then the revocation's outcome.
    await stub.Disconnect(pb.DisconnectRequest(integration_id=iid), metadata=ADMIN)
    tail = [e for e in await all_events(stub) if e.integration_id == iid][7:]
    assert [e.type for e in tail] == [
        T.INTEGRATION_EVENT_TYPE_DISCONNECTED,
        T.INTEGRATION_EVENT_TYPE_REVOCATION_SETTLED,
    ]
    assert tail[1].revocation == pb.REVOCATION_OUTCOME_REVOKED

    # Expiry with no way to refresh: EXPIRED, once.
    bare = await store(stub, fake, user="user-2", expires_in=1, refresh=False)
    await asyncio.sleep(1.1)
    for _ in range(2):
        await expect_error(token(stub, bare), Code.FAILED_PRECONDITION)
    assert await kinds(stub, bare) == [
        T.INTEGRATION_EVENT_TYPE_CONNECTED,
        T.INTEGRATION_EVENT_TYPE_EXPIRED,
    ]


async def test_an_unknown_outcome_counts_toward_refresh_failed(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    """A refresh sent without a usable answer (HTTP 500) is a failure of the run: when it is
    the one that reaches the threshold, REFRESH_FAILED is written with it."""
    iid = await store(stub, fake, expires_in=3600)
    await expire(broker, iid)
    fake.fail_always("unavailable")
    await expect_error(token(stub, iid, force=True), Code.UNAVAILABLE)
    fake.reset_failures()
    fake.fail_always("server_error")
    await expect_error(token(stub, iid, force=True), Code.UNAVAILABLE)
    failed = [
        e for e in await all_events(stub) if e.type == T.INTEGRATION_EVENT_TYPE_REFRESH_FAILED
    ]
    assert [(e.integration_id, e.failure_count) for e in failed] == [(iid, 2)]


async def test_completed_authorization_is_a_connected_event(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    begun = await stub.BeginAuthorization(
        pb.BeginAuthorizationRequest(
            user_id="user-9", provider="acme", redirect_uri=EVENTS_CALLBACK
        ),
        metadata=ADMIN,
    )
    async with httpx.AsyncClient() as http:
        response = await http.get(begun.authorization_url)
    query = parse_qs(urlsplit(response.headers["location"]).query)
    done = await stub.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(
            state=query["state"][0], code=query["code"][0], user_id="user-9"
        ),
        metadata=ADMIN,
    )
    (event,) = await all_events(stub)
    assert event.type == T.INTEGRATION_EVENT_TYPE_CONNECTED
    assert event.integration_id == done.integration.id
    assert "CompleteAuthorization" in event.message


async def test_a_failing_event_insert_rolls_the_change_back(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    iid = await store(stub, fake, expires_in=3600)
    real = event_store.insert_event

    async def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("event store broken")

    monkeypatch.setattr(event_store, "insert_event", broken)
    # Disconnect, a refresh rejected by the provider and a new integration: all roll back.
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Disconnect(
            pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True),
            metadata=ADMIN,
        )
    fake.fail_next("invalid_grant")
    with pytest.raises(grpc.aio.AioRpcError):
        await token(stub, iid, force=True)
    with pytest.raises(grpc.aio.AioRpcError):
        await store(stub, fake, user="user-new")
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(integrations.c.user_id, integrations.c.status))).all()
        count = (await conn.execute(select(func.count()).select_from(integration_events))).scalar()
    assert [tuple(r) for r in rows] == [("user-1", "CONNECTED")], "every change rolled back"
    assert count == 1, "only the first CONNECTED"

    # The reverse: the event is written but the transaction fails after it: no event remains.
    async def written_then_fail(*args: Any, **kwargs: Any) -> int:
        await real(*args, **kwargs)
        raise RuntimeError("the transaction fails after the event insert")

    monkeypatch.setattr(event_store, "insert_event", written_then_fail)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Disconnect(
            pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True),
            metadata=ADMIN,
        )
    monkeypatch.setattr(event_store, "insert_event", real)
    async with broker.engine.connect() as conn:
        status = (await conn.execute(select(integrations.c.status))).scalar()
        count = (await conn.execute(select(func.count()).select_from(integration_events))).scalar()
    assert status == "CONNECTED"
    assert count == 1
    # With the store healthy again, the same change writes its one event.
    await stub.Disconnect(
        pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True), metadata=ADMIN
    )
    assert (await kinds(stub, iid))[-1] == T.INTEGRATION_EVENT_TYPE_DISCONNECTED


# -- the stream ---------------------------------------------------------------------------------


async def test_stream_replays_from_a_cursor_then_follows_live(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    for user in ("a", "b", "c"):
        await store(stub, fake, user=user, expires_in=3600)
    first = (await all_events(stub))[0].id
    reader = Reader(stub, pb.WatchIntegrationEventsRequest(after_event_id=first))
    await reader.has(2)
    assert [e.user_id for e in reader.events] == ["b", "c"]
    await store(stub, fake, user="d", expires_in=3600)
    await reader.has(3)
    assert reader.events[-1].user_id == "d"
    ids = [e.id for e in reader.events]
    assert ids == sorted(ids)
    # Idle: heartbeats carry the cursor.
    await eventually(lambda: holds(reader.heartbeats >= 1), "a heartbeat")
    reader.stop()


async def test_stream_and_list_filters(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid = await store(stub, fake, user="a", expires_in=3600)
    await store(stub, fake, user="b", provider="other", expires_in=3600)
    await stub.Disconnect(
        pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True), metadata=ADMIN
    )
    assert [e.user_id for e in await all_events(stub, user_id="b")] == ["b"]
    assert [e.provider for e in await all_events(stub, provider="other")] == ["other"]
    only = await all_events(stub, types=[T.INTEGRATION_EVENT_TYPE_DISCONNECTED])
    assert [e.type for e in only] == [T.INTEGRATION_EVENT_TYPE_DISCONNECTED]
    assert only[0].revocation == pb.REVOCATION_OUTCOME_SKIPPED
    reader = Reader(
        stub,
        pb.WatchIntegrationEventsRequest(user_id="a", types=[T.INTEGRATION_EVENT_TYPE_CONNECTED]),
    )
    await reader.has(1)
    await store(stub, fake, user="a", provider="other", expires_in=3600)
    await reader.has(2)
    assert [(e.user_id, e.provider) for e in reader.events] == [("a", "acme"), ("a", "other")]
    reader.stop()
    await expect_error(
        stub.ListIntegrationEvents(
            pb.ListIntegrationEventsRequest(page_token="nope"), metadata=ADMIN
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_a_caller_limited_to_a_provider_sees_only_its_events(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    await store(stub, fake, user="a", provider="acme", expires_in=3600)
    await store(stub, fake, user="a", provider="other", expires_in=3600)
    listed = await stub.ListIntegrationEvents(pb.ListIntegrationEventsRequest(), metadata=ONLY_ACME)
    assert [e.provider for e in listed.events] == ["acme"]
    reader = Reader(stub, pb.WatchIntegrationEventsRequest(), ONLY_ACME)
    await reader.has(1)
    await store(stub, fake, user="b", provider="other", expires_in=3600)
    await store(stub, fake, user="b", provider="acme", expires_in=3600)
    await reader.has(2)
    await asyncio.sleep(0.5)
    assert [(e.user_id, e.provider) for e in reader.events] == [("a", "acme"), ("b", "acme")]
    reader.stop()
    # Asking for another provider is refused, on the list and on the stream.
    await expect_error(
        stub.ListIntegrationEvents(
            pb.ListIntegrationEventsRequest(provider="other"), metadata=ONLY_ACME
        ),
        Code.PERMISSION_DENIED,
    )
    denied = stub.WatchIntegrationEvents(
        pb.WatchIntegrationEventsRequest(provider="other"), metadata=ONLY_ACME
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in denied:
            pass
    assert caught.value.code() == Code.PERMISSION_DENIED
    # A caller without the method is refused too.
    runner = (("authorization", "Bearer runner-token-for-tests"),)
    refused = stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=runner)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in refused:
            pass
    assert caught.value.code() == Code.PERMISSION_DENIED


async def test_a_caller_limited_to_users_sees_only_their_events(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    only_a = (("authorization", "Bearer only-a-token"),)
    await store(stub, fake, user="a", expires_in=3600)
    await store(stub, fake, user="b", expires_in=3600)
    listed = await stub.ListIntegrationEvents(pb.ListIntegrationEventsRequest(), metadata=only_a)
    assert [e.user_id for e in listed.events] == ["a"]
    await expect_error(
        stub.ListIntegrationEvents(pb.ListIntegrationEventsRequest(user_id="b"), metadata=only_a),
        Code.PERMISSION_DENIED,
    )


async def test_resume_after_a_drop_has_no_gap_and_no_duplicate_under_concurrent_writers(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    ids = [await store(stub, fake, user=f"u{i}", expires_in=3600) for i in range(30)]
    start_id = (await all_events(stub))[-1].id
    fake.fail_always("invalid_grant")

    async def fail(iid: str) -> Code:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await token(stub, iid, force=True)
        return caught.value.code()

    async def churn(i: int) -> None:
        await store(stub, fake, user=f"new{i}", expires_in=3600)

    writers = asyncio.gather(*(fail(i) for i in ids), *(churn(i) for i in range(20)))
    seen = await read_resuming(stub, start_id, writers)
    codes = (await writers)[:30]
    stored = [e for e in await all_events(stub) if e.id > start_id]
    assert [e.id for e in seen] == [e.id for e in stored], "every event once, in order"
    reauth = [e for e in stored if e.type == T.INTEGRATION_EVENT_TYPE_NEEDS_REAUTHORIZATION]
    # Under load a refresh may time out instead (UNAVAILABLE, no event); each rejected one
    # wrote exactly one event.
    assert len(reauth) == codes.count(Code.FAILED_PRECONDITION) > 0
    assert len(stored) == 20 + len(reauth)


async def test_shutdown_ends_open_streams_cleanly(settings: Settings) -> None:
    broker = await start(settings)
    async with broker_stub(broker.port) as stub:
        reader = Reader(stub, pb.WatchIntegrationEventsRequest())
        await eventually(lambda: holds(reader.heartbeats >= 1), "the stream to be open")
        await broker.stop(5)
        await asyncio.wait_for(reader.task, 5)
        assert await reader.call.code() == Code.OK


async def test_retention_purges_old_events(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    await store(stub, fake, user="old", expires_in=3600)
    await store(stub, fake, user="new", expires_in=3600)
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integration_events)
            .where(integration_events.c.user_id == "old")
            .values(occurred_at=datetime.now(UTC) - timedelta(days=31))
        )
    assert await broker.runtime.events.purge_pass() == 1
    assert [e.user_id for e in await all_events(stub)] == ["new"]


def test_event_json_carries_no_token_field() -> None:
    fields = set(events.Event.__dataclass_fields__)
    assert not {f for f in fields if "token" in f or "secret" in f}
