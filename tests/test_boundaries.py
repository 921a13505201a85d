"""Every boundary between callers, attacked as a caller with valid credentials would, against a
real broker on both backends: grants another caller issued, integration ids of users or
providers outside the caller's policy (one NOT_FOUND, word for word), an authorization code
for a user the caller may not touch (refused before the provider sees it), and a caller's
free text on its way into events and webhooks."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from tests.helpers.authorization import code_exchanges, consent
from tests.helpers.errors import error_info, expect_error
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.providers import CALLBACK, acme
from tests.helpers.receiver import Receiver
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, make_settings
from tests.helpers.waiting import eventually

Code = grpc.StatusCode


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


ISSUER = bearer("issuer-b-token")  # may touch alice and bob
BOBS = bearer("caller-a-token")  # limited to bob
OPS = bearer("ops-token")  # manages every grant, within bob
TWITTER_ONLY = bearer("twitter-only-token")
GOOGLE_ONLY = bearer("google-only-token")
TWITTER_OPS = bearer("twitter-ops-token")  # manages every grant, within twitter
RUNNER = bearer("boundary-runner-token")
WEBHOOK_SECRET_ENV = "TEST_BOUNDARY_WEBHOOK_SECRET"


def callers() -> dict[str, Any]:
    return {
        "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
        "issuer-b": {"token_sha256": hash_token("issuer-b-token"), "users": ["alice", "bob"]},
        "caller-a": {"token_sha256": hash_token("caller-a-token"), "users": ["bob"]},
        "ops": {
            "token_sha256": hash_token("ops-token"),
            "users": ["bob"],
            "manage_all_grants": True,
        },
        "twitter-only": {
            "token_sha256": hash_token("twitter-only-token"),
            "providers": ["twitter"],
        },
        "twitter-ops": {
            "token_sha256": hash_token("twitter-ops-token"),
            "providers": ["twitter"],
            "manage_all_grants": True,
        },
        "google-only": {"token_sha256": hash_token("google-only-token"), "providers": ["google"]},
        "runner": {"token_sha256": hash_token("boundary-runner-token"), "requires_grant": True},
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def settings(
    database_url: str, fake: FakeAuthServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3")
    return make_settings(
        database_url,
        callers=callers(),
        providers={"acme": acme(fake)},
        refresh={"provider_timeout_seconds": 2, "background": False},
        webhooks={
            "app": {
                "url": receiver.url,
                "secret_env": WEBHOOK_SECRET_ENV,
                "retry_first_seconds": 0.05,
                "retry_max_seconds": 0.2,
                "timeout_seconds": 2,
            }
        },
        events={"poll_seconds": 0.1},
    )


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    running = await start(settings)
    yield running
    await running.stop(0)


async def store(stub: pb_grpc.CredentialBrokerAsyncStub, user: str, provider: str) -> str:
    response = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id=user, provider=provider, access_token=f"at-{user}-{provider}"
        ),
        metadata=ADMIN,
    )
    return str(response.integration.id)


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def shape(error: grpc.aio.AioRpcError, some_id: str) -> tuple[Any, ...]:
    """What a caller can tell from a refusal, with the id it asked about taken out."""
    info = error_info(error)
    assert info is not None
    return (
        error.code(),
        info.reason,
        (error.details() or "").replace(some_id, "<id>"),
        sorted(info.metadata),
        sorted(v.replace(some_id, "<id>") for v in info.metadata.values()),
    )


# -- grants: the issuer's, within the caller's users and providers ----------------------------


async def test_a_caller_cannot_see_or_revoke_another_callers_grants(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    await store(stub, "alice", "twitter")
    await store(stub, "bob", "twitter")
    for_alice = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="alice", providers=["twitter"], run_id="run-alice"),
        metadata=ISSUER,
    )
    # bob is inside caller A's own policy: still B's grant, not A's to manage.
    for_bob = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="bob", providers=["twitter"], run_id="run-bob"),
        metadata=ISSUER,
    )
    unknown = str(uuid.uuid4())
    missing = shape(
        await failure(stub.GetGrant(pb.GetGrantRequest(grant_id=unknown), metadata=BOBS)),
        unknown,
    )
    assert missing[:2] == (Code.NOT_FOUND, "GRANT_NOT_FOUND")
    for theirs in (for_alice, for_bob):
        gid = theirs.grant_id
        for call in (
            stub.GetGrant(pb.GetGrantRequest(grant_id=gid), metadata=BOBS),
            stub.RevokeGrant(pb.RevokeGrantRequest(grant_id=gid), metadata=BOBS),
        ):
            assert shape(await failure(call), gid) == missing
    for run in ("run-alice", "run-bob"):
        revoked = await stub.RevokeGrant(pb.RevokeGrantRequest(run_id=run), metadata=BOBS)
        assert list(revoked.grants) == []
        listed = await stub.ListGrants(
            pb.ListGrantsRequest(run_id=run, include_inactive=True), metadata=BOBS
        )
        assert list(listed.grants) == []
    by_user = await stub.ListGrants(
        pb.ListGrantsRequest(user_id="bob", include_inactive=True), metadata=BOBS
    )
    assert list(by_user.grants) == []
    # Its own grant it manages as before.
    own = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="bob", providers=["twitter"], run_id="run-bob"),
        metadata=BOBS,
    )
    listed = await stub.ListGrants(pb.ListGrantsRequest(run_id="run-bob"), metadata=BOBS)
    assert [g.id for g in listed.grants] == [own.grant_id]
    # Both of B's grants still work for the runner, and B still sees them unrevoked.
    for theirs, user in ((for_alice, "alice"), (for_bob, "bob")):
        got = await stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id=user, provider="twitter"),
            metadata=(*RUNNER, ("x-broker-grant", theirs.grant_token)),
        )
        assert got.access_token == f"at-{user}-twitter"
        seen = await stub.GetGrant(pb.GetGrantRequest(grant_id=theirs.grant_id), metadata=ISSUER)
        assert not seen.grant.HasField("revoked_at")


async def test_manage_all_grants_stays_within_the_callers_users(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    await store(stub, "alice", "twitter")
    await store(stub, "bob", "twitter")
    for_alice = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="alice", providers=["twitter"], run_id="run-1"),
        metadata=ISSUER,
    )
    for_bob = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="bob", providers=["twitter"], run_id="run-1"),
        metadata=ISSUER,
    )
    listed = await stub.ListGrants(pb.ListGrantsRequest(run_id="run-1"), metadata=OPS)
    assert [g.id for g in listed.grants] == [for_bob.grant_id]
    await expect_error(
        stub.GetGrant(pb.GetGrantRequest(grant_id=for_alice.grant_id), metadata=OPS),
        Code.NOT_FOUND,
        "GRANT_NOT_FOUND",
    )
    revoked = await stub.RevokeGrant(pb.RevokeGrantRequest(run_id="run-1"), metadata=OPS)
    assert [g.id for g in revoked.grants] == [for_bob.grant_id]
    alice = await stub.GetGrant(pb.GetGrantRequest(grant_id=for_alice.grant_id), metadata=ISSUER)
    assert not alice.grant.HasField("revoked_at")


async def test_a_provider_limited_caller_manages_only_grants_within_its_providers(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    twitter_id = await store(stub, "alice", "twitter")
    await store(stub, "alice", "google")
    by_provider = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="alice", providers=["twitter"], run_id="run-t"),
        metadata=ADMIN,
    )
    google = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="alice", providers=["google"], run_id="run-t"),
        metadata=ADMIN,
    )
    # Ids were checked against the admin's policy, not the twitter operator's: not its own.
    by_id = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="alice", integration_ids=[twitter_id], run_id="run-t"),
        metadata=ADMIN,
    )
    listed = await stub.ListGrants(pb.ListGrantsRequest(run_id="run-t"), metadata=TWITTER_OPS)
    assert [g.id for g in listed.grants] == [by_provider.grant_id]
    for hidden in (google, by_id):
        await expect_error(
            stub.GetGrant(pb.GetGrantRequest(grant_id=hidden.grant_id), metadata=TWITTER_OPS),
            Code.NOT_FOUND,
            "GRANT_NOT_FOUND",
        )
    revoked = await stub.RevokeGrant(pb.RevokeGrantRequest(run_id="run-t"), metadata=TWITTER_OPS)
    assert [g.id for g in revoked.grants] == [by_provider.grant_id]


# -- integration ids: missing and unseen look the same ---------------------------------------


async def test_another_users_or_providers_integration_id_is_not_found_word_for_word(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    alices = await store(stub, "alice", "twitter")
    googles = await store(stub, "bob", "google")
    unknown = str(uuid.uuid4())

    def calls(iid: str, md: Any) -> list[Any]:
        return [
            stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=md),
            stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=md),
            stub.Disconnect(
                pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True),
                metadata=md,
            ),
            stub.CreateGrant(
                pb.CreateGrantRequest(user_id="bob", integration_ids=[iid]), metadata=md
            ),
        ]

    for md, theirs in ((BOBS, alices), (TWITTER_ONLY, googles)):
        for absent, present in zip(calls(unknown, md), calls(theirs, md), strict=True):
            expected = shape(await failure(absent), unknown)
            assert expected[:2] == (Code.NOT_FOUND, "INTEGRATION_NOT_FOUND")
            assert shape(await failure(present), theirs) == expected
    # Nothing was disconnected by the attempts.
    for iid in (alices, googles):
        got = await stub.GetIntegration(
            pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN
        )
        assert got.integration.status == pb.INTEGRATION_STATUS_CONNECTED


# -- the authorization code: the caller's policy comes first -----------------------------------


async def test_a_caller_outside_the_user_or_provider_never_gets_the_code_exchanged(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    for md, problem in ((BOBS, "user 'alice'"), (GOOGLE_ONLY, "provider 'acme'")):
        begun = await stub.BeginAuthorization(
            pb.BeginAuthorizationRequest(user_id="alice", provider="acme", redirect_uri=CALLBACK),
            metadata=ADMIN,
        )
        callback = await consent(begun.authorization_url)
        await expect_error(
            stub.CompleteAuthorization(
                pb.CompleteAuthorizationRequest(
                    state=callback["state"], code=callback["code"], user_id="alice"
                ),
                metadata=md,
            ),
            Code.PERMISSION_DENIED,
            "PERMISSION_DENIED",
            contains=problem,
        )
        assert code_exchanges(fake) == 0
    listed = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="alice"), metadata=ADMIN
    )
    assert list(listed.integrations) == []


# -- caller text in events and webhooks ---------------------------------------------------------

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f]")


def cleaned(field: str, action: str) -> float:
    value = REGISTRY.get_sample_value(
        "broker_caller_text_cleaned_total", {"field": field, "action": action}
    )
    return value or 0.0


async def test_disconnect_reason_is_capped_stripped_and_marked_as_the_callers(
    stub: pb_grpc.CredentialBrokerAsyncStub, receiver: Receiver
) -> None:
    iid = await store(stub, "alice", "twitter")
    stripped, truncated = cleaned("reason", "stripped"), cleaned("reason", "truncated")
    unit = "ok\x00\x1b[2J\r\nFAKE: integration.connected\u202e\u2028\x7f\x85 "
    reason = (unit * (100 * 1024 // len(unit) + 1))[: 100 * 1024]
    response = await stub.Disconnect(
        pb.DisconnectRequest(integration_id=iid, reason=reason, skip_provider_revocation=True),
        metadata=ADMIN,
    )
    stored_reason = response.integration.disconnect_reason
    assert 0 < len(stored_reason) <= 255
    assert stored_reason.startswith("ok [2J FAKE: integration.connected ok")
    assert stored_reason.endswith("…")
    assert not _UNPRINTABLE.search(stored_reason)
    assert cleaned("reason", "stripped") == stripped + 1
    assert cleaned("reason", "truncated") == truncated + 1

    events = await stub.ListIntegrationEvents(
        pb.ListIntegrationEventsRequest(user_id="alice"), metadata=ADMIN
    )
    by_type = {e.type: e for e in events.events}
    gone = by_type[pb.INTEGRATION_EVENT_TYPE_DISCONNECTED]
    assert gone.message == stored_reason
    assert gone.message_source == "caller"
    assert by_type[pb.INTEGRATION_EVENT_TYPE_CONNECTED].message_source == "broker"

    async def both_delivered() -> bool:
        return len(receiver.delivered_ids()) >= 2

    await eventually(both_delivered, "the two webhooks")
    bodies = [json.loads(r.body) for r in receiver.received() if r.status == 200]
    data = next(b["data"] for b in bodies if b["type"] == "integration.disconnected")
    assert data["message"] == stored_reason
    assert data["message_source"] == "caller"
    connected = next(b["data"] for b in bodies if b["type"] == "integration.connected")
    assert connected["message_source"] == "broker"
    # Short enough for any limit, yet invisible characters that would make the text shown
    # differ from the text stored: stripped too.
    other = await store(stub, "alice", "google")
    short = await stub.Disconnect(
        pb.DisconnectRequest(
            integration_id=other,
            reason="\u202eevil\u200b\x7f\x85 text",
            skip_provider_revocation=True,
        ),
        metadata=ADMIN,
    )
    assert short.integration.disconnect_reason == "evil text"
    raw = b"".join(r.body for r in receiver.received())
    assert b"\\u0000" not in raw
    assert b"\\u001b" not in raw
    assert b"\\u202e" not in raw
