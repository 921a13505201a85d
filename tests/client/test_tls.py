"""The client over TLS: a bearer token with the server verified, and mTLS where the client
certificate alone identifies the caller (same broker set-up as tests/test_tls.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.config import Settings
from broker.server.app import Broker
from credentialbroker_client import AsyncBrokerClient, PermissionDenied, Tls, Unavailable
from tests.helpers.pki import Pki, tls_settings
from tests.helpers.settings import ADMIN_TOKEN


# A broker that wants a client certificate from the throwaway CA (``pki``).
@pytest.fixture
def settings(database_url: str, pki: Pki) -> Settings:
    return tls_settings(database_url, pki)


@pytest.fixture
def backend() -> str:
    """TLS is decided before storage is touched."""
    return "sqlite"


@pytest.fixture
async def admin(broker: Broker, pki: Pki, tmp_path: Path) -> AsyncIterator[AsyncBrokerClient]:
    """Bearer token over TLS; this broker wants a client certificate from its CA for any call."""
    for name, data in (("cert", pki.stranger.cert), ("key", pki.stranger.key)):
        (tmp_path / f"stranger.{name}").write_bytes(data)
    tls = Tls.from_files(
        ca=pki.files["ca"], cert=tmp_path / "stranger.cert", key=tmp_path / "stranger.key"
    )
    async with AsyncBrokerClient(f"localhost:{broker.port}", token=ADMIN_TOKEN, tls=tls) as client:
        yield client


async def test_mtls_identity_calls_without_a_token(
    broker: Broker, pki: Pki, admin: AsyncBrokerClient
) -> None:
    stored = await admin.store_integration(user_id="u1", provider="twitter", access_token="at-1")
    iid = stored.integration.id
    runner_tls = Tls(pki.ca.pem, pki.runner.cert, pki.runner.key, server_name="localhost")
    async with AsyncBrokerClient(f"127.0.0.1:{broker.port}", tls=runner_tls) as runner:
        got = await runner.get_access_token(integration_id=iid)
        assert got.access_token == "at-1"
        # The certificate's caller has its own policy: GetAccessToken and GetIntegration only.
        with pytest.raises(PermissionDenied):
            await runner.store_integration(user_id="u1", provider="twitter", access_token="x")


async def test_a_broker_from_another_ca_is_refused(broker: Broker, pki: Pki) -> None:
    wrong = Tls(pki.other_ca.pem, pki.runner.cert, pki.runner.key)
    async with AsyncBrokerClient(f"localhost:{broker.port}", tls=wrong, timeout=3) as client:
        with pytest.raises(Unavailable):
            await client.get_integration(integration_id="x")
