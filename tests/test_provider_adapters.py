"""The named adapters through a real broker: custom providers in the configuration name them
(``[providers.NAME] adapters``), the fake authorization server answers in that provider's
shape, and tokens are stored or authorized, then refreshed with GetAccessToken force_refresh.
Endpoint templates ({tenant}) are filled from each integration's metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker_devtools.fakeapi import FakeApi
from tests.helpers.authorization import begin, complete, consent, query
from tests.helpers.errors import expect_error
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.integrations import row, store_grant, token
from tests.helpers.providers import acme
from tests.helpers.settings import ADMIN, make_settings

Code = grpc.StatusCode

# Each provider is the fake with one shape; the adapters it names are the whole difference.
PROVIDERS: dict[str, list[str]] = {
    "plain": [],
    "nested": ["nested_tokens:data.tokens"],
    "slacky": ["slack_envelope"],
    "stringy": ["string_expires_in"],
    "commas": ["comma_scopes", "scope_on_refresh"],
    "jsony": ["json_token_request"],
    "keeper": ["no_refresh_token_on_refresh"],
    "intuity": ["refresh_expiry_field"],
    "salesy": ["instance_url_metadata"],
}


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer, api: FakeApi) -> Settings:
    providers: dict[str, Any] = {
        name: acme(fake, adapters=adapters, scopes=["read", "write"])
        for name, adapters in PROVIDERS.items()
    }
    providers["tenanted"] = acme(
        fake,
        token_url=fake.url + "/tenants/{tenant}/token",
        authorization_url=fake.url + "/tenants/{tenant}/authorize",
        revocation_url=fake.url + "/tenants/{tenant}/revoke",
        api_base_url=api.url + "/tenants/{tenant}/v1",
    )
    # {tenant} in the API host alone (Mailchimp's {dc}, or a custom Zendesk section that pinned
    # its OAuth endpoints and inherits the catalog's templated API base).
    providers["apionly"] = acme(fake, api_base_url=api.url + "/tenants/{tenant}/v1")
    providers["pinned"] = acme(
        fake, token_url=fake.url + "/tenants/{tenant}/token", template_values={"tenant": "fixed"}
    )
    return make_settings(
        database_url,
        providers=providers,
        refresh={"provider_timeout_seconds": 2, "background": False, "max_attempts": 1},
        # The largest flow metadata the setting allows (the stored limit's size).
        authorization={"max_metadata_bytes": 64 * 1024},
    )


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    running = await start(settings)
    yield running
    await running.stop(0)


def struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


async def refreshes_twice(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, provider: str
) -> str:
    """Store a grant, force two refreshes (the second one uses what the first stored), and
    return the integration id."""
    iid, access, refresh = await store_grant(stub, fake, provider=provider)
    first = await token(stub, iid, force_refresh=True)
    assert first.refreshed
    assert first.access_token != access
    assert fake.is_access_token_active(first.access_token)
    second = await token(stub, iid, force_refresh=True)
    assert second.refreshed
    assert second.access_token != first.access_token
    assert fake.is_access_token_active(second.access_token)
    assert fake.is_grant_active(refresh)
    return iid


@pytest.mark.parametrize(
    ("provider", "path"), [("nested", "data.tokens"), ("slacky", "authed_user")]
)
async def test_nested_tokens(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, provider: str, path: str
) -> None:
    fake.nest_tokens = path
    await refreshes_twice(stub, fake, provider)
    assert fake.rotations == 2  # each rotated refresh token was read from the nested object
    # Without the adapter the same answer has no access_token where RFC 6749 puts it.
    iid, _, _ = await store_grant(stub, fake, provider="plain")
    await expect_error(token(stub, iid, force_refresh=True), Code.UNAVAILABLE)


async def test_string_expires_in(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    fake.string_expires_in = True
    fake.expires_in = 1234
    before = datetime.now(UTC)
    iid = await refreshes_twice(stub, fake, "stringy")
    answer = await token(stub, iid)
    lifetime = answer.expires_at.ToDatetime(tzinfo=UTC) - before
    assert 1200 < lifetime.total_seconds() <= 1240


async def test_comma_scopes(stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer) -> None:
    fake.scope_separator = ","
    started = await begin(stub, provider="commas", scopes=["read", "write"])
    assert query(started.authorization_url)["scope"] == "read,write"
    params = await consent(started.authorization_url)
    done = await complete(stub, state=params["state"], code=params["code"])
    assert list(done.integration.scopes) == ["read", "write"]
    answer = await token(stub, done.integration.id, force_refresh=True)
    assert answer.refreshed
    # scope_on_refresh sends the scopes, joined as this provider reads them.
    assert fake.requests[-1].body["scope"] == "read,write"
    assert list(answer.scopes) == ["read", "write"]


async def test_json_token_request(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    fake.json_only = True
    await refreshes_twice(stub, fake, "jsony")
    assert fake.requests[-1].headers["content-type"] == "application/json"
    iid, _, _ = await store_grant(stub, fake, provider="plain")
    await expect_error(
        token(stub, iid, force_refresh=True), Code.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"
    )


async def test_no_refresh_token_on_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    fake.omit_refresh_token = True
    iid, _, refresh = await store_grant(stub, fake, provider="keeper")
    for _ in range(2):
        assert (await token(stub, iid, force_refresh=True)).refreshed
    # The stored refresh token was kept and presented again.
    presented = [r.body["refresh_token"] for r in fake.requests if r.path == "/token"]
    assert presented == [refresh, refresh]


async def test_refresh_expiry_field(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    # Intuit's name for the refresh token's lifetime; the answer is otherwise standard.
    fake.extra_token_fields = {"x_refresh_token_expires_in": 8726400}
    before = datetime.now(UTC)
    iid = await refreshes_twice(stub, fake, "intuity")
    # Stored as the refresh token's own expiry, as the standard member would be.
    expires_at = (await row(broker, iid)).integration.refresh_token_expires_at
    assert expires_at is not None
    assert 8726400 - 60 < (expires_at - before).total_seconds() <= 8726400 + 60
    # Without the adapter the member means nothing.
    plain = await refreshes_twice(stub, fake, "plain")
    assert (await row(broker, plain)).integration.refresh_token_expires_at is None


async def test_instance_url_metadata(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    fake.extra_token_fields = {
        "instance_url": "https://acme.my.salesforce.test",
        "id": "https://login.salesforce.test/id/00D000000000001/005000000000001",
        "signature": "not kept",
    }
    started = await begin(stub, provider="salesy", metadata=struct(workspace="w-1"))
    params = await consent(started.authorization_url)
    done = await complete(stub, state=params["state"], code=params["code"])
    stored = (await row(broker, done.integration.id)).integration
    assert stored.metadata == {
        "workspace": "w-1",
        "instance_url": "https://acme.my.salesforce.test",
        "id": "https://login.salesforce.test/id/00D000000000001/005000000000001",
    }
    assert (await token(stub, done.integration.id, force_refresh=True)).refreshed
    # Without the adapter nothing of the answer lands in the metadata.
    started = await begin(stub, provider="plain", metadata=struct(workspace="w-2"))
    params = await consent(started.authorization_url)
    done = await complete(stub, state=params["state"], code=params["code"])
    assert (await row(broker, done.integration.id)).integration.metadata == {"workspace": "w-2"}


async def test_the_providers_metadata_is_dropped_rather_than_the_tokens(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    """Flow metadata at the limit BeginAuthorization allows, plus what the answer adds
    (instance_url, id: up to 2 KiB each), would pass the stored limit: the integration is
    stored with the caller's metadata, not refused after the code was exchanged (the tokens
    lost, the grant left live at the provider)."""
    fake.extra_token_fields = {"instance_url": "https://acme.my.salesforce.test/" + "i" * 2000}
    pad = "x" * (64 * 1024 - len('{"pad":""}'))
    started = await begin(stub, provider="salesy", metadata=struct(pad=pad))
    params = await consent(started.authorization_url)
    done = await complete(stub, state=params["state"], code=params["code"])
    stored = (await row(broker, done.integration.id)).integration
    assert stored.metadata == {"pad": pad}
    assert (await token(stub, done.integration.id, force_refresh=True)).refreshed


# -- endpoint templates --------------------------------------------------------------------


async def test_a_template_is_filled_from_the_integrations_metadata(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake, provider="tenanted", metadata=struct(tenant="t-1"))
    assert (await token(stub, iid, force_refresh=True)).refreshed
    assert fake.requests[-1].path == "/tenants/t-1/token"

    started = await begin(stub, provider="tenanted", metadata=struct(tenant="t-2"))
    assert started.authorization_url.startswith(fake.url + "/tenants/t-2/authorize?")
    params = await consent(started.authorization_url)
    done = await complete(stub, state=params["state"], code=params["code"])
    assert fake.requests[-1].path == "/tenants/t-2/token"
    assert (await token(stub, done.integration.id, force_refresh=True)).refreshed
    assert fake.requests[-1].path == "/tenants/t-2/token"


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({}, "metadata.tenant: is required"),
        ({"tenant": "evil.test"}, "metadata.tenant: must be one lowercase DNS label"),
        ({"tenant": "127.0.0.1:9/x"}, "metadata.tenant: must be one lowercase DNS label"),
        ({"tenant": 7}, "metadata.tenant: must be one lowercase DNS label"),
    ],
)
async def test_a_missing_or_unsafe_template_value_is_refused(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    metadata: dict[str, Any],
    problem: str,
) -> None:
    await expect_error(
        store_grant(stub, fake, provider="tenanted", metadata=struct(**metadata)),
        Code.INVALID_ARGUMENT,
        contains=problem,
    )
    await expect_error(
        begin(stub, provider="tenanted", metadata=struct(**metadata)),
        Code.INVALID_ARGUMENT,
        contains=problem,
    )
    assert fake.requests == []


async def test_a_pinned_template_value_ignores_the_metadata(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake, provider="pinned", metadata=struct(tenant="other"))
    assert (await token(stub, iid, force_refresh=True)).refreshed
    assert fake.requests[-1].path == "/tenants/fixed/token"


async def test_proxy_sends_to_the_integrations_api_host(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, access, _ = await store_grant(
        stub, fake, provider="tenanted", metadata=struct(tenant="t-1"), expires_in=3600
    )
    response = await stub.Proxy(
        pb.ProxyRequest(integration_id=iid, method="GET", path="/things"), metadata=ADMIN
    )
    assert response.status == 200
    (sent,) = api.requests
    assert sent.path == "/tenants/t-1/v1/things"
    assert sent.headers["authorization"] == f"Bearer {access}"


async def test_a_template_only_the_api_host_uses_is_needed_by_proxy_alone(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    """Store, authorization, refresh and revocation never send to the API host, so a value
    only it needs (Mailchimp's {dc}, known after the user authorized) does not hold them up;
    Proxy refuses without it and sends nothing."""
    iid, _, _ = await store_grant(stub, fake, provider="apionly", expires_in=3600)
    assert (await token(stub, iid, force_refresh=True)).refreshed
    started = await begin(stub, provider="apionly")
    params = await consent(started.authorization_url)
    done = await complete(stub, state=params["state"], code=params["code"])
    await expect_error(
        stub.Proxy(
            pb.ProxyRequest(integration_id=done.integration.id, method="GET", path="/things"),
            metadata=ADMIN,
        ),
        Code.FAILED_PRECONDITION,
        contains="metadata.tenant",
    )
    assert api.requests == []
    given, access, _ = await store_grant(
        stub, fake, provider="apionly", metadata=struct(tenant="t-3"), expires_in=3600
    )
    response = await stub.Proxy(
        pb.ProxyRequest(integration_id=given, method="GET", path="/things"), metadata=ADMIN
    )
    assert response.status == 200
    (sent,) = api.requests
    assert sent.path == "/tenants/t-3/v1/things"
    assert sent.headers["authorization"] == f"Bearer {access}"
