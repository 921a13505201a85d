"""TLS and mTLS with a throwaway CA made here with ``cryptography``: a client certificate's SAN
is the caller's identity (same policies as bearer tokens); no certificate, a certificate from
another CA or an unknown identity is refused. Plaintext beyond loopback needs an explicit
setting. TLS sits in front of storage, so SQLite is enough."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.errors import ConfigError
from broker.server import app as server_app
from broker.server.app import Broker, start
from broker.storage.tables import audit_events
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.pki import Pem, Pki, tls_settings
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode


@pytest.fixture
def backend() -> str:
    """Overrides the sqlite/postgres parameter: TLS is decided before storage is touched."""
    return "sqlite"


# A broker that wants a client certificate from the throwaway CA (``pki``).
@pytest.fixture
def settings(database_url: str, pki: Pki) -> Settings:
    return tls_settings(database_url, pki)


def credentials(pki: Pki, client: Pem | None, root: bytes | None = None) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=root if root is not None else pki.ca.pem,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )


def tls_stub(broker: Broker, creds: Any, host: str = "127.0.0.1") -> tuple[Any, Any]:
    channel = grpc.aio.secure_channel(f"{host}:{broker.port}", creds)
    return channel, pb_grpc.CredentialBrokerStub(channel)


@pytest.fixture
async def admin_stub(broker: Broker, pki: Pki) -> AsyncIterator[pb_grpc.CredentialBrokerAsyncStub]:
    """A bearer-token caller over mTLS (any certificate from the CA gets through the handshake)."""
    channel, stub = tls_stub(broker, credentials(pki, pki.stranger))
    async with channel:
        yield stub


async def store(stub: pb_grpc.CredentialBrokerAsyncStub, provider: str = "twitter") -> str:
    response = await stub.StoreIntegration(
        store_request(provider=provider, scopes=[]), metadata=ADMIN
    )
    return str(response.integration.id)


# -- mTLS -------------------------------------------------------------------------------------


async def test_good_client_certificate_calls_without_bearer(
    broker: Broker, pki: Pki, admin_stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    iid = await store(admin_stub)
    channel, stub = tls_stub(broker, credentials(pki, pki.runner))
    async with channel:
        got = await stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=(("x-request-id", "mtls-1"),)
        )
        assert got.integration_id == iid
        assert got.access_token
    async with broker.engine.connect() as conn:
        row = (
            await conn.execute(select(audit_events).where(audit_events.c.request_id == "mtls-1"))
        ).one()
    assert row.caller == "workflow-runner"
    assert row.method == "GetAccessToken"
    assert row.integration_id == iid


async def test_certificate_identity_gets_its_own_policy(
    broker: Broker, pki: Pki, admin_stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    google = await store(admin_stub, "google")
    channel, stub = tls_stub(broker, credentials(pki, pki.runner))
    async with channel:
        await expect_error(
            stub.StoreIntegration(store_request(scopes=[])),
            Code.PERMISSION_DENIED,
            contains="StoreIntegration",
        )
        await expect_error(
            stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=google)),
            Code.NOT_FOUND,
            "INTEGRATION_NOT_FOUND",
        )
        # A bearer token does not widen a certificate caller's policy: the certificate wins.
        await expect_error(
            stub.StoreIntegration(store_request(scopes=[]), metadata=ADMIN),
            Code.PERMISSION_DENIED,
            contains="StoreIntegration",
        )


async def test_uri_san_identity(
    broker: Broker, pki: Pki, admin_stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    await store(admin_stub)
    channel, stub = tls_stub(broker, credentials(pki, pki.spiffe))
    async with channel:
        listed = await stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"))
        assert [i.provider for i in listed.integrations] == ["twitter"]
        await expect_error(
            stub.GetAccessToken(pb.GetAccessTokenRequest(user_id="user-1", provider="twitter")),
            Code.PERMISSION_DENIED,
            contains="GetAccessToken",
        )


async def test_no_client_certificate_fails_the_handshake(broker: Broker, pki: Pki) -> None:
    channel, stub = tls_stub(broker, credentials(pki, None))
    async with channel:
        await expect_error(
            stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN, timeout=5
            ),
            Code.UNAVAILABLE,
        )


async def test_client_certificate_from_another_ca_fails_the_handshake(
    broker: Broker, pki: Pki
) -> None:
    channel, stub = tls_stub(broker, credentials(pki, pki.impostor))
    async with channel:
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(user_id="user-1", provider="twitter"), timeout=5
            ),
            Code.UNAVAILABLE,
        )


async def test_plaintext_client_is_refused(broker: Broker) -> None:
    async with broker_stub(broker.port) as stub:
        await expect_error(
            stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN, timeout=5
            ),
            Code.UNAVAILABLE,
        )


async def test_unknown_identity_without_bearer_is_unauthenticated(
    broker: Broker, pki: Pki, admin_stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    iid = await store(admin_stub)
    channel, stub = tls_stub(broker, credentials(pki, pki.stranger))
    async with channel:
        await expect_error(
            stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid)),
            Code.UNAUTHENTICATED,
            contains="stranger.internal",
        )
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=iid),
                metadata=(("authorization", "Bearer not-a-caller"),),
            ),
            Code.UNAUTHENTICATED,
        )
        # The same connection with a configured bearer token is that caller.
        got = await stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN
        )
        assert got.integration_id == iid


@pytest.mark.parametrize("lookalike", ["cn-only", "cn-beside-dns", "email", "uri"])
async def test_identity_outside_the_configured_san_type_is_no_caller(
    broker: Broker, pki: Pki, admin_stub: pb_grpc.CredentialBrokerAsyncStub, lookalike: str
) -> None:
    """The runner is configured by DNS SAN: a certificate carrying the same name as its subject
    CN, an email address or a URI (which a CA may issue to anyone who controls a mailbox or
    asks for a CN) is not the runner."""
    iid = await store(admin_stub)
    channel, stub = tls_stub(broker, credentials(pki, pki.lookalikes[lookalike]))
    async with channel:
        await expect_error(
            stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), timeout=5),
            Code.UNAUTHENTICATED,
            contains="not a configured caller",
        )


async def test_email_identity_when_configured_so(
    broker: Broker, pki: Pki, admin_stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    await store(admin_stub)
    channel, stub = tls_stub(broker, credentials(pki, pki.mailer))
    async with channel:
        listed = await stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"))
        assert [i.provider for i in listed.integrations] == ["twitter"]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("dns:runner.internal", True),
        ("uri:spiffe://broker.test/x", True),
        ("ip:10.0.0.7", True),
        ("runner.internal", True),
        ("spiffe://broker.test/x", True),
        ("cn:runner", False),
        ("ops@broker.test", False),
        ("dns:", False),
    ],
)
def test_tls_identity_names_its_san_type(value: str, accepted: bool) -> None:
    callers = {"c": {"tls_identity": value}}
    if accepted:
        Settings.model_validate({"callers": callers})
    else:
        with pytest.raises(ValidationError, match="tls_identity"):
            Settings.model_validate({"callers": callers})


# -- server TLS only ------------------------------------------------------------------------------


@pytest.fixture
def server_tls_settings(database_url: str, pki: Pki) -> Settings:
    return make_settings(
        database_url,
        tls={"cert_file": str(pki.files["cert"]), "key_file": str(pki.files["key"])},
    )


async def test_server_tls_only_works_with_bearer_tokens(
    server_tls_settings: Settings, pki: Pki
) -> None:
    broker = await start(server_tls_settings)
    try:
        channel, stub = tls_stub(broker, credentials(pki, None))
        async with channel:
            iid = await store(stub)
            got = await stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN
            )
            assert got.integration_id == iid
            await expect_error(
                stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid)),
                Code.UNAUTHENTICATED,
                contains="authorization",
            )
        # The client checks the server: a client trusting another CA refuses to talk.
        channel, stub = tls_stub(broker, credentials(pki, None, root=pki.other_ca.pem))
        async with channel:
            await expect_error(
                stub.ListIntegrations(
                    pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN, timeout=5
                ),
                Code.UNAVAILABLE,
            )
    finally:
        await broker.stop(0)


async def test_tls_on_a_non_loopback_address_needs_no_insecure_setting(
    database_url: str, pki: Pki
) -> None:
    # 127.0.0.2 is not on the broker's loopback list, so it counts as "the network" here
    # while the test still only touches loopback.
    settings = make_settings(
        database_url,
        server={"listen": "127.0.0.2:0"},
        tls={"cert_file": str(pki.files["cert"]), "key_file": str(pki.files["key"])},
    )
    broker = await start(settings)
    try:
        channel, stub = tls_stub(broker, credentials(pki, None), host="127.0.0.2")
        async with channel:
            listed = await stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN
            )
            assert list(listed.integrations) == []
    finally:
        await broker.stop(0)


async def test_unreadable_certificate_file_is_a_config_error(
    database_url: str, pki: Pki, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    settings = make_settings(
        database_url, tls={"cert_file": str(missing), "key_file": str(pki.files["key"])}
    )
    with pytest.raises(ConfigError, match=r"nope\.pem"):
        await start(settings)


# -- plaintext beyond loopback ----------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "127.0.0.2:0"])
async def test_non_loopback_without_tls_is_refused(database_url: str, listen: str) -> None:
    settings = make_settings(database_url, server={"listen": listen})
    with pytest.raises(ConfigError) as caught:
        await start(settings)
    message = str(caught.value)
    assert "TLS" in message
    assert "allow_insecure" in message


class RecordingServer:
    """Stands in for grpc.aio.Server in ``_listen``: records the ports, binds nothing."""

    def __init__(self) -> None:
        self.insecure: list[str] = []
        self.secure: list[str] = []

    def add_insecure_port(self, address: str) -> int:
        self.insecure.append(address)
        return 1

    def add_secure_port(self, address: str, _credentials: Any) -> int:
        self.secure.append(address)
        return 1


def test_all_interfaces_with_allow_insecure_listens_in_clear_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"
    server = RecordingServer()
    settings = make_settings(url, server={"listen": "0.0.0.0:0", "allow_insecure": True})
    with caplog.at_level(logging.WARNING, logger="broker.server"):
        server_app._listen(server, settings)  # type: ignore[arg-type]
    assert server.insecure == ["0.0.0.0:0"]
    assert server.secure == []
    assert any("WITHOUT TLS" in r.getMessage() for r in caplog.records)
    # Loopback needs neither TLS nor the setting, and does not warn.
    caplog.clear()
    quiet = RecordingServer()
    server_app._listen(quiet, make_settings(url))  # type: ignore[arg-type]
    assert quiet.insecure == ["127.0.0.1:0"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_non_loopback_with_allow_insecure_serves_in_clear(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(database_url, server={"listen": "127.0.0.2:0", "allow_insecure": True})
    with caplog.at_level(logging.WARNING, logger="broker.server"):
        broker = await start(settings)
    try:
        assert any("WITHOUT TLS" in r.getMessage() for r in caplog.records)
        async with broker_stub(broker.port, host="127.0.0.2") as stub:
            listed = await stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN
            )
            assert list(listed.integrations) == []
    finally:
        await broker.stop(0)
