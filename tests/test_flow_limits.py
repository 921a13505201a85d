"""Authorization flows cannot be used to fill the database, on both backends: pending flows
are capped per caller (another caller is unaffected), a flow's metadata and scopes are capped
before anything is stored, closed flows keep no payload, and flows live
authorization.flow_ttl_seconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from broker import metrics
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from tests.helpers.authorization import begin, complete, consent, flow_rows, query
from tests.helpers.clock import FakeClock
from tests.helpers.errors import error_info, expect_error
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.providers import CALLBACK, acme
from tests.helpers.settings import make_settings

Code = grpc.StatusCode
WEB = (("authorization", "Bearer web-token"),)
LIMIT = 5


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(
        database_url,
        providers={"acme": acme(fake)},
        callers={
            "admin": {"token_sha256": hash_token("admin-token-for-tests")},
            "web": {"token_sha256": hash_token("web-token")},
        },
        refresh={"provider_timeout_seconds": 2, "background": False},
        authorization={"max_pending_flows_per_caller": LIMIT, "flow_ttl_seconds": 120},
    )


@pytest.fixture
async def broker(settings: Settings, clock: FakeClock) -> AsyncIterator[Broker]:
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


def refused() -> float:
    return float(metrics.FLOWS_REFUSED.labels("pending_per_caller")._value.get())


async def test_pending_flows_are_capped_per_caller_and_free_up_as_flows_close(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    started = [await begin(stub, user_id=f"u{i}") for i in range(LIMIT)]
    before = refused()
    error = await expect_error(
        begin(stub, user_id="one-too-many"), Code.RESOURCE_EXHAUSTED, "FLOW_LIMIT", "admin"
    )
    info = error_info(error)
    assert info is not None
    assert dict(info.metadata) == {
        "setting": "authorization.max_pending_flows_per_caller",
        "limit": str(LIMIT),
    }
    assert refused() == before + 1
    assert len(await flow_rows(broker)) == LIMIT  # the refused flow was not stored
    # Another caller of the same broker is not held back by this one's flows.
    other = await stub.BeginAuthorization(
        pb.BeginAuthorizationRequest(user_id="u0", provider="acme", redirect_uri=CALLBACK),
        metadata=WEB,
    )
    assert other.state
    # A completed flow is no longer pending: its slot is free again.
    callback = await consent(started[0].authorization_url)
    await complete(stub, state=callback["state"], code=callback["code"], user_id="u0")
    await begin(stub, user_id="after-complete")
    await expect_error(begin(stub), Code.RESOURCE_EXHAUSTED, "FLOW_LIMIT")
    # Expired flows are not pending either (the TTL is the setting: 120 s).
    clock.advance(timedelta(seconds=121))
    for i in range(LIMIT):
        await begin(stub, user_id=f"later{i}")
    await expect_error(begin(stub), Code.RESOURCE_EXHAUSTED, "FLOW_LIMIT")


async def test_concurrent_begins_never_exceed_the_limit(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    async def attempt(i: int) -> Code:
        try:
            await begin(stub, user_id=f"u{i}")
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return Code.OK

    codes = await asyncio.gather(*(attempt(i) for i in range(4 * LIMIT)))
    assert codes.count(Code.OK) == LIMIT
    assert codes.count(Code.RESOURCE_EXHAUSTED) == 3 * LIMIT
    assert len(await flow_rows(broker)) == LIMIT


async def test_oversized_flow_metadata_and_scopes_are_refused_and_nothing_is_stored(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    big = struct_pb2.Struct()
    big.update({"blob": "x" * (8 * 1024)})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"metadata": big}, "metadata: is 8203 bytes as JSON; the limit is 8192"),
        ({"scopes": [f"s{i}" for i in range(65)]}, "scopes: has 65 entries; the limit is 64"),
        ({"scopes": ["read", "s" * 257]}, "scopes: is 257 characters long; the limit is 256"),
        # What the report found accepted: 60 KB of metadata, 50 scopes of 1,000 characters.
        ({"scopes": [f"{i:03}" + "s" * 997 for i in range(50)]}, "scopes"),
    ]
    for fields, message in cases:
        await expect_error(
            begin(stub, **fields), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", contains=message
        )
    assert await flow_rows(broker) == []
    # At the limits exactly, a flow is fine.
    fits = struct_pb2.Struct()
    fits.update({"blob": "x" * (8 * 1024 - 11)})
    await begin(stub, metadata=fits, scopes=[f"{i:03}" + "s" * 253 for i in range(64)])
    assert len(await flow_rows(broker)) == 1


async def test_closed_flows_keep_no_payload_and_still_say_why_they_are_closed(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    meta = struct_pb2.Struct()
    meta.update({"team": "t" * 4000})
    done = await begin(stub, metadata=meta)
    callback = await consent(done.authorization_url)
    await complete(stub, state=callback["state"], code=callback["code"])
    abandoned = await begin(stub, metadata=meta, scopes=["read", "write"])
    assert abandoned.expires_at.ToSeconds() == pytest.approx(clock().timestamp() + 120, abs=1)
    clock.advance(timedelta(seconds=121))
    assert await broker.runtime.authorization.purge_expired() == 0  # kept for the grace period
    rows = await flow_rows(broker)
    assert len(rows) == 2
    for row in rows:
        assert (row["metadata"], row["scopes"], row["redirect_uri"]) == ({}, [], "")
        assert row["verifier_ct"] is None
        assert row["caller"] == "admin"
    # A replay is still told what happened.
    await expect_error(
        complete(stub, state=callback["state"], code=callback["code"]),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="already used",
    )
    await expect_error(
        complete(stub, state=query(abandoned.authorization_url)["state"], code="c"),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="expired",
    )
