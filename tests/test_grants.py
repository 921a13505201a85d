"""Run-scoped grants against a real broker, on both backends: what a runner that
requires a grant may read with one, and every way it is refused without a fitting one."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy import select, text

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.storage.tables import audit_events, metadata
from tests.helpers.clock import FakeClock
from tests.helpers.errors import expect_error
from tests.helpers.grants import (
    GRANT_RUNNER,
    LIMITED_TOKEN,
    OTHER_TOKEN,
    PLAIN_TOKEN,
    TENANT_TOKEN,
    grant_callers,
    with_grant,
)
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, make_settings

Code = grpc.StatusCode
TENANT = (("authorization", f"Bearer {TENANT_TOKEN}"),)
OTHER = (("authorization", f"Bearer {OTHER_TOKEN}"),)
LIMITED = (("authorization", f"Bearer {LIMITED_TOKEN}"),)
PLAIN = (("authorization", f"Bearer {PLAIN_TOKEN}"),)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, callers=grant_callers())


@pytest.fixture
async def broker(settings: Settings, clock: FakeClock) -> AsyncIterator[Broker]:
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


async def create_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub, md: Any = ADMIN, **fields: Any
) -> pb.CreateGrantResponse:
    values: dict[str, Any] = {"user_id": "user-a", "providers": ["twitter"], "run_id": "run-1"}
    values.update(fields)
    return await stub.CreateGrant(pb.CreateGrantRequest(**values), metadata=md)


async def seed(stub: pb_grpc.CredentialBrokerAsyncStub) -> dict[str, str]:
    """user-a: twitter and google; user-b: twitter. Returns integration ids by name."""
    ids = {}
    for name, user, provider in (
        ("a-twitter", "user-a", "twitter"),
        ("a-google", "user-a", "google"),
        ("b-twitter", "user-b", "twitter"),
    ):
        stored = await stub.StoreIntegration(
            store_request(user_id=user, provider=provider, access_token=f"at-{name}"),
            metadata=ADMIN,
        )
        ids[name] = stored.integration.id
    return ids


async def audit_rows(broker: Broker, method: str) -> list[Any]:
    async with broker.engine.connect() as conn:
        query = select(audit_events).where(audit_events.c.method == method)
        return list((await conn.execute(query.order_by(audit_events.c.occurred_at))).all())


async def test_runner_reads_only_under_a_fitting_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    ids = await seed(stub)
    created = await create_grant(stub)
    assert created.grant_token.startswith("cbg_")
    token = created.grant_token
    md = with_grant(GRANT_RUNNER, token)

    async def refused(request: pb.GetAccessTokenRequest, md: Any, code: Code, reason: str) -> None:
        await expect_error(stub.GetAccessToken(request, metadata=md), code, reason)

    by_owner = pb.GetAccessTokenRequest(user_id="user-a", provider="twitter")
    # No grant at all.
    await refused(by_owner, GRANT_RUNNER, Code.PERMISSION_DENIED, "GRANT_REQUIRED")
    # A grant for user A asking for user B, by owner and by id.
    await refused(
        pb.GetAccessTokenRequest(user_id="user-b", provider="twitter"),
        md,
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    await refused(
        pb.GetAccessTokenRequest(integration_id=ids["b-twitter"]),
        md,
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    # Another provider of the same user, by owner and by integration id.
    await refused(
        pb.GetAccessTokenRequest(user_id="user-a", provider="google"),
        md,
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    await refused(
        pb.GetAccessTokenRequest(integration_id=ids["a-google"]),
        md,
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    # A token that is no grant of ours.
    await refused(
        by_owner, with_grant(GRANT_RUNNER, "cbg_" + "x" * 43), Code.UNAUTHENTICATED, "GRANT_INVALID"
    )
    # An empty one (a client whose grant variable is unset) is refused, not ignored, even
    # from a caller that needs no grant: what it presents would narrow its call.
    await refused(by_owner, with_grant(ADMIN, ""), Code.UNAUTHENTICATED, "GRANT_INVALID")

    # The fitting request is served, by owner and by id.
    served = await stub.GetAccessToken(by_owner, metadata=md)
    assert served.access_token == "at-a-twitter"
    by_id = pb.GetAccessTokenRequest(integration_id=ids["a-twitter"])
    assert (await stub.GetAccessToken(by_id, metadata=md)).access_token == "at-a-twitter"

    # Expired: refused from the cached expiry, without a database trip.
    clock.now += timedelta(minutes=15, seconds=1)
    await refused(by_owner, md, Code.UNAUTHENTICATED, "GRANT_EXPIRED")
    clock.now -= timedelta(minutes=15, seconds=1)

    # Revoked.
    await stub.RevokeGrant(pb.RevokeGrantRequest(grant_id=created.grant_id), metadata=ADMIN)
    await refused(by_owner, md, Code.UNAUTHENTICATED, "GRANT_REVOKED")

    events = await audit_rows(broker, "GetAccessToken")
    ok = [e for e in events if e.outcome == "OK"]
    assert len(ok) == 2
    assert {(e.grant_id, e.run_id) for e in ok} == {(created.grant_id, "run-1")}
    refusals = [e for e in events if e.outcome != "OK"]
    assert len(refusals) == 9
    assert all(e.integration_id != ids["b-twitter"] or e.outcome != "OK" for e in events)
    expired = [e for e in refusals if e.detail == "grant refused: GRANT_EXPIRED"]
    assert [e.grant_id for e in expired] == [created.grant_id]


async def test_grant_by_integration_id_and_by_provider(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    ids = await seed(stub)
    by_id = await create_grant(stub, providers=[], integration_ids=[ids["a-google"]])
    by_provider = await create_grant(stub, providers=["twitter"])
    # Connected after both grants were created: a second twitter account of user A.
    later = await stub.StoreIntegration(
        store_request(user_id="user-a", provider="twitter", account_id="second"),
        metadata=ADMIN,
    )
    later_id = later.integration.id
    md_id = with_grant(GRANT_RUNNER, by_id.grant_token)
    md_provider = with_grant(GRANT_RUNNER, by_provider.grant_token)

    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-a", provider="google"), metadata=md_id
    )
    assert got.integration_id == ids["a-google"]
    # Ids cover exactly those rows; providers cover integrations connected later too.
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=later_id), metadata=md_id),
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=later_id), metadata=md_provider
    )
    assert got.integration_id == later_id

    # Listing and GetIntegration see only the grant's user and integrations.
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-a"), metadata=md_id
    )
    assert [i.id for i in listed.integrations] == [ids["a-google"]]
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-a"), metadata=md_provider
    )
    assert sorted(i.id for i in listed.integrations) == sorted([ids["a-twitter"], later_id])
    await expect_error(
        stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-b"), metadata=md_id),
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    await expect_error(
        stub.GetIntegration(
            pb.GetIntegrationRequest(integration_id=ids["a-twitter"]), metadata=md_id
        ),
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    # An integration id of another user cannot be put into a grant.
    await expect_error(
        create_grant(stub, providers=[], integration_ids=[ids["b-twitter"]]),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        contains="integration_ids",
    )


async def test_no_escalation(stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker) -> None:
    ids = await seed(stub)
    # The issuer may read only twitter: it cannot grant google, by provider or by id (an id
    # of a provider it may not see is, to it, no integration at all).
    await expect_error(create_grant(stub, LIMITED, providers=["google"]), Code.PERMISSION_DENIED)
    await expect_error(
        create_grant(stub, LIMITED, providers=[], integration_ids=[ids["a-google"]]),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )
    # Its grants last at most its max_grant_ttl (10 minutes), whatever is asked.
    capped = await create_grant(stub, LIMITED, ttl=duration_pb2.Duration(seconds=7200))
    lifetime = capped.grant.expires_at.ToDatetime() - capped.grant.created_at.ToDatetime()
    assert lifetime == timedelta(minutes=10)
    default = await create_grant(stub)
    lifetime = default.grant.expires_at.ToDatetime() - default.grant.created_at.ToDatetime()
    assert lifetime == timedelta(minutes=15)

    md = with_grant(GRANT_RUNNER, default.grant_token)
    # A grant never authorises a write, the authorization flow, or creating grants.
    for call in (
        stub.StoreIntegration(store_request(user_id="user-a"), metadata=md),
        stub.Disconnect(pb.DisconnectRequest(integration_id=ids["a-twitter"]), metadata=md),
        stub.CreateGrant(
            pb.CreateGrantRequest(user_id="user-a", providers=["twitter"]), metadata=md
        ),
        stub.BeginAuthorization(
            pb.BeginAuthorizationRequest(user_id="user-a", provider="twitter"), metadata=md
        ),
        stub.RevokeGrant(pb.RevokeGrantRequest(grant_id=default.grant_id), metadata=md),
    ):
        await expect_error(call, Code.PERMISSION_DENIED, "GRANT_SCOPE")
    # Without a grant the runner is refused everything, writes included.
    await expect_error(
        stub.StoreIntegration(store_request(user_id="user-a"), metadata=GRANT_RUNNER),
        Code.PERMISSION_DENIED,
        "GRANT_REQUIRED",
    )
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-a"), metadata=ADMIN
    )
    assert len(listed.integrations) == 2, "nothing was stored"
    still = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=ids["a-twitter"]), metadata=md
    )
    assert still.access_token == "at-a-twitter"


async def test_audience_and_stolen_grant(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    await seed(stub)
    request = pb.GetAccessTokenRequest(user_id="user-a", provider="twitter")
    only_runner = await create_grant(stub, audience=["runner"])
    await expect_error(
        stub.GetAccessToken(request, metadata=with_grant(OTHER, only_runner.grant_token)),
        Code.PERMISSION_DENIED,
        "GRANT_AUDIENCE",
    )
    served = await stub.GetAccessToken(
        request, metadata=with_grant(GRANT_RUNNER, only_runner.grant_token)
    )
    assert served.access_token == "at-a-twitter"
    # Default audience: callers configured requires_grant, not any caller at all.
    default = await create_grant(stub)
    assert (
        await stub.GetAccessToken(request, metadata=with_grant(OTHER, default.grant_token))
    ).access_token == "at-a-twitter"
    await expect_error(
        stub.GetAccessToken(request, metadata=with_grant(PLAIN, default.grant_token)),
        Code.PERMISSION_DENIED,
        "GRANT_AUDIENCE",
    )
    # ... and its own issuer, whom presenting it only narrows (a lone dev caller tries grants
    # this way, with no audience to name).
    by_issuer = await stub.GetAccessToken(request, metadata=with_grant(ADMIN, default.grant_token))
    assert by_issuer.access_token == "at-a-twitter"
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-b", provider="twitter"),
            metadata=with_grant(ADMIN, default.grant_token),
        ),
        Code.PERMISSION_DENIED,
        "GRANT_SCOPE",
    )
    await expect_error(
        create_grant(stub, audience=["nobody-configured"]),
        Code.INVALID_ARGUMENT,
        contains="audience",
    )
    # A stolen grant token without the runner's own credentials opens nothing.
    await expect_error(
        stub.GetAccessToken(request, metadata=(("x-broker-grant", default.grant_token),)),
        Code.UNAUTHENTICATED,
    )
    await expect_error(
        stub.GetAccessToken(
            request,
            metadata=(
                ("authorization", f"Bearer {default.grant_token}"),
                ("x-broker-grant", default.grant_token),
            ),
        ),
        Code.UNAUTHENTICATED,
    )


async def test_grant_rpcs_show_metadata_and_revoke_by_run(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    await seed(stub)
    first = await create_grant(stub, run_id="run-9")
    second = await create_grant(stub, run_id="run-9", providers=["google"])
    other = await create_grant(stub, run_id="run-10")
    got = await stub.GetGrant(pb.GetGrantRequest(grant_id=first.grant_id), metadata=ADMIN)
    assert got.grant.state == pb.GRANT_STATE_ACTIVE
    assert got.grant.issuer == "admin"
    assert list(got.grant.providers) == ["twitter"]
    assert first.grant_token not in str(got)
    listed = await stub.ListGrants(pb.ListGrantsRequest(run_id="run-9"), metadata=ADMIN)
    assert {g.id for g in listed.grants} == {first.grant_id, second.grant_id}

    revoked = await stub.RevokeGrant(pb.RevokeGrantRequest(run_id="run-9"), metadata=ADMIN)
    assert {g.id for g in revoked.grants} == {first.grant_id, second.grant_id}
    assert all(g.state == pb.GRANT_STATE_REVOKED for g in revoked.grants)
    again = await stub.RevokeGrant(pb.RevokeGrantRequest(grant_id=first.grant_id), metadata=ADMIN)
    assert again.grants[0].revoked_at == revoked.grants[0].revoked_at or again.grants
    for grant in (first, second):
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(user_id="user-a", provider="twitter"),
                metadata=with_grant(GRANT_RUNNER, grant.grant_token),
            ),
            Code.UNAUTHENTICATED,
            "GRANT_REVOKED",
        )
    active = await stub.ListGrants(pb.ListGrantsRequest(user_id="user-a"), metadata=ADMIN)
    assert [g.id for g in active.grants] == [other.grant_id]
    everything = await stub.ListGrants(
        pb.ListGrantsRequest(user_id="user-a", include_inactive=True), metadata=ADMIN
    )
    assert len(everything.grants) == 3
    await expect_error(
        stub.GetGrant(pb.GetGrantRequest(grant_id="no-such-grant"), metadata=ADMIN),
        Code.NOT_FOUND,
        "GRANT_NOT_FOUND",
    )
    await expect_error(
        stub.RevokeGrant(pb.RevokeGrantRequest(), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        contains="grant_id",
    )
    await expect_error(
        stub.CreateGrant(pb.CreateGrantRequest(user_id="user-a"), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        contains="providers",
    )


async def test_expired_grants_are_purged(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, clock: FakeClock
) -> None:
    await seed(stub)
    old = await create_grant(stub)
    clock.now += timedelta(hours=2)
    fresh = await create_grant(stub)
    assert await broker.runtime.grants.purge_expired() == 1
    await expect_error(
        stub.GetGrant(pb.GetGrantRequest(grant_id=old.grant_id), metadata=ADMIN),
        Code.NOT_FOUND,
    )
    await stub.GetGrant(pb.GetGrantRequest(grant_id=fresh.grant_id), metadata=ADMIN)


async def test_grant_tokens_are_nowhere(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    database_url: str,
    clock: FakeClock,
) -> None:
    """Canary: tokens go to the issuer once, and to nothing the broker writes or logs."""
    caplog.set_level(logging.DEBUG)
    await seed(stub)
    tokens = []
    for run in ("canary-1", "canary-2"):
        created = await create_grant(stub, run_id=run)
        tokens.append(created.grant_token)
        md = with_grant(GRANT_RUNNER, created.grant_token)
        await stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-a", provider="twitter"), metadata=md
        )
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(user_id="user-b", provider="twitter"), metadata=md
            ),
            Code.PERMISSION_DENIED,
        )
    await stub.RevokeGrant(pb.RevokeGrantRequest(run_id="canary-1"), metadata=ADMIN)
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-a", provider="twitter"),
            metadata=with_grant(GRANT_RUNNER, tokens[0]),
        ),
        Code.UNAUTHENTICATED,
    )
    clock.now += timedelta(hours=1)
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-a", provider="twitter"),
            metadata=with_grant(GRANT_RUNNER, tokens[1]),
        ),
        Code.UNAUTHENTICATED,
        "GRANT_EXPIRED",
    )
    dumped = []
    async with broker.engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = (await conn.execute(select(table))).all()
            dumped.append(repr(rows))
        if conn.dialect.name == "postgresql":
            # Whatever the schema holds, tables this test does not know included.
            names = (
                await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            ).all()
            for (name,) in names:
                # The names come from the catalogue, not from input.
                rows = (await conn.execute(text(f'SELECT * FROM "{name}"'))).all()  # noqa: S608
                dumped.append(repr(rows))
    everything = "\n".join(dumped)
    assert "canary-1" in everything, "the dump did read the audit trail"
    raw = b""
    if database_url.startswith("sqlite"):
        path = Path(database_url.split("///", 1)[1])
        for suffix in ("", "-wal"):
            file = Path(str(path) + suffix)
            if file.exists():
                raw += file.read_bytes()
    logged = "\n".join(r.getMessage() + repr(r.args) + repr(r.__dict__) for r in caplog.records)
    for token in tokens:
        assert token not in everything
        assert token.encode() not in raw
        assert token not in logged
        assert token[4:] not in everything
        assert token[4:] not in logged


async def test_caller_limited_to_users(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    ids = await seed(stub)
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-a", provider="twitter"), metadata=TENANT
    )
    assert got.access_token == "at-a-twitter"
    for call in (
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-b", provider="twitter"), metadata=TENANT
        ),
        stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-b"), metadata=TENANT),
        stub.StoreIntegration(store_request(user_id="user-b"), metadata=TENANT),
        create_grant(stub, TENANT, user_id="user-b"),
    ):
        await expect_error(call, Code.PERMISSION_DENIED, "PERMISSION_DENIED", contains="user")
    # By id, another user's integration is as good as absent.
    by_id: Any
    for by_id in (
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=ids["b-twitter"]), metadata=TENANT
        ),
        stub.GetIntegration(
            pb.GetIntegrationRequest(integration_id=ids["b-twitter"]), metadata=TENANT
        ),
    ):
        await expect_error(by_id, Code.NOT_FOUND, "INTEGRATION_NOT_FOUND")
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-a"), metadata=TENANT
    )
    assert len(listed.integrations) == 2
    # Its own grants only: another user's grant is as good as absent.
    theirs = await create_grant(stub, user_id="user-b")
    await expect_error(
        stub.GetGrant(pb.GetGrantRequest(grant_id=theirs.grant_id), metadata=TENANT),
        Code.NOT_FOUND,
    )
    await expect_error(
        stub.RevokeGrant(pb.RevokeGrantRequest(grant_id=theirs.grant_id), metadata=TENANT),
        Code.NOT_FOUND,
    )


async def _read_all(call: Any) -> None:
    async for _ in call:
        pass


async def test_event_rpcs_are_not_open_to_a_caller_that_requires_a_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    """The event stream goes through the same grant admission as unary calls: a runner that
    requires a grant is refused without one, and a grant (reads only) never covers events."""
    await seed(stub)
    grant = await create_grant(stub)
    for credentials, reason in (
        (GRANT_RUNNER, "GRANT_REQUIRED"),
        (with_grant(GRANT_RUNNER, grant.grant_token), "GRANT_SCOPE"),
    ):
        watch = stub.WatchIntegrationEvents(
            pb.WatchIntegrationEventsRequest(), metadata=credentials, timeout=10
        )
        await expect_error(_read_all(watch), Code.PERMISSION_DENIED, reason)
        await expect_error(
            stub.ListIntegrationEvents(pb.ListIntegrationEventsRequest(), metadata=credentials),
            Code.PERMISSION_DENIED,
            reason,
        )
    # The caller allowed to watch still streams (the stored integrations' events).
    watch = stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=ADMIN)
    first: Any = await watch.read()
    watch.cancel()
    assert first.event.type == pb.INTEGRATION_EVENT_TYPE_CONNECTED
