"""Every RPC through the async and sync clients, the request id and the exception mapping,
against a real broker on both backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest

from broker.server.app import Broker
from broker_devtools.fakeauth import FakeAuthServer
from credentialbroker_client import (
    AmbiguousIntegration,
    AsyncBrokerClient,
    AuthorizationFlowInvalid,
    BrokerClient,
    IntegrationNotFound,
    InvalidArgument,
    NeedsReauthorization,
    PermissionDenied,
    ReauthorizationRequired,
    Unauthenticated,
    UnknownProvider,
    broker_pb2,
)
from tests.client.conftest import audited, store_grant
from tests.helpers.providers import CALLBACK
from tests.helpers.settings import RUNNER_TOKEN


async def test_every_rpc_round_trips(
    broker: Broker, client: AsyncBrokerClient, fake: FakeAuthServer
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    stored = await client.store_integration(
        user_id="u1",
        provider="acme",
        access_token="at-first",
        refresh_token="rt-first",
        expires_at=expires,
        scopes=["read"],
        metadata={"team": "blue"},
    )
    assert stored.created
    iid = stored.integration.id
    assert stored.integration.metadata["team"] == "blue"
    assert stored.integration.expires_at.ToDatetime(tzinfo=UTC) == expires

    by_selector = await client.get_access_token(
        user_id="u1", provider="acme", min_valid_for=timedelta(minutes=5)
    )
    by_id = await client.get_access_token(integration_id=iid, min_valid_for=60)
    assert by_selector.access_token == by_id.access_token == "at-first"
    assert by_id.integration_id == iid
    assert not by_id.refreshed

    got = await client.get_integration(integration_id=iid)
    assert got.integration.provider == "acme"
    assert got.integration.has_refresh_token

    for n in range(3):
        await client.store_integration(
            user_id="u2", provider="acme", account_id=f"a{n}", access_token=f"at-{n}"
        )
    page = await client.list_integrations(user_id="u2", page_size=2)
    assert len(page.integrations) == 2
    assert page.next_page_token
    walked = [i.account_id async for i in client.iter_integrations(user_id="u2", page_size=2)]
    assert sorted(walked) == ["a0", "a1", "a2"]
    connected = await client.list_integrations(
        user_id="u2", status=broker_pb2.INTEGRATION_STATUS_CONNECTED
    )
    assert len(connected.integrations) == 3

    gone = await client.disconnect(integration_id=iid, reason="user left")
    assert gone.integration.status == broker_pb2.INTEGRATION_STATUS_DISCONNECTED
    assert gone.revocation == broker_pb2.REVOCATION_OUTCOME_REVOKED
    assert next(r.body.get("token") for r in fake.requests if r.path == "/revoke") == "rt-first"

    begun = await client.begin_authorization(user_id="u3", provider="acme", redirect_uri=CALLBACK)
    async with httpx.AsyncClient() as http:
        consent = await http.get(begun.authorization_url)
    callback = {k: v[0] for k, v in parse_qs(urlsplit(consent.headers["location"]).query).items()}
    done = await client.complete_authorization(
        state=callback["state"], code=callback["code"], user_id="u3"
    )
    assert done.created
    assert done.integration.user_id == "u3"
    with pytest.raises(AuthorizationFlowInvalid):
        await client.complete_authorization(
            state=callback["state"], code=callback["code"], user_id="u3"
        )


async def test_generic_call_takes_a_message_or_a_mapping(
    client: AsyncBrokerClient, fake: FakeAuthServer
) -> None:
    iid = await store_grant(client, fake)
    by_message = await client.call(
        "GetAccessToken", broker_pb2.GetAccessTokenRequest(integration_id=iid), timeout=5
    )
    by_mapping = await client.call(
        "GetAccessToken", {"integration_id": iid, "min_valid_for": 30, "required_scopes": ["read"]}
    )
    assert isinstance(by_message, broker_pb2.GetAccessTokenResponse)
    assert by_message.access_token == by_mapping.access_token
    with pytest.raises(ValueError, match="no RPC 'GetAccesToken'"):
        await client.call("GetAccesToken", {"integration_id": iid})
    with pytest.raises(TypeError, match="no field 'integration'"):
        await client.call("GetAccessToken", {"integration": iid})
    with pytest.raises(TypeError, match="takes GetAccessTokenRequest"):
        await client.call("GetAccessToken", broker_pb2.GetIntegrationRequest(integration_id=iid))


async def test_request_id_is_sent_kept_and_returned(
    broker: Broker, client: AsyncBrokerClient
) -> None:
    await client.store_integration(
        user_id="u1", provider="acme", access_token="at", request_id="client-req-1"
    )
    assert await audited(broker, "client-req-1") == 1
    with pytest.raises(IntegrationNotFound) as caught:
        await client.get_access_token(user_id="nobody", provider="acme", request_id="client-req-2")
    assert caught.value.request_id == "client-req-2"
    assert await audited(broker, "client-req-2") == 1
    # Without one, the client makes one up, and the error names the id the broker logged.
    with pytest.raises(IntegrationNotFound) as generated:
        await client.get_access_token(user_id="nobody", provider="acme")
    request_id = generated.value.request_id
    assert request_id
    assert await audited(broker, request_id) == 1
    assert request_id in str(generated.value)


async def test_errors_map_to_classes_with_code_reason_and_metadata(
    broker: Broker, client: AsyncBrokerClient, fake: FakeAuthServer
) -> None:
    with pytest.raises(IntegrationNotFound) as missing:
        await client.get_integration(integration_id="00000000-0000-0000-0000-000000000000")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == "INTEGRATION_NOT_FOUND"

    with pytest.raises(InvalidArgument) as invalid:
        await client.get_access_token(integration_id="x", user_id="u1", provider="acme")
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.metadata.get("field")

    with pytest.raises(UnknownProvider) as unknown:
        await client.store_integration(user_id="u1", provider="nope", access_token="at")
    assert isinstance(unknown.value, InvalidArgument)
    assert unknown.value.metadata["field"] == "provider"

    for account in ("a", "b"):
        await client.store_integration(
            user_id="u9", provider="acme", account_id=account, access_token="at"
        )
    with pytest.raises(AmbiguousIntegration):
        await client.get_access_token(user_id="u9", provider="acme")
    assert (
        await client.get_access_token(user_id="u9", provider="acme", account_id="b")
    ).access_token

    # The provider rejects the refresh token: the user must authorize again. Not retried.
    iid = await store_grant(client, fake, expires_in=10)
    fake.fail_next("invalid_grant")
    with pytest.raises(NeedsReauthorization) as reauth:
        await client.get_access_token(integration_id=iid, min_valid_for=60, request_id="reauth-1")
    assert NeedsReauthorization is ReauthorizationRequired
    assert reauth.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert reauth.value.reason == "REAUTHORIZATION_REQUIRED"
    assert fake.refresh_calls == 1
    assert await audited(broker, "reauth-1") == 1

    async with AsyncBrokerClient(f"127.0.0.1:{broker.port}", token="wrong") as stranger:
        with pytest.raises(Unauthenticated) as denied:
            await stranger.get_integration(integration_id=iid)
        assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncBrokerClient(f"127.0.0.1:{broker.port}", token=RUNNER_TOKEN) as runner:
        assert (
            await runner.get_access_token(user_id="u9", provider="acme", account_id="a")
        ).access_token
        with pytest.raises(PermissionDenied) as refused:
            await runner.store_integration(user_id="u1", provider="acme", access_token="at")
        assert "StoreIntegration" in refused.value.message


async def test_sync_client(broker: Broker, fake: FakeAuthServer) -> None:
    """The blocking client, run in a worker thread while this loop serves the broker."""
    from tests.helpers.settings import ADMIN_TOKEN

    def use() -> None:
        with BrokerClient(f"127.0.0.1:{broker.port}", token=ADMIN_TOKEN, timeout=20) as client:
            access, refresh = fake.issue_grant()
            stored = client.store_integration(
                user_id="s1",
                provider="acme",
                access_token=access,
                refresh_token=refresh,
                expires_in_seconds=10,
            )
            iid = stored.integration.id
            # Inside the refresh margin: the broker refreshes at the fake provider.
            got = client.get_access_token(integration_id=iid, min_valid_for=60)
            assert got.refreshed
            assert got.access_token != access
            assert client.get_integration(integration_id=iid).integration.id == iid
            assert [i.id for i in client.iter_integrations(user_id="s1")] == [iid]
            assert client.call("GetIntegration", {"integration_id": iid}).integration.id == iid
            with pytest.raises(IntegrationNotFound) as missing:
                client.get_access_token(
                    user_id="s1", provider="acme", account_id="other", request_id="sync-1"
                )
            assert missing.value.request_id == "sync-1"
            gone = client.disconnect(integration_id=iid, skip_provider_revocation=True)
            assert gone.revocation == broker_pb2.REVOCATION_OUTCOME_SKIPPED

    await asyncio.to_thread(use)
    assert await audited(broker, "sync-1") == 1


async def test_credential_kinds_store_and_answer_headers(
    broker: Broker, client: AsyncBrokerClient
) -> None:
    """A nested message field takes a mapping; GetAccessToken answers ready-to-apply headers."""
    stored = await client.store_integration(
        user_id="k1",
        provider="keyed",
        credential={
            "api_key": {"key": "sk-example", "header": "Authorization", "prefix": "Bearer "}
        },
    )
    assert stored.integration.credential_type == broker_pb2.CREDENTIAL_TYPE_API_KEY
    got = await client.get_access_token(user_id="k1", provider="keyed", min_valid_for=3600)
    assert got.credential_type == broker_pb2.CREDENTIAL_TYPE_API_KEY
    assert dict(got.headers) == {"Authorization": "Bearer sk-example"}
    with pytest.raises(InvalidArgument):
        await client.store_integration(
            user_id="k1", provider="keyed", credential=broker_pb2.Credential()
        )
