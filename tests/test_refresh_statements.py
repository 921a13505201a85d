"""A refresh is two statements: the claim (the lease, an ``UPDATE … RETURNING`` that returns
everything the provider call needs) and the store (the compare-and-swap ``UPDATE`` that writes
the new tokens and releases the lease), plus its event where the state change has one. On
PostgreSQL the announcement to the other replicas rides in the store (``pg_notify`` beside
the write); on SQLite it is the ``change_log`` insert of the store's transaction. Counted with
SQLAlchemy's ``before_cursor_execute``, on both backends, for a caller's refresh, a refresh
run ahead and the background pass. A count, not a timing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.model import Selector, TokenRequest
from broker.server.app import Broker
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.integrations import row, store_grant, token
from tests.helpers.providers import provider_settings
from tests.helpers.settings import make_settings
from tests.helpers.waiting import eventually


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(
        database_url, providers=provider_settings(fake), refresh={"background": False}
    )


# What a refresh may touch. Background work shares the engine and may fall inside the
# refresh (the health watcher's ping, the purges of flows, grants and old change_log rows):
# its statements name other tables, and on SQLite its BEGIN IMMEDIATE is followed by one.
_REFRESH = (
    "UPDATE integrations ",
    "WITH written AS",
    "SELECT integrations.",
    "INSERT INTO change_log",
    "SELECT pg_notify",
    "INSERT INTO integration_events",
    "SELECT integration_events.",
)


@contextmanager
def statements(broker: Broker) -> Iterator[list[str]]:
    """The first words of every statement of a refresh the broker's engine sends meanwhile."""
    sent: list[tuple[int, str]] = []
    seen: list[str] = []

    def count(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        sent.append((id(conn), " ".join(sql.split()[:3])))

    sync = broker.engine.sync_engine
    event.listen(sync, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(sync, "before_cursor_execute", count)
        for n, (conn, words) in enumerate(sent):
            if words == "BEGIN IMMEDIATE":
                after = [w for c, w in sent[n + 1 :] if c == conn][:1]
                if after and (after[0] + " ").startswith(_REFRESH):
                    seen.append(words)
            elif (words + " ").startswith(_REFRESH):
                seen.append(words)


def expected(broker: Broker) -> list[str]:
    """Claim and store; on SQLite the store's transaction also logs the change."""
    if broker.engine.dialect.name == "postgresql":
        return ["UPDATE integrations SET", "WITH written AS"]
    return ["UPDATE integrations SET", "UPDATE integrations SET", "INSERT INTO change_log"]


async def test_a_callers_refresh_is_a_claim_and_a_store(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    stored = await row(broker, iid)
    with statements(broker) as seen:
        request = TokenRequest(selector=Selector(integration_id=iid))
        got = await broker.refresher.refresh(stored, request)
    assert got.refreshed
    assert seen == expected(broker)
    assert (await row(broker, iid)).integration.version == stored.integration.version + 1


async def test_a_refresh_run_ahead_is_a_claim_and_a_store(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, old, _ = await store_grant(stub, fake, expires_in=200)  # due, still satisfies
    stored = await row(broker, iid)
    with statements(broker) as seen:
        got = await broker.refresher.refresh(stored, TokenRequest(Selector(integration_id=iid)))
        assert got.access_token == old
        assert not got.refreshed

        async def done() -> bool:
            return not broker.refresher.in_flight

        await eventually(done, "the refresh ahead to end")
    assert seen == expected(broker)
    assert (await row(broker, iid)).integration.version == 2


async def test_the_background_pass_reads_its_claimed_rows_once_per_batch(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    """Per batch: the claim (select and lease) and one read of the claimed rows; per row:
    the store. Then the claim that finds nothing left."""
    for n in range(5):
        await store_grant(stub, fake, user_id=f"u{n}")
    with statements(broker) as seen:
        assert await broker.refresher.background_pass(batch=10) == 5
    claim = ["SELECT integrations.id, integrations.provider", "UPDATE integrations SET"]
    if broker.engine.dialect.name == "sqlite":
        claim = ["BEGIN IMMEDIATE", *claim]
    read = "SELECT integrations.id, integrations.user_id,"
    head = [*claim, read]
    last = claim[:-1]
    assert seen[: len(head)] == head, seen
    assert seen[-len(last) :] == last, seen
    # The five stores run concurrently: their statements may interleave in the log.
    stores = seen[len(head) : -len(last)]
    assert Counter(stores) == Counter(expected(broker)[1:] * 5), seen
    assert fake.refresh_calls == 5


async def test_a_caller_after_a_refresh_reads_the_new_row(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    """The store's announcement reaches this process's cache too (no statement of its own)."""
    iid, old, _ = await store_grant(stub, fake, expires_in=3600)
    assert (await token(stub, iid)).access_token == old  # cached
    forced = await token(stub, iid, force_refresh=True)
    assert forced.refreshed
    assert (await token(stub, iid)).access_token == forced.access_token
