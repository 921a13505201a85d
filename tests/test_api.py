"""Every RPC of the core API against a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from sqlalchemy import func, select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN

Code = grpc.StatusCode


async def store(
    stub: pb_grpc.CredentialBrokerAsyncStub, **fields: object
) -> pb.StoreIntegrationResponse:
    return await stub.StoreIntegration(store_request(**fields), metadata=ADMIN)


async def test_store_then_get_access_token(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    meta = struct_pb2.Struct()
    meta.update({"username": "@someone", "nested": {"n": 1}})
    stored = await store(stub, access_token="at-1", metadata=meta)
    assert stored.created
    integration = stored.integration
    assert integration.status == pb.INTEGRATION_STATUS_CONNECTED
    assert integration.user_id == "user-1"
    assert integration.provider == "twitter"
    assert list(integration.scopes) == ["tweet.read", "users.read"]
    assert integration.metadata["username"] == "@someone"
    assert integration.has_refresh_token

    by_id = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=integration.id), metadata=ADMIN
    )
    assert by_id.access_token == "at-1"
    assert by_id.integration_id == integration.id
    assert by_id.token_type == "Bearer"
    assert not by_id.refreshed
    by_owner = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-1", provider="twitter"), metadata=ADMIN
    )
    assert by_owner.access_token == "at-1"


async def test_concurrent_stores_of_one_owner_all_succeed_and_the_last_wins(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    """Stores of one owner at once (a double-submitted OAuth callback, a retried import) take
    turns: none fails, one integration results, each store has its CONNECTED event, and the
    tokens served are one store's whole set."""
    results = await asyncio.gather(
        *(store(stub, access_token=f"at-{i}", refresh_token=f"rt-{i}") for i in range(16))
    )
    assert len({r.integration.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    events = await stub.ListIntegrationEvents(
        pb.ListIntegrationEventsRequest(page_size=100), metadata=ADMIN
    )
    assert [e.type for e in events.events] == [pb.INTEGRATION_EVENT_TYPE_CONNECTED] * 16
    token = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=results[0].integration.id), metadata=ADMIN
    )
    assert token.access_token in {f"at-{i}" for i in range(16)}


async def test_store_upserts_on_owner(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    first = await store(stub, access_token="at-1", refresh_token="rt-1")
    second = await store(stub, access_token="at-2", refresh_token="")
    assert not second.created
    assert second.integration.id == first.integration.id
    # A store without a refresh token keeps the one the broker already had.
    assert second.integration.has_refresh_token
    token = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=first.integration.id), metadata=ADMIN
    )
    assert token.access_token == "at-2"


async def test_store_with_expires_at(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    when = datetime.now(UTC) + timedelta(hours=2)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    stored = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="u", provider="google", access_token="at", expires_at=ts
        ),
        metadata=ADMIN,
    )
    got = stored.integration.expires_at.ToDatetime(tzinfo=UTC)
    assert abs((got - when).total_seconds()) < 0.01


async def test_several_accounts_need_account_id(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    a = await store(stub, account_id="acct-a", access_token="at-a")
    b = await store(stub, account_id="acct-b", access_token="at-b")
    assert a.integration.id != b.integration.id
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-1", provider="twitter"), metadata=ADMIN
        ),
        Code.FAILED_PRECONDITION,
        "AMBIGUOUS_INTEGRATION",
    )
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-1", provider="twitter", account_id="acct-b"),
        metadata=ADMIN,
    )
    assert got.access_token == "at-b"


async def test_get_and_list_integrations_carry_no_tokens(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    stored = await store(stub, access_token="secret-access", refresh_token="secret-refresh")
    got = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored.integration.id), metadata=ADMIN
    )
    assert got.integration == stored.integration
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN
    )
    assert [i.id for i in listed.integrations] == [stored.integration.id]
    for message in (got, listed, stored):
        raw = message.SerializeToString()
        assert b"secret-access" not in raw
        assert b"secret-refresh" not in raw


async def test_list_pagination_and_filters(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    ids = []
    for n in range(7):
        provider = "google" if n % 2 else "slack"
        response = await store(stub, provider=provider, account_id=f"a{n}")
        ids.append(response.integration.id)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListIntegrations(
            pb.ListIntegrationsRequest(user_id="user-1", page_size=3, page_token=token),
            metadata=ADMIN,
        )
        pages += 1
        seen.extend(i.id for i in page.integrations)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))
    google = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1", provider="google"), metadata=ADMIN
    )
    assert len(google.integrations) == 3
    await stub.Disconnect(pb.DisconnectRequest(integration_id=ids[0]), metadata=ADMIN)
    connected = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1", status=pb.INTEGRATION_STATUS_CONNECTED),
        metadata=ADMIN,
    )
    assert ids[0] not in [i.id for i in connected.integrations]
    assert len(connected.integrations) == 6
    other = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="nobody"), metadata=ADMIN
    )
    assert not other.integrations
    assert not other.next_page_token


async def test_disconnect_then_reconnect(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    stored = await store(stub, access_token="at-old")
    iid = stored.integration.id
    response = await stub.Disconnect(
        pb.DisconnectRequest(
            integration_id=iid, reason="user clicked disconnect", skip_provider_revocation=True
        ),
        metadata=ADMIN,
    )
    assert response.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    assert response.integration.disconnect_reason == "user clicked disconnect"
    assert response.integration.HasField("disconnected_at")
    assert response.revocation == pb.REVOCATION_OUTCOME_SKIPPED
    assert not response.integration.has_refresh_token
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "INTEGRATION_DISCONNECTED",
    )
    again = await stub.Disconnect(pb.DisconnectRequest(integration_id=iid), metadata=ADMIN)
    assert again.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    reconnected = await store(stub, access_token="at-new")
    assert reconnected.integration.id == iid
    assert not reconnected.created
    assert reconnected.integration.status == pb.INTEGRATION_STATUS_CONNECTED
    assert not reconnected.integration.HasField("disconnected_at")
    token = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert token.access_token == "at-new"


async def test_min_valid_for_and_expiry(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    # No refresh token: a token that is not valid long enough cannot be made valid.
    stored = await store(stub, refresh_token="", expires_in_seconds=120, access_token="at-short")
    iid = stored.integration.id
    ok = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(
            integration_id=iid, min_valid_for=duration_pb2.Duration(seconds=60)
        ),
        metadata=ADMIN,
    )
    assert ok.access_token == "at-short"
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(
                integration_id=iid, min_valid_for=duration_pb2.Duration(seconds=600)
            ),
            metadata=ADMIN,
        ),
        Code.FAILED_PRECONDITION,
        "REAUTHORIZATION_REQUIRED",
    )
    expired = await store(stub, provider="slack", refresh_token="", expires_in_seconds=0)
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=expired.integration.id), metadata=ADMIN
        ),
        Code.FAILED_PRECONDITION,
        "REAUTHORIZATION_REQUIRED",
    )
    after = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=expired.integration.id), metadata=ADMIN
    )
    assert after.integration.status == pb.INTEGRATION_STATUS_EXPIRED


async def test_required_scopes(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    stored = await store(stub, scopes=["a", "b"])
    iid = stored.integration.id
    await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid, required_scopes=["a"]), metadata=ADMIN
    )
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid, required_scopes=["a", "c"]), metadata=ADMIN
        ),
        Code.FAILED_PRECONDITION,
        "INSUFFICIENT_SCOPE",
        contains="'c'",
    )


async def test_not_found(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id="nope"), metadata=ADMIN),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )
    await expect_error(
        stub.GetIntegration(
            pb.GetIntegrationRequest(user_id="ghost", provider="twitter"), metadata=ADMIN
        ),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )
    await expect_error(
        stub.Disconnect(pb.DisconnectRequest(integration_id="nope"), metadata=ADMIN),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )


BIG = "x" * (64 * 1024 + 1)


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"user_id": ""}, "user_id", "INVALID_ARGUMENT"),
        ({"provider": ""}, "provider", "INVALID_ARGUMENT"),
        ({"access_token": ""}, "access_token", "INVALID_ARGUMENT"),
        ({"access_token": BIG}, "access_token", "INVALID_ARGUMENT"),
        ({"refresh_token": BIG}, "refresh_token", "INVALID_ARGUMENT"),
        ({"user_id": "u" * 256}, "user_id", "INVALID_ARGUMENT"),
        ({"account_id": "a" * 256}, "account_id", "INVALID_ARGUMENT"),
        ({"expires_in_seconds": -5}, "expires_in_seconds", "INVALID_ARGUMENT"),
        ({"provider": "no-such-provider"}, "provider", "UNKNOWN_PROVIDER"),
        ({"scopes": ["has space"]}, "scopes", "INVALID_ARGUMENT"),
        ({"user_id": "bad\nid"}, "user_id", "INVALID_ARGUMENT"),
    ],
)
async def test_store_rejects_bad_input_and_writes_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fields: dict[str, object],
    field: str,
    reason: str,
) -> None:
    await expect_error(store(stub, **fields), Code.INVALID_ARGUMENT, reason, contains=field)
    assert await row_count(broker) == 0


async def row_count(broker: Broker) -> int:
    async with broker.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(integrations))).scalar_one()
        )


async def test_store_rejects_oversized_and_malformed_metadata(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    big = struct_pb2.Struct()
    big.update({"blob": "y" * (64 * 1024)})
    await expect_error(
        store(stub, metadata=big), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", contains="metadata"
    )
    nan = struct_pb2.Struct()
    nan.update({"n": float("nan")})
    await expect_error(
        store(stub, metadata=nan), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", contains="metadata"
    )
    ts = timestamp_pb2.Timestamp(seconds=1)
    await expect_error(
        store(stub, expires_at=ts, expires_in_seconds=5),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="expires_at",
    )
    assert await row_count(broker) == 0


async def test_selector_validation(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    stored = await store(stub)
    both = pb.GetAccessTokenRequest(
        integration_id=stored.integration.id, user_id="user-1", provider="twitter"
    )
    await expect_error(
        stub.GetAccessToken(both, metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="not both",
    )
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="integration_id",
    )
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(user_id="user-1"), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="provider",
    )
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(
                integration_id=stored.integration.id,
                min_valid_for=duration_pb2.Duration(seconds=-1),
            ),
            metadata=ADMIN,
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="min_valid_for",
    )
    await expect_error(
        stub.ListIntegrations(
            pb.ListIntegrationsRequest(user_id="user-1", page_token="%%%"), metadata=ADMIN
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="page_token",
    )
    await expect_error(
        stub.ListIntegrations(pb.ListIntegrationsRequest(), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="user_id",
    )
