"""The authorization-code + PKCE flow run by the broker, against a real fake authorization server,
on both backends: BeginAuthorization → (the user's consent: follow the URL) → Complete."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.domain.authorization import VERIFIER_COLUMN
from broker.model import Owner
from broker.providers.authorize import code_challenge
from broker.server.app import Broker, start
from broker.storage import flows
from broker.storage.tables import audit_events, integrations, oauth_flows
from tests.helpers.audit import AuditTable
from tests.helpers.authorization import begin, code_exchanges, complete, consent, flow_rows, query
from tests.helpers.clock import FakeClock
from tests.helpers.errors import expect_error
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.providers import CALLBACK, acme
from tests.helpers.settings import ADMIN, make_settings

Code = grpc.StatusCode


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(
        database_url,
        providers={
            "acme": acme(fake),
            # Slack-like: the account id comes from the token response.
            "teamy": acme(fake, account_id_path="team.id", pkce=False),
            # The built-in Google profile with just a client: its URL is only built, not used.
            "google": {
                "client_id": "google-client",
                "client_secret": "google-secret",
                "redirect_uris": [CALLBACK],
            },
        },
        refresh={"provider_timeout_seconds": 2, "background": False},
    )


@pytest.fixture
async def broker(settings: Settings, clock: FakeClock) -> AsyncIterator[Broker]:
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- the whole flow -------------------------------------------------------------------------


async def test_begin_consent_complete_then_get_access_token(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, clock: FakeClock
) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"workspace": "w-1"})
    started = await begin(stub, scopes=["read", "write"], metadata=metadata)
    assert started.expires_at.ToDatetime(tzinfo=UTC) == clock.now + timedelta(minutes=10)
    params = query(started.authorization_url)
    assert params["response_type"] == "code"
    assert params["client_id"] == fake.client_id
    assert params["redirect_uri"] == CALLBACK
    assert params["scope"] == "read write"
    assert params["state"] == started.state
    assert params["code_challenge_method"] == "S256"
    assert len(started.state) >= 43  # 32 random bytes

    callback = await consent(started.authorization_url)
    assert callback["state"] == started.state
    done = await complete(stub, state=callback["state"], code=callback["code"])
    integration = done.integration
    assert done.created
    assert integration.user_id == "user-1"
    assert integration.provider == "acme"
    assert integration.account_id == ""
    assert integration.status == pb.INTEGRATION_STATUS_CONNECTED
    assert list(integration.scopes) == ["read", "write"]
    assert dict(integration.metadata) == {"workspace": "w-1"}
    assert integration.has_refresh_token
    expires = integration.expires_at.ToDatetime(tzinfo=UTC)
    assert abs((expires - (clock.now + timedelta(seconds=3600))).total_seconds()) < 1

    token = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=integration.id), metadata=ADMIN
    )
    assert fake.is_access_token_active(token.access_token)
    assert not token.refreshed
    # The token exchange proved possession of the verifier behind the URL's challenge.
    [exchange] = [r for r in fake.requests if r.body.get("grant_type") == "authorization_code"]
    assert code_challenge(exchange.body["code_verifier"]) == params["code_challenge"]
    assert exchange.body["redirect_uri"] == CALLBACK

    # A second authorization of the same account updates the integration (upsert).
    again = await begin(stub)
    callback = await consent(again.authorization_url)
    redone = await complete(stub, state=callback["state"], code=callback["code"])
    assert not redone.created
    assert redone.integration.id == integration.id
    assert list(redone.integration.scopes) == ["read"]  # the profile's default scopes


async def test_account_id_from_token_response_and_pkce_disabled(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    fake.extra_token_fields = {"team": {"id": "T-42", "name": "Team"}}
    started = await begin(stub, provider="teamy", account_id="guess")
    params = query(started.authorization_url)
    assert "code_challenge" not in params
    assert "code_challenge_method" not in params
    [row] = await flow_rows(broker)
    assert row["verifier_ct"] is None
    callback = await consent(started.authorization_url)
    done = await complete(stub, state=callback["state"], code=callback["code"])
    assert done.integration.account_id == "T-42"


async def test_account_id_from_request_when_response_has_none(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    started = await begin(stub, account_id="acct-7")
    callback = await consent(started.authorization_url)
    done = await complete(stub, state=callback["state"], code=callback["code"])
    assert done.integration.account_id == "acct-7"


# -- what is stored ---------------------------------------------------------------------------


async def test_only_the_state_hash_and_an_encrypted_verifier_are_stored(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    started = await begin(stub)
    [row] = await flow_rows(broker)
    assert row["state_hash"] == sha256(started.state)
    assert started.state not in repr(row)
    assert started.state.encode() not in row["verifier_ct"]
    # The verifier is encrypted and bound to its flow: it decrypts under the state hash and
    # the flow's owner only.
    cipher = broker.runtime.authorization.cipher
    owner = Owner(
        row["state_hash"], row["user_id"], row["provider"], row["account_id"], "authorization_code"
    )
    verifier = cipher.decrypt(owner, VERIFIER_COLUMN, row["verifier_ct"])
    assert verifier.encode() not in row["verifier_ct"]
    assert code_challenge(verifier) == query(started.authorization_url)["code_challenge"]

    callback = await consent(started.authorization_url)
    await complete(stub, state=callback["state"], code=callback["code"])
    [row] = await flow_rows(broker)
    assert row["consumed_at"] is not None
    assert row["verifier_ct"] is None  # nothing left to steal from a completed flow


async def test_verifier_moved_to_another_flow_is_data_loss(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    first = await begin(stub)
    second = await begin(stub)
    async with broker.engine.begin() as conn:
        stolen = (
            await conn.execute(
                select(oauth_flows.c.verifier_ct).where(
                    oauth_flows.c.state_hash == sha256(first.state)
                )
            )
        ).scalar_one()
        await conn.execute(
            update(oauth_flows)
            .where(oauth_flows.c.state_hash == sha256(second.state))
            .values(verifier_ct=stolen)
        )
    callback = await consent(second.authorization_url)
    await expect_error(
        complete(stub, state=callback["state"], code=callback["code"]),
        Code.DATA_LOSS,
        "CIPHERTEXT_INVALID",
    )
    assert code_exchanges(fake) == 0


# -- refusals ---------------------------------------------------------------------------------


async def test_code_from_another_flow_fails_pkce(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    # An injected code: issued for flow A (A's challenge), presented with flow B's state, so
    # the broker sends B's verifier and the provider refuses it.
    flow_a = await begin(stub)
    flow_b = await begin(stub)
    code_a = (await consent(flow_a.authorization_url))["code"]
    error = await expect_error(
        complete(stub, state=flow_b.state, code=code_a),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="invalid_grant",
    )
    # The provider's own words ("PKCE verification failed") stay in the log.
    assert "PKCE" not in (error.details() or "")
    assert code_exchanges(fake) == 1
    # B's state is spent too: it cannot be retried with another code.
    await expect_error(
        complete(stub, state=flow_b.state, code=code_a),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
    )


async def test_replayed_state_is_refused(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    await complete(stub, state=callback["state"], code=callback["code"])
    await expect_error(
        complete(stub, state=callback["state"], code=callback["code"]),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="already used",
    )
    assert code_exchanges(fake) == 1


async def test_unknown_state_is_refused(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    await expect_error(
        complete(stub, state="not-a-state-we-issued", code="c"),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="unknown",
    )


async def test_expired_flow_is_refused(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, clock: FakeClock
) -> None:
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    clock.advance(timedelta(minutes=10, seconds=1))
    await expect_error(
        complete(stub, state=callback["state"], code=callback["code"]),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="expired",
    )
    assert code_exchanges(fake) == 0


async def test_unregistered_redirect_uri_is_invalid_argument(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    for uri in ("http://localhost:3000/callback", CALLBACK + "/", CALLBACK + "?x=1"):
        await expect_error(
            begin(stub, redirect_uri=uri),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            contains="redirect_uri",
        )
    assert await flow_rows(broker) == []


async def test_begin_input_validation(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    await expect_error(
        begin(stub, provider="nope"), Code.INVALID_ARGUMENT, "UNKNOWN_PROVIDER", contains="nope"
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u" * 256}, "user_id"),
        ({"redirect_uri": ""}, "redirect_uri"),
        ({"scopes": ["has space"]}, "scopes"),
        ({"account_id": "a\n"}, "account_id"),
    ]
    for fields, name in cases:
        await expect_error(
            begin(stub, **fields), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", contains=name
        )
    assert await flow_rows(broker) == []


async def test_complete_needs_code_or_error(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    started = await begin(stub)
    await expect_error(complete(stub, state=started.state), Code.INVALID_ARGUMENT, contains="code")
    await expect_error(complete(stub, code="c"), Code.INVALID_ARGUMENT, contains="state")
    # Neither refusal spent the flow.
    callback = await consent(started.authorization_url)
    await complete(stub, state=callback["state"], code=callback["code"])


async def test_provider_error_in_callback_closes_the_flow(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    fake.deny_authorization = True
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    assert callback["error"] == "access_denied"
    assert "code" not in callback
    await expect_error(
        complete(
            stub,
            state=callback["state"],
            error=callback["error"],
            error_description="The user said no\r\n" + "x" * 500,
        ),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="access_denied (The user said no xxx",
    )
    [row] = await flow_rows(broker)
    assert row["consumed_at"] is not None
    # Closed: even a code obtained later cannot complete it.
    fake.deny_authorization = False
    code = (await consent(started.authorization_url))["code"]
    await expect_error(
        complete(stub, state=started.state, code=code),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
    )
    assert code_exchanges(fake) == 0


async def test_concurrent_completions_exchange_the_code_once(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    # A slow provider keeps the winner's exchange in flight while the others try.
    fake.latency = 0.3
    results = await asyncio.gather(
        *(complete(stub, state=callback["state"], code=callback["code"]) for _ in range(4)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.CompleteAuthorizationResponse)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1, results
    assert len(lost) == 3
    assert all(e.code() == Code.FAILED_PRECONDITION for e in lost)
    assert code_exchanges(fake) == 1
    # A second use of the code would have made the provider revoke the grant; it is alive,
    # and the stored refresh token works.
    fake.latency = 0
    token = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=won[0].integration.id, force_refresh=True),
        metadata=ADMIN,
    )
    assert token.refreshed
    assert fake.is_access_token_active(token.access_token)


async def test_google_url_has_offline_access_and_consent(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    started = await begin(stub, provider="google")
    parts = urlsplit(started.authorization_url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "accounts.google.com",
        "/o/oauth2/v2/auth",
    )
    params = query(started.authorization_url)
    assert params["access_type"] == "offline"
    assert params["prompt"] == "consent"
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert params["client_id"] == "google-client"
    assert params["redirect_uri"] == CALLBACK
    assert params["response_type"] == "code"
    assert params["scope"] == "openid email"
    assert params["state"] == started.state
    # The alias works too and the flow is stored under the provider's one name.
    aliased = await begin(stub, provider="gmail")
    assert query(aliased.authorization_url)["client_id"] == "google-client"


# -- purge ------------------------------------------------------------------------------------


async def test_purge_removes_old_flows_only(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    done = await begin(stub)
    callback = await consent(done.authorization_url)
    await complete(stub, state=callback["state"], code=callback["code"])
    await begin(stub)  # abandoned
    assert await broker.runtime.authorization.purge_expired() == 0
    clock.advance(timedelta(minutes=50))
    fresh = await begin(stub)
    assert await broker.runtime.authorization.purge_expired() == 0
    clock.advance(timedelta(minutes=25))
    # Completed 75 minutes ago and expired 65 minutes ago: both go; the fresh one stays.
    assert await broker.runtime.authorization.purge_expired() == 2
    [row] = await flow_rows(broker)
    assert row["state_hash"] == sha256(fresh.state)


async def test_run_purger_purges_in_the_background(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    await begin(stub)
    clock.advance(timedelta(hours=2))
    task = asyncio.create_task(broker.runtime.authorization.run_purger(0.05))
    try:
        for _ in range(100):
            if not await flow_rows(broker):
                break
            await asyncio.sleep(0.05)
        assert await flow_rows(broker) == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_no_state_code_verifier_or_token_in_logs(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    done = await complete(stub, state=callback["state"], code=callback["code"])
    token = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=done.integration.id), metadata=ADMIN
    )
    [exchange] = [r for r in fake.requests if r.body.get("grant_type") == "authorization_code"]
    secrets = [started.state, callback["code"], exchange.body["code_verifier"], token.access_token]
    # The test's own browser stand-in (httpx) logs the URL it opens; the broker must not.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("broker"))
    assert "authorization completed" in logged
    for secret in secrets:
        assert secret not in logged


async def test_consume_waits_for_and_loses_to_an_uncommitted_consume(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    # What makes two replicas' completions safe: the second conditional UPDATE blocks on the
    # first one's row (PostgreSQL) or database (SQLite) lock, then matches nothing.
    key = sha256((await begin(stub)).state)

    async def consume_in_own_transaction() -> bool:
        async with broker.engine.begin() as conn:
            return await flows.consume(conn, key, clock())

    async with broker.engine.connect() as first:
        await first.begin()
        assert await flows.consume(first, key, clock())
        second = asyncio.create_task(consume_in_own_transaction())
        await asyncio.sleep(0.3)
        assert not second.done()
        await first.commit()
    assert await second is False


async def test_begin_and_complete_write_nothing_when_their_event_cannot_be(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    database_url: str,
    fake: FakeAuthServer,
) -> None:
    """The audit store failing: BeginAuthorization stores no flow, CompleteAuthorization no
    integration; both answer UNAVAILABLE."""
    audit = AuditTable(database_url)
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    flows_before = await flow_rows(broker)
    await audit.hide()
    try:
        await expect_error(begin(stub, user_id="user-2"), Code.UNAVAILABLE, "AUDIT_UNAVAILABLE")
        assert len(await flow_rows(broker)) == len(flows_before)
        await expect_error(
            complete(stub, state=callback["state"], code=callback["code"]),
            Code.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        async with broker.engine.connect() as conn:
            assert (await conn.execute(select(integrations))).all() == []
    finally:
        await audit.restore()
    again = await begin(stub)
    callback = await consent(again.authorization_url)
    done = await complete(stub, state=callback["state"], code=callback["code"])
    assert done.created


async def test_callback_of_another_user_is_refused_before_the_code_exchange(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    """The attacker begins a flow for themselves and sends the link to the victim; the
    victim's session (user-victim) receives the callback. Nothing is exchanged or stored."""
    started = await begin(stub, user_id="attacker")
    callback = await consent(started.authorization_url)
    await expect_error(
        complete(stub, state=callback["state"], code=callback["code"], user_id="victim"),
        Code.PERMISSION_DENIED,
        "AUTHORIZATION_USER_MISMATCH",
    )
    assert code_exchanges(fake) == 0
    # The flow is consumed: not even the user who began it can finish it now.
    await expect_error(
        complete(stub, state=callback["state"], code=callback["code"], user_id="attacker"),
        Code.FAILED_PRECONDITION,
        "AUTHORIZATION_FLOW_INVALID",
        contains="already used",
    )
    assert code_exchanges(fake) == 0
    for user in ("attacker", "victim"):
        listed = await stub.ListIntegrations(
            pb.ListIntegrationsRequest(user_id=user), metadata=ADMIN
        )
        assert list(listed.integrations) == []
    async with broker.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(audit_events).where(audit_events.c.method == "CompleteAuthorization")
            )
        ).all()
    refused = [r for r in rows if r.outcome == "PERMISSION_DENIED"]
    assert len(refused) == 1
    assert refused[0].user_id == "attacker"
    assert "not the user who began" in (refused[0].detail or "")


async def test_complete_without_user_id_is_invalid_and_keeps_the_flow(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    started = await begin(stub)
    callback = await consent(started.authorization_url)
    await expect_error(
        stub.CompleteAuthorization(
            pb.CompleteAuthorizationRequest(state=callback["state"], code=callback["code"]),
            metadata=ADMIN,
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="user_id",
    )
    assert code_exchanges(fake) == 0
    done = await complete(stub, state=callback["state"], code=callback["code"])
    assert done.integration.user_id == "user-1"
