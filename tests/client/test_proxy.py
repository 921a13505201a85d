"""proxy() on both clients against a real broker and a real HTTP API on loopback: the
provider's answer comes back as a small object; the token never reaches the client."""

from __future__ import annotations

import asyncio
import json

import pytest

from broker.config import Settings
from broker.server.app import Broker
from broker.server.callers import hash_token
from broker_devtools.fakeapi import FakeApi
from broker_devtools.fakeauth import FakeAuthServer
from credentialbroker_client import (
    AsyncBrokerClient,
    BrokerClient,
    InvalidArgument,
    ProviderUnavailable,
    ProxyResponse,
    TokenExposureDenied,
)
from tests.client.conftest import FAST, audited
from tests.helpers.providers import acme
from tests.helpers.settings import ADMIN_TOKEN, make_settings

PROXY_TOKEN = "client-proxy-only-token"


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer, api: FakeApi) -> Settings:
    return make_settings(
        database_url,
        providers={
            "acme": {**acme(fake), "api_base_url": api.url + "/v1"},
            "down": {"kinds": ["api_key"], "api_base_url": "http://127.0.0.1:9/"},
        },
        callers={
            "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
            "worker": {"token_sha256": hash_token(PROXY_TOKEN), "proxy_only": True},
        },
        refresh={"background": False},
    )


async def test_async_and_sync_proxy_return_the_providers_answer(
    broker: Broker, fake: FakeAuthServer, api: FakeApi
) -> None:
    access, refresh = fake.issue_grant()
    target = f"127.0.0.1:{broker.port}"
    async with AsyncBrokerClient(target, token=ADMIN_TOKEN, retry=FAST) as admin:
        stored = await admin.store_integration(
            user_id="u1", provider="acme", access_token=access, refresh_token=refresh
        )
    iid = stored.integration.id
    async with AsyncBrokerClient(target, token=PROXY_TOKEN, retry=FAST) as worker:
        response = await worker.proxy(
            integration_id=iid,
            method="post",
            path="/messages",
            query={"channel": "C1"},
            json={"text": "hi"},
            request_headers={"X-Trace": "1"},
        )
        assert isinstance(response, ProxyResponse)
        assert response.status == 200
        assert response.ok
        assert response.json()["ok"] is True
        assert access not in repr(response)
        with pytest.raises(TokenExposureDenied):
            await worker.get_access_token(integration_id=iid)
        with pytest.raises(InvalidArgument):
            await worker.proxy(integration_id=iid, path="/../admin")
    got = api.requests[-1]
    assert (got.method, got.path, got.query) == ("POST", "/v1/messages", [("channel", "C1")])
    assert json.loads(got.body) == {"text": "hi"}
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-trace"] == "1"
    assert got.headers["authorization"] == f"Bearer {access}"

    def sync_call() -> ProxyResponse:
        with BrokerClient(target, token=PROXY_TOKEN, retry=FAST) as client:
            return client.proxy(user_id="u1", provider="acme", path="/me")

    answer = await asyncio.to_thread(sync_call)
    assert answer.status == 200
    assert api.requests[-1].path == "/v1/me"


async def test_a_post_is_not_retried_when_the_provider_is_unreachable(
    broker: Broker, api: FakeApi
) -> None:
    async with AsyncBrokerClient(
        f"127.0.0.1:{broker.port}", token=ADMIN_TOKEN, retry=FAST
    ) as admin:
        stored = await admin.store_integration(
            user_id="u1", provider="down", credential={"api_key": {"key": "k", "header": "X-K"}}
        )
        request_id = "proxy-post-no-retry"
        with pytest.raises(ProviderUnavailable):
            await admin.proxy(
                integration_id=stored.integration.id,
                method="POST",
                path="/x",
                body=b"once",
                request_id=request_id,
            )
    assert await audited(broker, request_id) == 1
