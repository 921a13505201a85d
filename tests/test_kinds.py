"""Credential kinds beyond the authorization code (issue 13), end to end over real HTTP against
the fake authorization server, on both backends."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy import select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.crypto import key_id_of
from broker.crypto.keys import generate_key, parse_keyring
from broker.domain.rotation import key_status, reencrypt
from broker.server.app import Broker, start
from broker.storage.tables import audit_events, integrations
from tests.helpers.credentials import (
    APP_KEY,
    APP_PUBLIC,
    EC_KEY,
    EC_PUBLIC,
    OTHER_KEY,
    SA_EMAIL,
    SA_KEY,
    SA_PUBLIC,
    credential,
    minted_credential,
    service_account_json,
    store_credential,
)
from tests.helpers.errors import expect_error
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.grpcurl import Grpcurl, grpcurl_binary
from tests.helpers.leaks import error_texts, record_texts, scan
from tests.helpers.settings import ADMIN, ENVIRONMENT, KEYS, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode
MINTED = ("client_credentials", "service_account", "github_app_installation")


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    def register(server: FakeAuthServer) -> None:
        server.register_service_account(SA_EMAIL, SA_PUBLIC)
        server.register_service_account("ec-robot", EC_PUBLIC)
        server.register_app("42", APP_PUBLIC, {"1001", "1002"})

    yield from serve_fake(register, expires_in=300)


def kind_providers(fake: FakeAuthServer) -> dict[str, Any]:
    return {
        "acme": {
            "token_url": fake.token_url,
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
            "kinds": ["authorization_code", *MINTED],
            "api_url": fake.api_url,
        },
        # Static kinds only: no OAuth client of the broker's own is needed.
        "keysonly": {"kinds": ["api_key", "basic"]},
        # The examples of docs/credential-kinds.md.
        "openai": {"kinds": ["api_key"]},
        "jira": {"kinds": ["basic"]},
    }


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(
        database_url,
        providers=kind_providers(fake),
        refresh={"margin_seconds": 30, "provider_timeout_seconds": 2, "max_attempts": 2},
        # Tests below edit rows behind the broker's back.
        cache={"enabled": False},
    )


async def token(
    stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, min_valid: int = 0
) -> pb.GetAccessTokenResponse:
    return await stub.GetAccessToken(
        pb.GetAccessTokenRequest(
            integration_id=iid, min_valid_for=duration_pb2.Duration(seconds=min_valid)
        ),
        metadata=ADMIN,
    )


async def set_row(broker: Broker, iid: str, **values: Any) -> None:
    async with broker.engine.begin() as conn:
        await conn.execute(update(integrations).where(integrations.c.id == iid).values(**values))


async def row_of(broker: Broker, iid: str) -> Any:
    async with broker.engine.connect() as conn:
        found = (await conn.execute(select(integrations).where(integrations.c.id == iid))).first()
    assert found is not None
    return found._mapping


# -- static kinds ------------------------------------------------------------------------------


async def test_api_key_in_a_header(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    stored = await store_credential(
        stub, credential("api_key", key="sk-123", header="X-Api-Key"), provider="keysonly"
    )
    assert stored.credential_type == pb.CREDENTIAL_TYPE_API_KEY
    assert not stored.HasField("expires_at")
    # A key that does not expire satisfies any min_valid_for.
    got = await token(stub, stored.id, min_valid=86400)
    assert got.credential_type == pb.CREDENTIAL_TYPE_API_KEY
    assert dict(got.headers) == {"X-Api-Key": "sk-123"}
    assert dict(got.query) == {}
    assert got.access_token == "sk-123"
    assert not got.HasField("expires_at")
    assert not got.refreshed


async def test_api_key_with_prefix_and_in_the_query(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    prefixed = await store_credential(
        stub,
        credential("api_key", key="k1", header="Authorization", prefix="Token "),
        provider="keysonly",
    )
    assert dict((await token(stub, prefixed.id)).headers) == {"Authorization": "Token k1"}
    placed = await store_credential(
        stub,
        credential("api_key", key="k2", query_parameter="api_key"),
        provider="keysonly",
        user="user-2",
    )
    got = await token(stub, placed.id)
    assert dict(got.query) == {"api_key": "k2"}
    assert dict(got.headers) == {}


async def test_basic(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    stored = await store_credential(
        stub, credential("basic", username="alice", password="pa:ss wörd"), provider="keysonly"
    )
    got = await token(stub, stored.id)
    assert got.credential_type == pb.CREDENTIAL_TYPE_BASIC
    assert got.token_type == "Basic"
    expected = base64.b64encode("alice:pa:ss wörd".encode()).decode()
    assert dict(got.headers) == {"Authorization": f"Basic {expected}"}


# -- minted kinds ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MINTED)
async def test_minted_kind_mints_caches_and_remints(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer, kind: str
) -> None:
    stored = await store_credential(stub, minted_credential(kind, fake))
    assert stored.credential_type == pb.CredentialType.Value(f"CREDENTIAL_TYPE_{kind.upper()}")
    assert not stored.has_refresh_token
    assert fake.mint_calls == 0, "nothing minted before someone asks"

    first = await token(stub, stored.id)
    assert first.refreshed
    assert fake.mint_calls == 1
    assert fake.is_minted_token_active(first.access_token)
    assert dict(first.headers) == {"Authorization": f"Bearer {first.access_token}"}
    left = first.expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(seconds=200) < left <= timedelta(seconds=300)

    # Cached: still valid for what this caller needs.
    again = await token(stub, stored.id, min_valid=200)
    assert again.access_token == first.access_token
    assert not again.refreshed
    assert fake.mint_calls == 1

    # min_valid_for beyond what is left: a new token is minted.
    await set_row(broker, stored.id, expires_at=datetime.now(UTC) + timedelta(seconds=100))
    fresh = await token(stub, stored.id, min_valid=200)
    assert fresh.refreshed
    assert fresh.access_token != first.access_token
    assert fake.mint_calls == 2
    # Stored encrypted in the row, not only handed out.
    row = await row_of(broker, stored.id)
    assert fresh.access_token.encode() not in row["access_token_ct"]
    assert row["refresh_token_ct"] is None
    assert key_id_of(row["credential_ct"]) == "test1"


async def test_background_refresher_mints_ahead_of_expiry(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    # Never asked for yet: the background pass mints it before any caller waits on it.
    waiting = await store_credential(stub, minted_credential("service_account", fake))
    static = await store_credential(
        stub, credential("api_key", key="k", header="X-Key"), provider="keysonly", user="u2"
    )
    assert await broker.refresher.background_pass() == 1
    assert fake.mint_calls == 1
    got = await token(stub, waiting.id)
    assert not got.refreshed, "already minted"
    assert fake.is_minted_token_active(got.access_token)
    # Close to expiry: minted again ahead of it; far from it (and static kinds): left alone.
    await set_row(broker, waiting.id, expires_at=datetime.now(UTC) + timedelta(seconds=10))
    assert await broker.refresher.background_pass() == 1
    assert (await token(stub, waiting.id)).access_token != got.access_token
    assert await broker.refresher.background_pass() == 0
    assert (await row_of(broker, static.id))["version"] == 1


async def test_requests_the_fake_saw(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    for user, kind in enumerate(MINTED):
        stored = await store_credential(stub, minted_credential(kind, fake), user=f"u{user}")
        await token(stub, stored.id)
    cc, sa, gh = fake.requests
    assert cc.body["grant_type"] == "client_credentials"
    assert cc.body["scope"] == "read"
    assert cc.auth_method == "client_secret_basic"
    assert sa.body["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert "client_secret" not in sa.body
    assert gh.path == "/api/app/installations/1001/access_tokens"
    assert gh.headers["accept"] == "application/vnd.github+json"


async def test_service_account_with_an_ec_key_and_explicit_fields(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    stored = await store_credential(
        stub,
        credential(
            "service_account", private_key=EC_KEY, issuer="ec-robot", subject="someone@x.test"
        ),
    )
    got = await token(stub, stored.id)
    assert fake.is_minted_token_active(got.access_token)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("service_account", {"private_key": OTHER_KEY, "issuer": SA_EMAIL}),
        ("github_app_installation", {"app_id": "42", "private_key": OTHER_KEY}),
        ("github_app_installation", {"app_id": "42", "installation_id": "999"}),
        ("client_credentials", {"client_secret": "wrong"}),
    ],
    ids=["sa-wrong-key", "app-wrong-key", "app-uninstalled", "client-wrong-secret"],
)
async def test_rejected_credential_needs_reauthorization(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    kind: str,
    fields: dict[str, Any],
) -> None:
    base: dict[str, Any] = {
        "service_account": {},
        "client_credentials": {"client_id": fake.client_id},
        "github_app_installation": {"private_key": APP_KEY, "installation_id": "1001"},
    }[kind]
    stored = await store_credential(stub, credential(kind, **{**base, **fields}))
    await expect_error(token(stub, stored.id), Code.FAILED_PRECONDITION, "REAUTHORIZATION_REQUIRED")
    got = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored.id), metadata=ADMIN
    )
    assert got.integration.status == pb.INTEGRATION_STATUS_NEEDS_REAUTHORIZATION
    # Not retried: the next caller hears the same without a provider call.
    calls = fake.mint_calls
    await expect_error(token(stub, stored.id), Code.FAILED_PRECONDITION, "REAUTHORIZATION_REQUIRED")
    assert fake.mint_calls == calls


async def test_revoked_client_and_uninstalled_app_after_a_good_mint(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    cc = await store_credential(stub, minted_credential("client_credentials", fake))
    app = await store_credential(
        stub, minted_credential("github_app_installation", fake), user="u2"
    )
    await token(stub, cc.id)
    await token(stub, app.id)
    fake.revoke_client()
    fake.uninstall("42", "1001")
    for iid in (cc.id, app.id):
        await set_row(broker, iid, expires_at=datetime.now(UTC))
        await expect_error(token(stub, iid), Code.FAILED_PRECONDITION, "REAUTHORIZATION_REQUIRED")
        assert (await row_of(broker, iid))["status"] == "NEEDS_REAUTHORIZATION"


async def test_provider_down_serves_the_minted_token_while_valid(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    stored = await store_credential(stub, minted_credential("client_credentials", fake))
    first = await token(stub, stored.id)
    fake.fail_always("unavailable")
    await set_row(broker, stored.id, expires_at=datetime.now(UTC) + timedelta(seconds=20))
    # Due (margin 30 s) but the provider is down: the token still good for 20 s is served.
    assert (await token(stub, stored.id, min_valid=5)).access_token == first.access_token
    await expect_error(token(stub, stored.id, min_valid=60), Code.UNAVAILABLE)
    assert (await row_of(broker, stored.id))["status"] == "CONNECTED"


# -- contract ----------------------------------------------------------------------------------


async def test_invalid_credentials_are_refused_naming_the_field(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                "provider": "keysonly",
                "access_token": "at",
                "credential": credential("api_key", key="k", header="X"),
            },
            "credential",
        ),
        ({"provider": "keysonly", "credential": credential("api_key", key="k")}, "header"),
        (
            {"provider": "keysonly", "credential": credential("api_key", key="k", header="a b")},
            "credential.api_key.header",
        ),
        (
            {"provider": "keysonly", "credential": credential("client_credentials")},
            "does not take client_credentials",
        ),
        (
            {"provider": "acme", "credential": credential("api_key", key="k", header="X")},
            "does not take api_key",
        ),
        (
            {
                "provider": "acme",
                "credential": credential("service_account", private_key="not a key", issuer="x"),
            },
            "credential.service_account.private_key",
        ),
        (
            {"provider": "acme", "credential": credential("service_account", json_key="{}")},
            "credential.service_account.json_key",
        ),
        (
            {
                "provider": "acme",
                "credential": credential(
                    "github_app_installation", app_id="1", private_key=EC_KEY, installation_id="2"
                ),
            },
            "RS256",
        ),
        (
            {
                "provider": "acme",
                "credential": credential(
                    "client_credentials",
                    client_id="c",
                    client_secret="s",
                    token_url="http://evil.example/token",
                ),
            },
            "token_url",
        ),
        ({"provider": "acme", "credential": pb.Credential()}, "credential"),
    ]
    for fields, needle in cases:
        request = pb.StoreIntegrationRequest(user_id="u", **fields)
        await expect_error(
            stub.StoreIntegration(request, metadata=ADMIN),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            contains=needle,
        )
    async with broker.engine.connect() as conn:
        assert (await conn.execute(select(integrations))).all() == [], "nothing written"


async def test_switching_kinds_on_one_owner(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    minted = await store_credential(stub, minted_credential("client_credentials", fake))
    await token(stub, minted.id)
    # The same (user, provider, account) reconnected with authorization-code tokens.
    back = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="user-1", provider="acme", access_token="at-plain", expires_in_seconds=600
        ),
        metadata=ADMIN,
    )
    assert back.integration.id == minted.id
    assert back.integration.credential_type == pb.CREDENTIAL_TYPE_AUTHORIZATION_CODE
    got = await token(stub, minted.id)
    assert got.access_token == "at-plain"
    assert dict(got.headers) == {"Authorization": "Bearer at-plain"}
    assert (await row_of(broker, minted.id))["credential_ct"] is None


# -- disconnect --------------------------------------------------------------------------------


async def test_disconnect_wipes_and_revokes_an_installation_token(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    app = await store_credential(stub, minted_credential("github_app_installation", fake))
    key = await store_credential(
        stub, credential("api_key", key="k", header="X-Key"), provider="keysonly", user="u2"
    )
    installation_token = (await token(stub, app.id)).access_token
    done = await stub.Disconnect(pb.DisconnectRequest(integration_id=app.id), metadata=ADMIN)
    assert done.revocation == pb.REVOCATION_OUTCOME_REVOKED
    assert not fake.is_minted_token_active(installation_token)
    done = await stub.Disconnect(pb.DisconnectRequest(integration_id=key.id), metadata=ADMIN)
    assert done.revocation == pb.REVOCATION_OUTCOME_NOT_SUPPORTED
    for iid in (app.id, key.id):
        row = await row_of(broker, iid)
        assert (row["credential_ct"], row["access_token_ct"], row["key_id"]) == (None, None, None)
        await expect_error(token(stub, iid), Code.FAILED_PRECONDITION, "INTEGRATION_DISCONNECTED")


# -- encryption --------------------------------------------------------------------------------


async def test_a_moved_private_key_ciphertext_is_data_loss(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    first = await store_credential(stub, minted_credential("service_account", fake))
    second = await store_credential(stub, minted_credential("service_account", fake), user="u2")
    static = await store_credential(
        stub, credential("api_key", key="k", header="X-Key"), provider="keysonly", user="u3"
    )
    blob = (await row_of(broker, first.id))["credential_ct"]
    # Another row's credential column.
    await set_row(broker, second.id, credential_ct=blob)
    await expect_error(token(stub, second.id), Code.DATA_LOSS, "CIPHERTEXT_INVALID")
    # Another column of its own row: a minted token that is really the private key.
    await set_row(
        broker, first.id, access_token_ct=blob, expires_at=datetime.now(UTC) + timedelta(hours=1)
    )
    await expect_error(token(stub, first.id), Code.DATA_LOSS, "CIPHERTEXT_INVALID")
    # A static kind's credential column with another row's private key.
    await set_row(broker, static.id, credential_ct=blob)
    await expect_error(token(stub, static.id), Code.DATA_LOSS, "CIPHERTEXT_INVALID")


async def test_key_rotation_reencrypts_every_credential_column(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    settings: Settings,
) -> None:
    ids = [
        (await store_credential(stub, minted_credential(kind, fake), user=kind)).id
        for kind in MINTED
    ]
    for iid in ids:
        await token(stub, iid)
    ids.append(
        (
            await store_credential(
                stub, credential("basic", username="u", password="p"), provider="keysonly"
            )
        ).id
    )
    before = {iid: await token(stub, iid) for iid in ids}
    new = generate_key("test2")
    rotated = parse_keyring(f"{new},{KEYS}", "test")
    report = await reencrypt(broker.engine, rotated, ENVIRONMENT)
    assert report.complete
    assert not report.failed
    status = await key_status(broker.engine)
    assert set(status) == {"test2"}, "nothing left under the old key"
    # 3 minted rows: credential + access token; 1 static row: credential.
    assert status["test2"].ciphertexts == 3 * 2 + 1
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(integrations))).all()
    for row in rows:
        for column in ("access_token_ct", "refresh_token_ct", "credential_ct"):
            if row._mapping[column] is not None:
                assert key_id_of(row._mapping[column]) == "test2", column
    await broker.stop(0)

    # A broker holding only the new key serves every kind as before, without minting again.
    only_new = make_settings(
        settings.database.url.get_secret_value(),
        providers=kind_providers(fake),
        keys={"keys": new},
        refresh={"margin_seconds": 30},
        cache={"enabled": False},
    )
    mints = fake.mint_calls
    restarted = await start(only_new)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            new_stub = pb_grpc.CredentialBrokerStub(channel)
            for iid in ids:
                got = await token(new_stub, iid)
                assert dict(got.headers) == dict(before[iid].headers)
        assert fake.mint_calls == mints
    finally:
        await restarted.stop(0)


# -- secrecy -----------------------------------------------------------------------------------


async def test_canary_secrets_of_every_kind_never_leak(
    database_url: str, fake: FakeAuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary_key, canary_password = "CANARY-KEY-1", "CANARY-PASS-2"
    settings = make_settings(
        database_url,
        providers=kind_providers(fake),
        refresh={"provider_timeout_seconds": 2, "max_attempts": 1},
        logging={"level": "DEBUG", "access_log_level": "DEBUG"},
    )
    broker = await start(settings)
    errors: list[grpc.aio.AioRpcError] = []
    minted: list[str] = []
    try:
        async with broker_stub(broker.port) as stub:
            creds = [
                ("keysonly", credential("api_key", key=canary_key, header="X-Key")),
                ("keysonly", credential("basic", username="u", password=canary_password)),
                (
                    "acme",
                    credential(
                        "client_credentials",
                        client_id=fake.client_id,
                        client_secret=fake.client_secret,
                    ),
                ),
                ("acme", credential("service_account", json_key=service_account_json())),
                ("acme", minted_credential("github_app_installation", fake)),
                # Rejected by the provider: the error path is scanned too.
                ("acme", credential("service_account", private_key=OTHER_KEY, issuer=SA_EMAIL)),
            ]
            ids = []
            for n, (provider, cred) in enumerate(creds):
                ids.append((await store_credential(stub, cred, provider=provider, user=f"u{n}")).id)
            for iid in ids:
                try:
                    minted.append((await token(stub, iid)).access_token)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
            # A bad request carrying a secret: the error must not echo it.
            try:
                await stub.StoreIntegration(
                    pb.StoreIntegrationRequest(
                        user_id="u0",
                        provider="keysonly",
                        credential=credential("api_key", key=canary_key, header="bad header"),
                    ),
                    metadata=ADMIN,
                )
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)
            listed = [
                await stub.ListIntegrations(pb.ListIntegrationsRequest(user_id=u), metadata=ADMIN)
                for u in [f"u{n}" for n in range(len(creds))]
            ]
            got = [
                await stub.GetIntegration(
                    pb.GetIntegrationRequest(integration_id=i), metadata=ADMIN
                )
                for i in ids
            ]
            await asyncio.sleep(0.2)  # failure audit rows land after the status
            async with broker.engine.connect() as conn:
                audit = (await conn.execute(select(audit_events))).all()
    finally:
        await broker.stop(0)
    assert len(errors) == 2, [e.details() for e in errors]
    assert len(minted) == 5
    needles = {
        canary_key: "API key",
        canary_password: "password",
        fake.client_secret: "client secret",
        "PRIVATE KEY": "a private key",
        SA_KEY.splitlines()[5]: "service-account key material",
        APP_KEY.splitlines()[5]: "App key material",
        OTHER_KEY.splitlines()[5]: "rejected key material",
        **{token: "minted token" for token in minted[2:]},
    }
    leaks: list[str] = []
    for record in caplog.records:
        for text in record_texts(record):
            leaks += scan(text, needles, f"log record {record.name}")
    for error in errors:
        for text in error_texts(error):
            leaks += scan(text, needles, "gRPC error")
    for row in audit:
        leaks += scan(repr(tuple(row)), needles, "audit_events")
    for message in [*listed, *got]:
        leaks += scan(str(message), needles, type(message).__name__)
    assert not leaks, "\n".join(sorted(set(leaks)))
    assert len(audit) >= len(ids) * 3


async def test_audit_records_the_kind(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    key = await store_credential(
        stub, credential("api_key", key="k", header="X-Key"), provider="keysonly", user="u1"
    )
    app = await store_credential(
        stub, minted_credential("github_app_installation", fake), user="u2"
    )
    for iid in (key.id, app.id):
        await token(stub, iid)
    await asyncio.sleep(0.2)
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(audit_events))).all()
    kinds = {(r.integration_id, r.method): r.credential_type for r in rows}
    assert kinds[(key.id, "StoreIntegration")] == "api_key"
    assert kinds[(key.id, "GetAccessToken")] == "api_key"
    assert kinds[(app.id, "GetAccessToken")] == "github_app_installation"


async def test_readme_examples_through_grpcurl(broker: Broker) -> None:
    """The api_key and basic examples of docs/credential-kinds.md, bodies as written, through
    grpcurl."""
    run = Grpcurl(f"127.0.0.1:{broker.port}", grpcurl_binary())
    examples = [
        (
            {
                "user_id": "user-123",
                "provider": "openai",
                "credential": {
                    "api_key": {"key": "sk-example", "header": "Authorization", "prefix": "Bearer "}
                },
            },
            {"Authorization": "Bearer sk-example"},
        ),
        (
            {
                "user_id": "user-123",
                "provider": "jira",
                "credential": {
                    "basic": {"username": "alice@example.com", "password": "api-token-example"}
                },
            },
            {"Authorization": "Basic YWxpY2VAZXhhbXBsZS5jb206YXBpLXRva2VuLWV4YW1wbGU="},
        ),
    ]
    for body, headers in examples:
        stored = await run.call("StoreIntegration", body)
        assert stored.returncode == 0, stored.stderr
        assert "sk-example" not in stored.stdout
        assert "api-token-example" not in stored.stdout
        kind = stored.json()["integration"]["credential_type"]
        assert kind == "CREDENTIAL_TYPE_" + next(iter(body["credential"])).upper()
        got = await run.call(
            "GetAccessToken", {"user_id": "user-123", "provider": body["provider"]}
        )
        assert got.returncode == 0, got.stderr
        assert got.json()["headers"] == headers
        assert got.json()["credential_type"] == kind
