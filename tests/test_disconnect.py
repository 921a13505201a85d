"""Disconnect against a real fake authorization server, on both backends: RFC 7009 revocation
(refresh token first, then the access token, with the provider's client authentication),
PENDING on a provider outage and retried to REVOKED, ciphertexts wiped once the outcome is
final, idempotence, and no token served after Disconnect returns."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from sqlalchemy import select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.domain import revocation as revocation_module
from broker.server.app import Broker, start
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error
from tests.helpers.fakes import FakeAuthServer, RecordedRequest
from tests.helpers.settings import ADMIN, make_settings

Code = grpc.StatusCode
Outcome = pb.RevocationOutcome


@pytest.fixture(params=["client_secret_basic", "client_secret_post"])
def auth_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def acme(fake: FakeAuthServer, auth_method: str, **extra: Any) -> dict[str, Any]:
    return {
        "token_url": fake.token_url,
        "revocation_url": fake.revocation_url,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "auth_method": auth_method,
        "rotates_refresh_tokens": True,
        **extra,
    }


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    no_revocation = acme(fake, "client_secret_basic")
    del no_revocation["revocation_url"]
    return make_settings(
        database_url,
        providers={
            "acme": acme(fake, "client_secret_basic"),
            "acmepost": acme(fake, "client_secret_post"),
            "norevoke": no_revocation,
        },
        refresh={"provider_timeout_seconds": 2, "max_attempts": 1, "background": False},
    )


def provider_for(auth_method: str) -> str:
    return "acme" if auth_method == "client_secret_basic" else "acmepost"


async def store_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    provider: str = "acme",
    **fields: Any,
) -> tuple[str, str, str]:
    access, refresh = fake.issue_grant(scopes=("read",))
    values: dict[str, Any] = {
        "user_id": "user-1",
        "provider": provider,
        "access_token": access,
        "refresh_token": refresh,
        "expires_in_seconds": 3600,
        "scopes": ["read"],
    }
    values.update(fields)
    response = await stub.StoreIntegration(pb.StoreIntegrationRequest(**values), metadata=ADMIN)
    return response.integration.id, access, refresh


async def disconnect(
    stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, **fields: Any
) -> pb.DisconnectResponse:
    return await stub.Disconnect(pb.DisconnectRequest(integration_id=iid, **fields), metadata=ADMIN)


async def db_row(broker: Broker, iid: str) -> Any:
    async with broker.engine.connect() as conn:
        return (await conn.execute(select(integrations).where(integrations.c.id == iid))).one()


def revocations(fake: FakeAuthServer) -> list[RecordedRequest]:
    return [r for r in fake.requests if r.path == "/revoke"]


async def refresh_at_fake(fake: FakeAuthServer, refresh_token: str) -> httpx.Response:
    """Use a refresh token at the fake ourselves, as a thief holding a copy would."""
    async with httpx.AsyncClient() as http:
        return await http.post(
            fake.token_url,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(fake.client_id, fake.client_secret),
        )


def assert_wiped(row: Any) -> None:
    assert row.access_token_ct is None
    assert row.refresh_token_ct is None


async def expect_disconnected(stub: pb_grpc.CredentialBrokerAsyncStub, iid: str) -> None:
    error = await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "INTEGRATION_DISCONNECTED",
    )
    assert iid in (error.details() or "")
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid, force_refresh=True), metadata=ADMIN
        ),
        Code.FAILED_PRECONDITION,
        "INTEGRATION_DISCONNECTED",
    )


async def make_due(broker: Broker, iid: str) -> None:
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == iid)
            .values(next_revocation_at=datetime.now(UTC) - timedelta(seconds=1))
        )


# -- revoked at the provider ------------------------------------------------------------------


async def test_disconnect_revokes_refresh_then_access_token(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, auth_method: str
) -> None:
    iid, access, refresh = await store_grant(stub, fake, provider_for(auth_method))
    assert fake.is_grant_active(refresh)
    before = datetime.now(UTC) - timedelta(seconds=1)
    response = await disconnect(stub, iid, reason="user clicked disconnect")

    assert response.revocation == Outcome.REVOCATION_OUTCOME_REVOKED
    integration = response.integration
    assert integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    assert integration.disconnect_reason == "user clicked disconnect"
    assert integration.disconnected_at.ToDatetime(tzinfo=UTC) >= before
    assert not integration.has_refresh_token

    sent = revocations(fake)
    assert [(r.body.get("token"), r.body.get("token_type_hint")) for r in sent] == [
        (refresh, "refresh_token"),
        (access, "access_token"),
    ]
    for request in sent:
        assert request.method == "POST"
        assert request.auth_method == auth_method
        assert request.client_id == fake.client_id
        assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
        if auth_method == "client_secret_basic":
            expected = base64.b64encode(f"{fake.client_id}:{fake.client_secret}".encode()).decode()
            assert request.headers["authorization"] == f"Basic {expected}"
            assert "client_secret" not in request.body
        else:
            assert "authorization" not in request.headers
            assert request.body["client_id"] == fake.client_id
            assert request.body["client_secret"] == fake.client_secret

    # The grant is dead at the provider: the refresh token can no longer be used there.
    assert not fake.is_grant_active(refresh)
    assert not fake.is_access_token_active(access)
    reuse = await refresh_at_fake(fake, refresh)
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"

    row = await db_row(broker, iid)
    assert_wiped(row)
    assert row.status == "DISCONNECTED"
    assert row.revocation == "REVOKED"
    await expect_disconnected(stub, iid)
    assert fake.refresh_calls == 1, "only our own reuse attempt above reached /token"


async def test_disconnect_by_owner(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, refresh = await store_grant(stub, fake)
    response = await stub.Disconnect(
        pb.DisconnectRequest(user_id="user-1", provider="acme"), metadata=ADMIN
    )
    assert response.integration.id == iid
    assert response.revocation == Outcome.REVOCATION_OUTCOME_REVOKED
    assert not fake.is_grant_active(refresh)
    assert_wiped(await db_row(broker, iid))


async def test_second_disconnect_is_idempotent(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    first = await disconnect(stub, iid, reason="first")
    assert first.revocation == Outcome.REVOCATION_OUTCOME_REVOKED
    requests = len(fake.requests)
    second = await disconnect(stub, iid, reason="second")
    assert second.revocation == first.revocation
    assert second.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    assert second.integration.disconnect_reason == "first"
    assert second.integration.disconnected_at == first.integration.disconnected_at
    assert len(fake.requests) == requests, "no new request to the provider"
    assert_wiped(await db_row(broker, iid))


# -- provider down: PENDING, retried ---------------------------------------------------------


async def test_pending_on_503_then_retried_to_revoked(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, access, refresh = await store_grant(stub, fake)
    fake.fail_next("unavailable", path="/revoke")
    started = datetime.now(UTC)
    response = await disconnect(stub, iid)
    assert response.revocation == Outcome.REVOCATION_OUTCOME_PENDING
    assert response.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    assert len(revocations(fake)) == 1
    assert fake.is_grant_active(refresh), "the 503 revoked nothing"

    row = await db_row(broker, iid)
    assert row.revocation == "PENDING"
    assert row.revocation_attempts == 1
    assert row.refresh_token_ct is not None, "kept while the revocation is pending"
    # Backoff: the first retry is due about 5 s later.
    due = row.next_revocation_at
    due = due if due.tzinfo else due.replace(tzinfo=UTC)
    assert started + timedelta(seconds=4) <= due <= datetime.now(UTC) + timedelta(seconds=6)

    # Never served while pending.
    await expect_disconnected(stub, iid)
    # A second Disconnect while pending says so and does not call the provider again.
    again = await disconnect(stub, iid)
    assert again.revocation == Outcome.REVOCATION_OUTCOME_PENDING
    assert len(revocations(fake)) == 1

    revoker = broker.runtime.revoker
    assert await revoker.retry_pending() == 0, "not due yet"
    assert len(revocations(fake)) == 1

    await make_due(broker, iid)
    assert await revoker.retry_pending() == 1
    sent = revocations(fake)
    assert [(r.body.get("token"), r.body.get("token_type_hint")) for r in sent[1:]] == [
        (refresh, "refresh_token"),
        (access, "access_token"),
    ]
    assert not fake.is_grant_active(refresh)
    row = await db_row(broker, iid)
    assert row.revocation == "REVOKED"
    assert row.revocation_attempts == 2
    assert row.next_revocation_at is None
    assert_wiped(row)
    await expect_disconnected(stub, iid)

    # Idempotent afterwards: REVOKED, nothing more sent, nothing left to retry.
    after = await disconnect(stub, iid)
    assert after.revocation == Outcome.REVOCATION_OUTCOME_REVOKED
    await make_due(broker, iid)
    assert await revoker.retry_pending() == 0
    assert len(revocations(fake)) == 3


async def test_failed_retry_backs_off_exponentially(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, refresh = await store_grant(stub, fake)
    fake.fail_next("unavailable", times=2, path="/revoke")
    assert (await disconnect(stub, iid)).revocation == Outcome.REVOCATION_OUTCOME_PENDING
    await make_due(broker, iid)
    before = datetime.now(UTC)
    assert await broker.runtime.revoker.retry_pending() == 1
    row = await db_row(broker, iid)
    assert row.revocation == "PENDING"
    assert row.revocation_attempts == 2
    due = row.next_revocation_at
    due = due if due.tzinfo else due.replace(tzinfo=UTC)
    assert before + timedelta(seconds=9) <= due <= datetime.now(UTC) + timedelta(seconds=11)
    assert row.refresh_token_ct is not None
    assert fake.is_grant_active(refresh)


async def test_pending_gives_up_as_failed_after_the_last_attempt(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    fake.fail_always("unavailable", path="/revoke")
    assert (await disconnect(stub, iid)).revocation == Outcome.REVOCATION_OUTCOME_PENDING
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == iid)
            .values(revocation_attempts=revocation_module.MAX_ATTEMPTS - 1)
        )
    await make_due(broker, iid)
    assert await broker.runtime.revoker.retry_pending() == 1
    row = await db_row(broker, iid)
    assert row.revocation == "FAILED"
    assert row.next_revocation_at is None
    assert_wiped(row)
    again = await disconnect(stub, iid)
    assert again.revocation == Outcome.REVOCATION_OUTCOME_FAILED
    await expect_disconnected(stub, iid)


async def test_refused_revocation_is_failed_and_wiped(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    fake.fail_next("invalid_client", path="/revoke")
    response = await disconnect(stub, iid)
    assert response.revocation == Outcome.REVOCATION_OUTCOME_FAILED
    row = await db_row(broker, iid)
    assert row.revocation == "FAILED"
    assert_wiped(row)
    assert await broker.runtime.revoker.retry_pending() == 0


async def test_reconnect_while_pending_still_revokes_the_old_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, old_refresh = await store_grant(stub, fake)
    fake.fail_next("unavailable", path="/revoke")
    assert (await disconnect(stub, iid)).revocation == Outcome.REVOCATION_OUTCOME_PENDING
    # The user connects again at once: a new grant for the same owner.
    new_iid, new_access, new_refresh = await store_grant(stub, fake)
    assert new_iid == iid, "StoreIntegration upserts on (user, provider, account)"
    got = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert got.access_token == new_access
    # Background retries run until nothing is pending.
    await make_due(broker, iid)
    await broker.runtime.revoker.retry_pending()
    assert fake.is_grant_active(new_refresh), "the new grant must survive"
    assert not fake.is_grant_active(old_refresh), "the disconnected grant must be revoked"


# -- no provider call ---------------------------------------------------------------------------


async def test_skip_provider_revocation(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, refresh = await store_grant(stub, fake)
    response = await disconnect(stub, iid, skip_provider_revocation=True)
    assert response.revocation == Outcome.REVOCATION_OUTCOME_SKIPPED
    assert response.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED
    assert revocations(fake) == []
    assert fake.is_grant_active(refresh)
    row = await db_row(broker, iid)
    assert row.revocation == "SKIPPED"
    assert_wiped(row)
    await expect_disconnected(stub, iid)
    again = await disconnect(stub, iid)
    assert again.revocation == Outcome.REVOCATION_OUTCOME_SKIPPED
    assert fake.requests == []


async def test_provider_without_revocation_url_is_not_supported(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, refresh = await store_grant(stub, fake, provider="norevoke")
    response = await disconnect(stub, iid)
    assert response.revocation == Outcome.REVOCATION_OUTCOME_NOT_SUPPORTED
    assert fake.requests == []
    assert fake.is_grant_active(refresh)
    row = await db_row(broker, iid)
    assert row.revocation == "NOT_SUPPORTED"
    assert_wiped(row)
    await expect_disconnected(stub, iid)


async def test_reconnect_after_disconnect_serves_the_new_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    await disconnect(stub, iid)
    again, access, _ = await store_grant(stub, fake)
    assert again == iid
    got = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert got.access_token == access
    integration = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN
    )
    assert integration.integration.status == pb.INTEGRATION_STATUS_CONNECTED
    assert not integration.integration.HasField("disconnected_at")


# -- several replicas --------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])  # replicas share a database on PostgreSQL
async def test_no_replica_serves_a_cached_token_after_disconnect(
    backend: str, settings: Settings, fake: FakeAuthServer
) -> None:
    """Replica B has the token in its hot-path cache; Disconnect through replica A; B must
    refuse from then on (invalidation across replicas on PostgreSQL)."""
    assert backend == "postgres"
    a = await start(settings)
    b = await start(settings)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as channel_b,
        ):
            stub_a = pb_grpc.CredentialBrokerStub(channel_a)
            stub_b = pb_grpc.CredentialBrokerStub(channel_b)
            for n in range(10):
                iid, access, _ = await store_grant(stub_a, fake, user_id=f"user-{n}")
                for _ in range(2):  # the second one is answered from B's cache
                    got = await stub_b.GetAccessToken(
                        pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN
                    )
                    assert got.access_token == access
                response = await disconnect(stub_a, iid)
                assert response.revocation == Outcome.REVOCATION_OUTCOME_REVOKED
                await expect_disconnected(stub_b, iid)
    finally:
        await b.stop(0)
        await a.stop(0)
