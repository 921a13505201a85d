"""Ciphertexts are bound to their owner (user, provider, account, credential kind): a row
re-parented in the database underneath a running broker is DATA_LOSS and is sent nowhere;
rows written before owner binding are still served, and `keys reencrypt` upgrades them online,
resumably — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.checks import Level, owner_binding_check
from broker.config import KeysSettings, Settings
from broker.crypto import OWNER_BOUND, ROW_BOUND, associated_data, parse_keyring
from broker.domain.rotation import Progress, RowBound, reencrypt, row_bound_status
from broker.model import Owner
from broker.server.app import Broker, start
from broker.storage.tables import integrations, oauth_flows
from tests.helpers.authorization import code_exchanges, consent
from tests.helpers.cli import broker as cli
from tests.helpers.cli import config as cli_config
from tests.helpers.credentials import credential
from tests.helpers.errors import expect_error
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.providers import CALLBACK, endpoints
from tests.helpers.settings import ADMIN, ENVIRONMENT, KEYS, make_settings

Code = grpc.StatusCode
CT_COLUMNS = {
    "access_token_ct": "access_token",
    "refresh_token_ct": "refresh_token",
    "credential_ct": "credential",
}


@pytest.fixture
def other() -> Iterator[FakeAuthServer]:
    """Another provider's authorization server: it must never see the victim's secrets."""
    yield from serve_fake(expires_in=3600)


def provider(fake: FakeAuthServer) -> dict[str, Any]:
    return {
        **endpoints(fake),
        "redirect_uris": [CALLBACK],
        "kinds": ["authorization_code", "client_credentials"],
    }


def owner_settings(database_url: str, fake: FakeAuthServer, other: FakeAuthServer) -> Settings:
    return make_settings(
        database_url,
        providers={
            "acme": provider(fake),
            "other": provider(other),
            "keysonly": {"kinds": ["api_key", "basic"]},
        },
        refresh={"margin_seconds": 30, "provider_timeout_seconds": 2, "max_attempts": 1},
    )


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer, other: FakeAuthServer) -> Settings:
    return owner_settings(database_url, fake, other)


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[pb_grpc.CredentialBrokerAsyncStub]:
    """A second broker on the same database with keys.require_owner_binding set."""
    strict_settings = settings.model_copy(
        update={"keys": settings.keys.model_copy(update={"require_owner_binding": True})}
    )
    running = await start(strict_settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.CredentialBrokerStub(channel)
    await running.stop(0)


async def store(stub: pb_grpc.CredentialBrokerAsyncStub, **fields: Any) -> pb.Integration:
    values: dict[str, Any] = {"user_id": "victim", "provider": "acme", **fields}
    response = await stub.StoreIntegration(pb.StoreIntegrationRequest(**values), metadata=ADMIN)
    return response.integration


async def token(stub: pb_grpc.CredentialBrokerAsyncStub, **selector: Any) -> str:
    response = await stub.GetAccessToken(pb.GetAccessTokenRequest(**selector), metadata=ADMIN)
    return response.access_token


async def underneath(broker: Broker, iid: str, **values: Any) -> None:
    """A raw UPDATE behind the broker's back (someone with write access to the database),
    then the cache invalidation path, as if another replica had written the row."""
    async with broker.engine.begin() as conn:
        await conn.execute(update(integrations).where(integrations.c.id == iid).values(**values))
    flush(broker)


def flush(broker: Broker) -> None:
    cache = broker.runtime.service.cache
    assert cache is not None
    cache.flush()


async def refused(call: Any, *secrets: str) -> None:
    error = await expect_error(call, Code.DATA_LOSS, "CIPHERTEXT_INVALID")
    for secret in secrets:
        assert secret not in (error.details() or "")


# -- re-parented rows ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value", "selector"),
    [
        ("user_id", "mallory2", {"user_id": "mallory2", "provider": "acme"}),
        ("account_id", "acct-2", {"user_id": "victim", "provider": "acme", "account_id": "acct-2"}),
    ],
    ids=["user_id", "account_id"],
)
async def test_a_row_given_to_another_owner_does_not_decrypt(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    column: str,
    value: str,
    selector: dict[str, Any],
) -> None:
    access, refresh = fake.issue_grant()
    stored = await store(
        stub, account_id="acct-1", access_token=access, refresh_token=refresh,
        expires_in_seconds=3600,
    )  # fmt: skip
    assert await token(stub, integration_id=stored.id) == access

    await underneath(broker, stored.id, **{column: value})
    # By owner (the pooled read) and by id (the reader's fast path): neither serves the token.
    await refused(stub.GetAccessToken(pb.GetAccessTokenRequest(**selector), metadata=ADMIN), access)
    await refused(token(stub, integration_id=stored.id), access)
    # Asking for a refresh does not get the refresh token sent either.
    await refused(token(stub, integration_id=stored.id, force_refresh=True), refresh)
    assert fake.refresh_calls == 0

    # Put back, it is the victim's again (nothing was wiped or rewritten meanwhile).
    original = {"user_id": "victim", "account_id": "acct-1"}[column]
    await underneath(broker, stored.id, **{column: original})
    assert await token(stub, integration_id=stored.id) == access


async def test_a_row_moved_to_another_provider_sends_nothing_to_it(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    other: FakeAuthServer,
) -> None:
    access, refresh = fake.issue_grant()
    # Expired: the next GetAccessToken refreshes, at whatever provider the row names.
    stored = await store(stub, access_token=access, refresh_token=refresh, expires_in_seconds=0)
    await underneath(broker, stored.id, provider="other")

    await refused(token(stub, user_id="victim", provider="other"), access, refresh)
    await refused(token(stub, integration_id=stored.id), access, refresh)
    # The lease was given back at once: a second caller hears DATA_LOSS, not "being refreshed".
    await refused(token(stub, integration_id=stored.id), access, refresh)
    # The background pass finds the row due and skips it the same way.
    await broker.refresher.background_pass()
    assert other.requests == [], "the other provider's token endpoint was called"
    assert fake.refresh_calls == 0
    assert fake.is_grant_active(refresh)
    # Disconnecting it sends the tokens to no revocation endpoint either.
    gone = await stub.Disconnect(pb.DisconnectRequest(integration_id=stored.id), metadata=ADMIN)
    assert gone.revocation == pb.REVOCATION_OUTCOME_FAILED
    assert other.requests == []
    assert fake.requests == []


async def test_a_minted_credential_moved_to_another_provider_sends_nothing_to_it(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    fake: FakeAuthServer,
    other: FakeAuthServer,
) -> None:
    cred = credential(
        "client_credentials",
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        scopes=["read"],
    )
    stored = await store(stub, credential=cred)
    await token(stub, integration_id=stored.id)  # minted at acme
    assert fake.mint_calls == 1
    await underneath(broker, stored.id, provider="other")
    await refused(token(stub, integration_id=stored.id, force_refresh=True), fake.client_secret)
    assert other.requests == []
    assert fake.mint_calls == 1


async def test_a_credential_of_another_kind_does_not_decrypt(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    stored = await store(
        stub, provider="keysonly", credential=credential("api_key", key="sk-victim", header="X")
    )
    assert await token(stub, integration_id=stored.id) == "sk-victim"
    await underneath(broker, stored.id, credential_type="basic")
    await refused(token(stub, integration_id=stored.id), "sk-victim")


async def test_a_flow_given_to_another_user_is_not_completed(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    started = await stub.BeginAuthorization(
        pb.BeginAuthorizationRequest(user_id="victim", provider="acme", redirect_uri=CALLBACK),
        metadata=ADMIN,
    )
    async with broker.engine.begin() as conn:
        await conn.execute(update(oauth_flows).values(user_id="mallory2"))
    callback = await consent(started.authorization_url)
    await refused(
        stub.CompleteAuthorization(
            pb.CompleteAuthorizationRequest(
                state=callback["state"], code=callback["code"], user_id="mallory2"
            ),
            metadata=ADMIN,
        )
    )
    assert code_exchanges(fake) == 0
    async with broker.engine.connect() as conn:
        assert (await conn.execute(select(integrations))).all() == []


# -- rows written before owner binding -----------------------------------------------------------


async def downgrade(broker: Broker, iid: str) -> None:
    """Rewrite a row's ciphertexts as the code before owner binding did: format 1, bound to
    environment, row and column only."""
    keyring = parse_keyring(KEYS, "test")
    async with broker.engine.begin() as conn:
        m = (await conn.execute(select(integrations).where(integrations.c.id == iid))).one()
        values: dict[str, Any] = {}
        for column, name in CT_COLUMNS.items():
            blob = m._mapping[column]
            if blob is None:
                continue
            owner = broker.runtime.cipher.binding(_owner(m._mapping), name)
            plaintext = keyring.open(blob, owner)
            values[column] = keyring.encrypt(plaintext, associated_data(ENVIRONMENT, iid, name))
        await conn.execute(update(integrations).where(integrations.c.id == iid).values(**values))
    flush(broker)


def _owner(m: Any) -> Owner:
    return Owner(m["id"], m["user_id"], m["provider"], m["account_id"], m["credential_type"])


async def versions(broker: Broker) -> dict[str, int]:
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(integrations.c.id, integrations.c.version))).all()
    return {str(iid): int(v) for iid, v in rows}


async def blob_versions(broker: Broker) -> set[int]:
    cols = [integrations.c[c] for c in CT_COLUMNS]
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(*cols))).all()
    return {blob[0] for row in rows for blob in row if blob is not None}


async def test_old_rows_are_served_then_upgraded_online_and_resumably(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    strict: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    tokens: dict[str, str] = {}
    for n in range(7):
        stored = await store(
            stub, user_id=f"user-{n}", access_token=f"at-{n}", refresh_token=f"rt-{n}",
            expires_in_seconds=3600,
        )  # fmt: skip
        tokens[stored.id] = f"at-{n}"
    key = await store(
        stub, provider="keysonly", credential=credential("api_key", key="sk-old", header="X")
    )
    tokens[key.id] = "sk-old"
    for iid in tokens:
        await downgrade(broker, iid)
    assert await blob_versions(broker) == {ROW_BOUND}
    found = await row_bound_status(broker.engine)
    assert found == RowBound(integrations=8, flows=0, ciphertexts=15)
    assert owner_binding_check(found, KeysSettings()).level is Level.WARN
    assert owner_binding_check(found, KeysSettings(require_owner_binding=True)).level is Level.FAIL

    # Still served during the upgrade; refused by a broker that requires the owner binding.
    for iid, expected in tokens.items():
        assert await token(stub, integration_id=iid) == expected
    error = await expect_error(
        token(strict, integration_id=key.id), Code.DATA_LOSS, "CIPHERTEXT_INVALID"
    )
    assert "keys reencrypt" in (error.details() or "")

    before = await versions(broker)
    keyring = parse_keyring(KEYS, "test")
    # Interrupted twice: stopped after one batch, then a crash after its first batch.
    first = await reencrypt(broker.engine, keyring, ENVIRONMENT, batch_size=2, max_batches=1)
    assert (first.rows, first.complete) == (2, False)
    assert first.upgraded == 15 - (await row_bound_status(broker.engine)).ciphertexts

    class Crash(Exception):
        pass

    def crash(progress: Progress) -> None:
        if progress.done:
            raise Crash

    with pytest.raises(Crash):
        await reencrypt(broker.engine, keyring, ENVIRONMENT, batch_size=3, progress=crash)
    assert (await row_bound_status(broker.engine)).integrations == 3
    # Serving while half upgraded: both formats at once.
    assert await blob_versions(broker) == {ROW_BOUND, OWNER_BOUND}
    flush(broker)
    for iid, expected in tokens.items():
        assert await token(stub, integration_id=iid) == expected

    last = await reencrypt(broker.engine, keyring, ENVIRONMENT, batch_size=2)
    assert last.complete
    assert first.rows + 3 + last.rows == 8
    # Every row rewritten exactly once (one version bump each), none twice.
    after = await versions(broker)
    assert {iid: after[iid] - before[iid] for iid in tokens} == dict.fromkeys(tokens, 1)
    assert await blob_versions(broker) == {OWNER_BOUND}
    assert await row_bound_status(broker.engine) == RowBound()
    again = await reencrypt(broker.engine, keyring, ENVIRONMENT)
    assert (again.rows, again.complete) == (0, True)
    assert await versions(broker) == after

    # Upgraded: the strict broker serves every token, unchanged.
    for iid, expected in tokens.items():
        assert await token(strict, integration_id=iid) == expected
    # ... and the upgrade bound them to their owner: re-parenting one is refused now.
    victim = next(iter(tokens))
    await underneath(broker, victim, user_id="mallory2")
    await refused(token(stub, user_id="mallory2", provider="acme"))


async def test_old_flows_are_upgraded_too(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    started = await stub.BeginAuthorization(
        pb.BeginAuthorizationRequest(user_id="victim", provider="acme", redirect_uri=CALLBACK),
        metadata=ADMIN,
    )
    keyring = parse_keyring(KEYS, "test")
    async with broker.engine.begin() as conn:
        flow = (await conn.execute(select(oauth_flows))).one()._mapping
        binding = broker.runtime.cipher.binding(_flow_owner(flow), "pkce_verifier")
        old = keyring.encrypt(
            keyring.open(flow["verifier_ct"], binding),
            associated_data(ENVIRONMENT, flow["state_hash"], "pkce_verifier"),
        )
        await conn.execute(update(oauth_flows).values(verifier_ct=old))
    assert await row_bound_status(broker.engine) == RowBound(flows=1, ciphertexts=1)
    report = await reencrypt(broker.engine, keyring, ENVIRONMENT)
    assert (report.rows, report.upgraded, report.complete) == (1, 1, True)
    assert await row_bound_status(broker.engine) == RowBound()
    # The upgraded verifier still completes the flow at the provider.
    callback = await consent(started.authorization_url)
    done = await stub.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(
            state=callback["state"], code=callback["code"], user_id="victim"
        ),
        metadata=ADMIN,
    )
    assert done.integration.user_id == "victim"
    assert code_exchanges(fake) == 1


def _flow_owner(m: Any) -> Owner:
    return Owner(
        m["state_hash"], m["user_id"], m["provider"], m["account_id"], "authorization_code"
    )


async def test_status_check_and_start_up_say_what_is_left(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    settings: Settings,
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stored = await store(stub, access_token="at-old", refresh_token="rt-old")
    await downgrade(broker, stored.id)
    cfg = cli_config(tmp_path, database_url)

    status = await cli(capsys, cfg, "keys", "status")
    assert status.code == 0
    assert (
        "1 integration(s), 0 flow(s), 2 ciphertext(s) still bound to their row only" in status.out
    )
    assert "run `broker keys reencrypt`" in status.err
    assert "at-old" not in status.out + status.err

    # A broker starting on this database says so in its log (off the start-up path).
    capsys.readouterr()
    other = await start(settings)
    logged = ""
    try:
        for _ in range(100):
            logged += capsys.readouterr().err
            if "bound to their row only" in logged:
                break
            await asyncio.sleep(0.05)
    finally:
        await other.stop(0)
    assert "1 integration(s) and 0 flow(s) are bound to their row only" in logged

    done = await cli(capsys, cfg, "keys", "reencrypt")
    assert done.code == 0
    assert "2 ciphertext(s) upgraded to the owner binding" in done.out
    status = await cli(capsys, cfg, "keys", "status")
    assert "0 integration(s), 0 flow(s), 0 ciphertext(s) still bound" in status.out
    flush(broker)
    assert await token(stub, integration_id=stored.id) == "at-old"
