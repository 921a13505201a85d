"""The audit trail, on both backends: one row per RPC with caller, method, integration, user,
provider, outcome and request id, never a token; and fail closed: when the event of a
successful call cannot be written, the call fails with UNAVAILABLE AUDIT_UNAVAILABLE and the
token does not leave."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
import pytest
from sqlalchemy import select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.storage import audit_log
from broker.storage.tables import audit_events, grants, integrations
from tests.helpers.audit import AuditTable
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, RUNNER, RUNNER_TOKEN, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode


def with_id(metadata: tuple[tuple[str, str], ...], request_id: str) -> tuple[tuple[str, str], ...]:
    return (*metadata, ("x-request-id", request_id))


async def audit_rows(broker: Broker) -> list[Any]:
    async with broker.engine.connect() as conn:
        return list(
            (await conn.execute(select(audit_events).order_by(audit_events.c.occurred_at))).all()
        )


async def by_request_id(broker: Broker, expect: set[str] | None = None) -> dict[str, Any]:
    """Events by request id. Failure events are written after the error status has left (best
    effort), so with ``expect`` this polls until those request ids are all there."""
    deadline = asyncio.get_running_loop().time() + 5
    rows = await audit_rows(broker)
    while expect is not None and not expect <= {r.request_id for r in rows}:
        assert asyncio.get_running_loop().time() < deadline, "audit events did not appear"
        await asyncio.sleep(0.02)
        rows = await audit_rows(broker)
    found: dict[str, Any] = {}
    for row in rows:
        assert row.request_id not in found, f"two events for request {row.request_id}"
        found[row.request_id] = row
    return found


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def trailing_request_id(call: Any) -> str:
    for key, value in await call.trailing_metadata() or ():
        if key == "x-request-id":
            return str(value)
    raise AssertionError("no x-request-id in the trailing metadata")


async def test_every_rpc_writes_one_event(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    access = f"at-audit-{uuid.uuid4().hex}"
    refresh = f"rt-audit-{uuid.uuid4().hex}"
    call = stub.StoreIntegration(
        store_request(access_token=access, refresh_token=refresh),
        metadata=with_id(ADMIN, "req-store"),
    )
    iid = (await call).integration.id
    assert await trailing_request_id(call) == "req-store"

    token_call = stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-1", provider="twitter"),
        metadata=with_id(RUNNER, "req-token"),
    )
    assert (await token_call).access_token == access
    assert await trailing_request_id(token_call) == "req-token"

    await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=iid), metadata=with_id(ADMIN, "req-get")
    )
    await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1"), metadata=with_id(ADMIN, "req-list")
    )
    await stub.Disconnect(
        pb.DisconnectRequest(integration_id=iid, reason="audit test"),
        metadata=with_id(ADMIN, "req-disconnect"),
    )
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=with_id(RUNNER, "req-failed")
        ),
        Code.FAILED_PRECONDITION,
        "INTEGRATION_DISCONNECTED",
    )

    expected = {
        # request id: (caller, method, integration id, user, provider, outcome)
        "req-store": ("admin", "StoreIntegration", iid, "user-1", "twitter", "OK"),
        "req-token": ("runner", "GetAccessToken", iid, "user-1", "twitter", "OK"),
        "req-get": ("admin", "GetIntegration", iid, "user-1", "twitter", "OK"),
        "req-list": ("admin", "ListIntegrations", None, "user-1", None, "OK"),
        "req-disconnect": ("admin", "Disconnect", iid, "user-1", "twitter", "OK"),
        "req-failed": (
            "runner",
            "GetAccessToken",
            iid,
            "user-1",
            "twitter",
            "FAILED_PRECONDITION",
        ),
    }
    rows = await by_request_id(broker, set(expected))
    assert set(rows) == set(expected)
    now = datetime.now(UTC) + timedelta(seconds=1)
    for request_id, values in expected.items():
        row = rows[request_id]
        got = (row.caller, row.method, row.integration_id, row.user_id, row.provider, row.outcome)
        assert got == values, request_id
        assert started <= aware(row.occurred_at) <= now
        assert row.id

    # In the order the calls were made.
    order = [r.request_id for r in await audit_rows(broker)]
    assert order == list(expected)

    everything = repr([tuple(r) for r in await audit_rows(broker)])
    for secret in (access, refresh, ADMIN_TOKEN, RUNNER_TOKEN):
        assert secret not in everything


async def test_failed_lookup_by_owner_names_the_owner(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    """Probing another user's integrations leaves a trail under that user."""
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-2", provider="google"),
            metadata=with_id(RUNNER, "req-probe-owner"),
        ),
        Code.NOT_FOUND,
    )
    row = (await by_request_id(broker, {"req-probe-owner"}))["req-probe-owner"]
    assert (row.caller, row.method, row.outcome) == ("runner", "GetAccessToken", "NOT_FOUND")
    assert (row.user_id, row.provider) == ("user-2", "google")


async def test_failed_lookup_by_id_names_the_id(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    missing = str(uuid.uuid4())
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=missing),
            metadata=with_id(RUNNER, "req-probe-id"),
        ),
        Code.NOT_FOUND,
    )
    row = (await by_request_id(broker, {"req-probe-id"}))["req-probe-id"]
    assert (row.caller, row.method, row.outcome) == ("runner", "GetAccessToken", "NOT_FOUND")
    assert row.integration_id == missing


async def test_failed_call_returns_its_request_id(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    error = await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=str(uuid.uuid4())), metadata=RUNNER
        ),
        Code.NOT_FOUND,
    )
    # grpc-stubs types this as RpcError's tuple of _Metadatum; grpc.aio returns Metadata | None.
    metadata = cast("grpc.aio.Metadata | None", error.trailing_metadata())
    returned = dict(metadata or ()).get("x-request-id")
    assert returned, "the failed call carries its request id"
    assert returned in await by_request_id(broker, {str(returned)})


async def test_request_id_is_generated_when_missing_or_malformed(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    call = stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN)
    await call
    generated = await trailing_request_id(call)
    assert len(generated) == 32
    assert int(generated, 16) >= 0
    bad = "not ok; DROP TABLE audit_events " + "x" * 80
    call = stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1"), metadata=with_id(ADMIN, bad)
    )
    await call
    replaced = await trailing_request_id(call)
    assert replaced != bad
    assert len(replaced) == 32
    rows = await by_request_id(broker)
    assert set(rows) == {generated, replaced}


async def test_calls_refused_before_the_servicer_touch_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    """Calls refused before the servicer read nothing. An unauthenticated one has no caller to
    record (the access log has it); a known caller trying a method outside its policy is
    recorded as PERMISSION_DENIED, with no integration data."""
    await expect_error(
        stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1")),
        Code.UNAUTHENTICATED,
    )
    await expect_error(
        stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"), metadata=RUNNER),
        Code.PERMISSION_DENIED,
    )
    deadline = asyncio.get_running_loop().time() + 5
    while not (rows := await audit_rows(broker)):
        assert asyncio.get_running_loop().time() < deadline, "no audit event for the refusal"
        await asyncio.sleep(0.02)
    assert len(rows) == 1
    row = rows[0]
    assert (row.caller, row.method, row.outcome) == (
        "runner",
        "ListIntegrations",
        "PERMISSION_DENIED",
    )
    assert (row.user_id, row.provider, row.integration_id) == (None, None, None)


# -- fail closed --------------------------------------------------------------------------------


@pytest.fixture
def audit_table(database_url: str, broker: Broker) -> AuditTable:
    """(Started after the broker, which has verified the schema with the table in place.)"""
    return AuditTable(database_url)


@pytest.fixture(
    params=[(True, "commit"), (False, "commit"), (True, "write")],
    ids=["group-commit", "one-by-one", "durability-write"],
)
def settings(database_url: str, request: pytest.FixtureRequest) -> Settings:
    """Both ways of writing events: batched (group commit, the default) and one at a time;
    and with ``audit.durability = "write"`` (committed without waiting for the flush), which
    fails closed just the same."""
    group_commit, durability = request.param
    return make_settings(
        database_url, audit={"group_commit": group_commit, "durability": durability}
    )


async def test_audit_write_failure_fails_closed_and_returns_no_token(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    audit_table: AuditTable,
    backend: str,
    settings: Settings,
    request: pytest.FixtureRequest,
) -> None:
    access = f"at-failclosed-{uuid.uuid4().hex}"
    iid = (
        await stub.StoreIntegration(store_request(access_token=access), metadata=ADMIN)
    ).integration.id
    await audit_table.hide()
    try:
        call = stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=with_id(RUNNER, "req-blind")
        )
        error = await expect_error(call, Code.UNAVAILABLE, "AUDIT_UNAVAILABLE")
        assert access not in (error.details() or "")
        assert access not in repr(error.trailing_metadata())
        assert access not in repr(error.initial_metadata())
        # Every method's success event fails closed, not only GetAccessToken's.
        await expect_error(
            stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
    finally:
        await audit_table.restore()
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid), metadata=with_id(RUNNER, "req-seen")
    )
    assert got.access_token == access
    rows = await by_request_id(broker)
    assert "req-seen" in rows
    assert "req-blind" not in rows


async def test_failure_events_are_best_effort(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    audit_table: AuditTable,
) -> None:
    """A call that fails anyway keeps its own error when its event cannot be written."""
    await audit_table.hide()
    try:
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=str(uuid.uuid4())), metadata=RUNNER
            ),
            Code.NOT_FOUND,
            "INTEGRATION_NOT_FOUND",
        )
    finally:
        await audit_table.restore()


async def integration_rows(broker: Broker) -> list[Any]:
    async with broker.engine.connect() as conn:
        return list((await conn.execute(select(integrations))).all())


async def test_mutation_whose_event_cannot_be_written_writes_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, audit_table: AuditTable
) -> None:
    """The event of a mutation goes in the mutation's transaction: UNAVAILABLE means neither
    the change nor the event was committed."""
    kept = await stub.StoreIntegration(store_request(user_id="kept"), metadata=ADMIN)
    before = await integration_rows(broker)
    await audit_table.hide()
    try:
        await expect_error(
            stub.StoreIntegration(store_request(user_id="new-user"), metadata=ADMIN),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        # An update of an existing integration is rolled back too.
        await expect_error(
            stub.StoreIntegration(
                store_request(user_id="kept", scopes=["changed"]), metadata=ADMIN
            ),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        await expect_error(
            stub.Disconnect(
                pb.DisconnectRequest(
                    integration_id=kept.integration.id, skip_provider_revocation=True
                ),
                metadata=ADMIN,
            ),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        assert await integration_rows(broker) == before
    finally:
        await audit_table.restore()
    # Once the audit store is back, the same calls succeed and each leaves one event.
    stored = await stub.StoreIntegration(
        store_request(user_id="new-user"), metadata=with_id(ADMIN, "req-store")
    )
    done = await stub.Disconnect(
        pb.DisconnectRequest(integration_id=kept.integration.id, skip_provider_revocation=True),
        metadata=with_id(ADMIN, "req-disconnect"),
    )
    assert done.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    rows = await by_request_id(broker)
    assert rows["req-store"].integration_id == stored.integration.id
    assert rows["req-store"].outcome == "OK"
    assert rows["req-disconnect"].integration_id == kept.integration.id
    assert rows["req-disconnect"].method == "Disconnect"


async def test_grant_writes_whose_event_cannot_be_written_write_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, audit_table: AuditTable
) -> None:
    """CreateGrant and RevokeGrant commit their grant rows with their events, or neither."""
    kept = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="user-1", providers=["twitter"], run_id="run-kept"),
        metadata=ADMIN,
    )

    async def grant_rows() -> list[Any]:
        async with broker.engine.connect() as conn:
            return list((await conn.execute(select(grants).order_by(grants.c.id))).all())

    before = await grant_rows()
    await audit_table.hide()
    try:
        await expect_error(
            stub.CreateGrant(
                pb.CreateGrantRequest(user_id="user-1", providers=["twitter"]), metadata=ADMIN
            ),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        await expect_error(
            stub.RevokeGrant(pb.RevokeGrantRequest(run_id="run-kept"), metadata=ADMIN),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        assert await grant_rows() == before
    finally:
        await audit_table.restore()
    revoked = await stub.RevokeGrant(
        pb.RevokeGrantRequest(grant_id=kept.grant_id), metadata=with_id(ADMIN, "req-revoke")
    )
    assert [g.id for g in revoked.grants] == [kept.grant_id]
    assert (await by_request_id(broker))["req-revoke"].method == "RevokeGrant"


# -- durability ---------------------------------------------------------------------------------


async def _audit_session_durability(sink: audit_log.EventSink) -> set[str]:
    """How the audit's own connections flush: PostgreSQL's synchronous_commit in the audit
    session, or SQLite's synchronous pragma on each of the sink's open connections (asked in
    the thread each belongs to)."""
    if isinstance(sink, audit_log.PostgresSink):
        assert sink._conn is not None, "the audit session is open after a call"
        return {str(await sink._conn.fetchval("SHOW synchronous_commit"))}
    assert isinstance(sink, audit_log.SqliteSink)
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    found = set()
    if sink._here is not None:
        found.add(names[sink._here.execute("PRAGMA synchronous").fetchone()[0]])
    thread_conn = sink._conn
    if thread_conn is not None:
        level = await asyncio.get_running_loop().run_in_executor(
            sink._thread, lambda: thread_conn.execute("PRAGMA synchronous").fetchone()[0]
        )
        found.add(names[level])
    return found


@pytest.mark.parametrize(
    ("durability", "on_postgres", "on_sqlite"),
    [("commit", "on", "FULL"), ("write", "off", "NORMAL")],
)
async def test_audit_connection_flushes_as_durability_says(
    database_url: str, backend: str, durability: str, on_postgres: str, on_sqlite: str
) -> None:
    """``audit.durability``: "commit" flushes each event's commit to disk before the token
    leaves (PostgreSQL synchronous_commit on, SQLite synchronous=FULL); "write" commits
    without waiting for the flush (synchronous_commit off, synchronous=NORMAL)."""
    running = await start(make_settings(database_url, audit={"durability": durability}))
    try:
        async with broker_stub(running.port) as stub:
            iid = (await stub.StoreIntegration(store_request(), metadata=ADMIN)).integration.id
            for _ in range(3):
                await stub.GetAccessToken(
                    pb.GetAccessTokenRequest(integration_id=iid), metadata=RUNNER
                )
        found = await _audit_session_durability(running.runtime.auditor.sink)
        assert found == {on_postgres if backend == "postgres" else on_sqlite}
    finally:
        await running.stop(0)
