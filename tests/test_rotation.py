"""Key rotation: online re-encryption (batches, resume, races with refreshes) and rotation of
a serving broker under load — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.crypto import Binding, Keyring, associated_data, key_id_of
from broker.crypto.keys import generate_key, parse_keyring
from broker.domain import rotation
from broker.domain.integrations import IntegrationService
from broker.domain.rotation import KeyCount, Progress, key_status, reencrypt
from broker.domain.tokens import ACCESS, REFRESH, TokenCipher
from broker.errors import ConfigError
from broker.model import NewTokens, Owner, StoreCommand
from broker.server.app import Broker, start
from broker.storage import repository
from broker.storage.engine import create_engine
from broker.storage.tables import integrations, oauth_flows
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, ENVIRONMENT, KEYS, RUNNER, make_settings

OLD = KEYS  # "test1:…", the key every fixture broker uses
NEW = generate_key("test2")
OLD_ID, NEW_ID = "test1", "test2"


def ring(*entries: str) -> Keyring:
    return parse_keyring(",".join(entries), "test")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(DatabaseSettings(url=database_url))
    yield made
    await made.dispose()


def service(engine: AsyncEngine, keyring: Keyring) -> IntegrationService:
    return IntegrationService(engine, TokenCipher(keyring, ENVIRONMENT), providers={"twitter"})


async def seed(engine: AsyncEngine, keyring: Keyring, count: int) -> dict[str, tuple[str, str]]:
    """``count`` integrations under the keyring's primary; id → (access, refresh) token."""
    svc = service(engine, keyring)
    tokens: dict[str, tuple[str, str]] = {}
    for n in range(count):
        access, refresh = f"at-{n}-{secrets.token_hex(4)}", f"rt-{n}-{secrets.token_hex(4)}"
        integration, _ = await svc.store(
            StoreCommand(
                user_id=f"user-{n % 3}",
                provider="twitter",
                account_id=f"acct-{n}",
                tokens=NewTokens(access, refresh, "Bearer", None, ("tweet.read",)),
                metadata={},
                expires_in_seconds=3600,
            )
        )
        tokens[integration.id] = (access, refresh)
    return tokens


async def seed_flow(engine: AsyncEngine, keyring: Keyring, verifier: str) -> str:
    state_hash = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    aad = associated_data(ENVIRONMENT, state_hash, "pkce_verifier")
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            insert(oauth_flows).values(
                state_hash=state_hash,
                user_id="user-0",
                provider="twitter",
                redirect_uri="https://app.test/cb",
                scopes=[],
                metadata={},
                verifier_ct=keyring.encrypt(verifier.encode(), aad),
                key_id=keyring.primary_id,
                created_at=now,
                expires_at=now + timedelta(minutes=10),
            )
        )
    return state_hash


async def row(engine: AsyncEngine, iid: str) -> Row[Any]:
    async with engine.connect() as conn:
        found = (await conn.execute(select(integrations).where(integrations.c.id == iid))).first()
    assert found is not None
    return found


async def owner_of(engine: AsyncEngine, iid: str) -> Owner:
    m = (await row(engine, iid))._mapping
    return Owner(iid, m["user_id"], m["provider"], m["account_id"], m["credential_type"])


async def tokens_of(engine: AsyncEngine, keyring: Keyring, iid: str) -> tuple[str, str, str]:
    """(key id, access token, refresh token) of a row, decrypted with ``keyring``."""
    m = (await row(engine, iid))._mapping
    cipher = TokenCipher(keyring, ENVIRONMENT)
    assert key_id_of(m["access_token_ct"]) == key_id_of(m["refresh_token_ct"]) == m["key_id"]
    owner = await owner_of(engine, iid)
    return (
        m["key_id"],
        cipher.decrypt(owner, ACCESS, m["access_token_ct"]),
        cipher.decrypt(owner, REFRESH, m["refresh_token_ct"]),
    )


async def test_reencrypt_moves_every_ciphertext_to_the_primary(engine: AsyncEngine) -> None:
    tokens = await seed(engine, ring(OLD), 23)
    state = await seed_flow(engine, ring(OLD), "the-verifier")
    versions = {iid: (await row(engine, iid))._mapping["version"] for iid in tokens}
    assert await key_status(engine) == {OLD_ID: KeyCount(23, 1, 47)}

    rotated = ring(NEW, OLD)
    seen: list[Progress] = []
    report = await reencrypt(engine, rotated, ENVIRONMENT, batch_size=5, progress=seen.append)

    assert report.complete
    assert report.remaining == 0
    assert not report.failed
    assert report.rows == 24
    assert report.rewritten == {OLD_ID: 47}
    assert report.batches == 6  # five batches of integrations, one of flows
    assert seen[0] == Progress(0, 24, 0, 0)
    assert seen[-1].done == 24
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert await key_status(engine) == {NEW_ID: KeyCount(23, 1, 47)}

    # Only the new key is needed now: the same tokens come back, the versions moved on.
    only_new = ring(NEW)
    for iid, (access, refresh) in tokens.items():
        assert await tokens_of(engine, only_new, iid) == (NEW_ID, access, refresh)
        assert (await row(engine, iid))._mapping["version"] == versions[iid] + 1
    async with engine.connect() as conn:
        ct = await conn.scalar(
            select(oauth_flows.c.verifier_ct).where(oauth_flows.c.state_hash == state)
        )
    assert ct is not None
    # Upgraded on the way: now bound to the flow's owner too (see test_owner_binding.py).
    flow = Binding(
        ENVIRONMENT, state, "pkce_verifier", "user-0", "twitter", "", "authorization_code"
    )
    assert only_new.open(ct, flow, row_bound=False) == b"the-verifier"
    # Nothing left: a second run is a no-op.
    again = await reencrypt(engine, rotated, ENVIRONMENT)
    assert again.complete
    assert again.rows == 0


async def test_interrupted_reencryption_resumes(engine: AsyncEngine) -> None:
    tokens = await seed(engine, ring(OLD), 12)
    rotated = ring(NEW, OLD)

    first = await reencrypt(engine, rotated, ENVIRONMENT, batch_size=5, max_batches=1)
    assert not first.complete
    assert first.rows == 5
    assert first.remaining == 7
    assert await key_status(engine) == {
        NEW_ID: KeyCount(5, 0, 10),
        OLD_ID: KeyCount(7, 0, 14),
    }

    # A crash mid-run (here: in the progress callback after a batch) loses nothing either.
    class Crash(Exception):
        pass

    def crash_after_a_batch(progress: Progress) -> None:
        if progress.done:
            raise Crash

    with pytest.raises(Crash):
        await reencrypt(engine, rotated, ENVIRONMENT, batch_size=3, progress=crash_after_a_batch)
    assert (await key_status(engine))[OLD_ID].integrations == 4

    last = await reencrypt(engine, rotated, ENVIRONMENT, batch_size=5)
    assert last.complete
    assert last.rows == 4
    assert set(await key_status(engine)) == {NEW_ID}
    for iid, (access, refresh) in tokens.items():
        assert await tokens_of(engine, ring(NEW), iid) == (NEW_ID, access, refresh)


@pytest.mark.parametrize("writer_key", [OLD, NEW], ids=["writer-on-old-key", "writer-on-new-key"])
async def test_reencryption_racing_a_refresh_loses_nothing(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, writer_key: str
) -> None:
    """A refresh commits new tokens between our read and our write: our compare-and-swap fails,
    we re-read, and the refreshed tokens are what ends up under the new key."""
    [iid] = await seed(engine, ring(OLD), 1)
    version = (await row(engine, iid))._mapping["version"]
    # The refreshing broker's primary: an old replica (old key) or a restarted one (new key).
    refresher = TokenCipher(ring(writer_key), ENVIRONMENT)
    original = rotation._Run.read_batch
    raced: list[str] = []

    async def read_then_refresh(self: Any, target: Any, after: str, size: int) -> list[Row[Any]]:
        rows = await original(self, target, after, size)
        if rows and not raced:
            raced.append(iid)
            fresh = NewTokens("at-refreshed", "rt-refreshed", "Bearer", None, ("tweet.read",))
            values = refresher.token_values(await owner_of(engine, iid), fresh)
            async with engine.begin() as conn:
                assert await repository.write_refreshed(conn, iid, version, values)
        return rows

    monkeypatch.setattr(rotation._Run, "read_batch", read_then_refresh)
    report = await reencrypt(engine, ring(NEW, OLD), ENVIRONMENT)

    assert raced
    assert report.complete
    assert await tokens_of(engine, ring(NEW), iid) == (NEW_ID, "at-refreshed", "rt-refreshed")
    if writer_key == OLD:
        assert report.rows == 1
        assert report.resolved_by_others == 0
        assert (await row(engine, iid))._mapping["version"] == version + 2
    else:
        assert report.rows == 0
        assert report.resolved_by_others == 1
        assert (await row(engine, iid))._mapping["version"] == version + 1


async def test_a_row_being_refreshed_is_left_to_the_refresh(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh takes its lease after our read: our write must not land (it would make the
    refresh's compare-and-swap fail and drop tokens the provider already rotated)."""
    [iid] = await seed(engine, ring(OLD), 1)
    version = (await row(engine, iid))._mapping["version"]
    original = rotation._Run.read_batch
    now = datetime.now(UTC)

    async def read_then_lease(self: Any, target: Any, after: str, size: int) -> list[Row[Any]]:
        rows = await original(self, target, after, size)
        if rows and target.leased:
            async with engine.begin() as conn:
                assert await repository.take_lease(
                    conn, iid, version, "other-broker", now, now + timedelta(minutes=1)
                )
        return rows

    monkeypatch.setattr(rotation._Run, "read_batch", read_then_lease)
    report = await reencrypt(engine, ring(NEW, OLD), ENVIRONMENT, lease_wait_seconds=0)
    assert not report.complete
    assert report.deferred == 1
    assert report.remaining == 1
    assert report.rows == 0
    assert (await row(engine, iid))._mapping["version"] == version

    # The refresh completes with the version it leased: its tokens are stored.
    fresh = NewTokens("at-after-lease", "rt-after-lease", "Bearer", None, ())
    values = TokenCipher(ring(OLD), ENVIRONMENT).token_values(await owner_of(engine, iid), fresh)
    async with engine.begin() as conn:
        assert await repository.write_refreshed(conn, iid, version, values)
    monkeypatch.setattr(rotation._Run, "read_batch", original)
    report = await reencrypt(engine, ring(NEW, OLD), ENVIRONMENT)
    assert report.complete
    assert await tokens_of(engine, ring(NEW), iid) == (NEW_ID, "at-after-lease", "rt-after-lease")


async def test_leased_rows_are_retried_until_the_lease_ends(engine: AsyncEngine) -> None:
    ids = list(await seed(engine, ring(OLD), 3))
    until = datetime.now(UTC) + timedelta(seconds=1)
    async with engine.begin() as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == ids[1])
            .values(refresh_lease_owner="crashed-broker", refresh_lease_until=until)
        )
    busy: list[int] = []
    report = await reencrypt(
        engine,
        ring(NEW, OLD),
        ENVIRONMENT,
        batch_size=2,
        retry_interval_seconds=0.2,
        progress=lambda p: busy.append(p.deferred),
    )
    assert report.complete
    assert report.rows == 3
    assert 1 in busy
    assert datetime.now(UTC) >= until
    assert set(await key_status(engine)) == {NEW_ID}


async def test_undecryptable_rows_are_reported_not_touched(engine: AsyncEngine) -> None:
    ids = list(await seed(engine, ring(OLD), 3))
    # Swap two rows' ciphertexts: each is bound to its own row, so both fail to decrypt.
    a, b = (await row(engine, ids[0]))._mapping, (await row(engine, ids[1]))._mapping
    async with engine.begin() as conn:
        for target, source in ((ids[0], b), (ids[1], a)):
            await conn.execute(
                update(integrations)
                .where(integrations.c.id == target)
                .values(access_token_ct=source["access_token_ct"])
            )
    report = await reencrypt(engine, ring(NEW, OLD), ENVIRONMENT)
    assert not report.complete
    assert report.rows == 1
    assert report.remaining == 2
    assert set(report.failed) == {f"integrations {ids[0]}", f"integrations {ids[1]}"}
    assert all("failed authentication" in reason for reason in report.failed.values())
    assert (await key_status(engine))[OLD_ID].integrations == 2


# -- rotation of serving brokers under load ----------------------------------------------------


async def test_rotation_under_load_has_no_failed_call(database_url: str) -> None:
    """Callers loop GetAccessToken (and a writer keeps re-storing tokens) while the operator adds
    a key, restarts onto it, re-encrypts, and retires the old key: not one call fails."""
    broker_a = await start(make_settings(database_url, keys={"keys": OLD}))
    ids: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker_a.port}") as ch:
        admin = pb_grpc.CredentialBrokerStub(ch)
        for n in range(30):
            reply = await admin.StoreIntegration(store_request(user_id=f"load-{n}"), metadata=ADMIN)
            ids.append(reply.integration.id)

    current: dict[str, Broker] = {"broker": broker_a}
    calls: dict[str, int] = {"ok": 0, "stores": 0}
    failures: list[str] = []
    running = True

    async def caller(worker: int) -> None:
        channels: dict[int, grpc.aio.Channel] = {}
        n = worker
        try:
            while running:
                port = current["broker"].port
                if port not in channels:
                    channels[port] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                stub = pb_grpc.CredentialBrokerStub(channels[port])
                try:
                    reply = await stub.GetAccessToken(
                        pb.GetAccessTokenRequest(integration_id=ids[n % len(ids)]),
                        metadata=RUNNER,
                        timeout=5,
                    )
                    assert reply.access_token.startswith("at-")
                    calls["ok"] += 1
                except (grpc.aio.AioRpcError, AssertionError) as exc:
                    failures.append(f"port {port}: {exc}")
                n += 7
        finally:
            for channel in channels.values():
                await channel.close(None)

    async def writer() -> None:
        """Re-stores tokens (an upsert: new ciphertexts, version + 1) to race re-encryption."""
        n = 0
        while running:
            port = current["broker"].port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.CredentialBrokerStub(ch)
                try:
                    await stub.StoreIntegration(
                        store_request(user_id=f"load-{n % len(ids)}"), metadata=ADMIN, timeout=5
                    )
                    calls["stores"] += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"store on port {port}: {exc}")
            n += 1
            await asyncio.sleep(0.01)

    live = [broker_a]

    async def move_to(broker: Broker) -> None:
        old = current["broker"]
        before = calls["ok"]
        live.append(broker)
        current["broker"] = broker
        # Let calls already on their way to the old broker finish, then stop it gracefully.
        await asyncio.sleep(0.3)
        live.remove(old)
        await old.stop(2)
        while calls["ok"] < before + 50:
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(caller(w)) for w in range(4)]
    try:
        while calls["ok"] < 50:
            await asyncio.sleep(0.02)
        # 1. A new primary key, the old one kept for decryption; callers move to it.
        broker_b = await start(make_settings(database_url, keys={"keys": f"{NEW},{OLD}"}))
        await move_to(broker_b)
        # Writes start once no broker without the new key is left (with several replicas the
        # runbook's first restart adds the key as decrypt-only for exactly this reason).
        tasks.append(asyncio.create_task(writer()))
        # Retiring the old key now would be refused, naming the key and how many rows use it.
        with pytest.raises(ConfigError, match=r"'test1' \(\d+ rows\)"):
            await start(make_settings(database_url, keys={"keys": NEW}))
        # 2. Re-encrypt while broker B serves (and the writer keeps writing).
        report = await reencrypt(
            broker_b.engine, broker_b.runtime.keyring, ENVIRONMENT, batch_size=7
        )
        assert report.complete, report
        status = await key_status(broker_b.engine)
        assert OLD_ID not in status
        assert status[NEW_ID].integrations == 30
        # 3. Retire the old key: a broker with only the new key starts and takes over.
        broker_c = await start(make_settings(database_url, keys={"keys": NEW}))
        await move_to(broker_c)
        await asyncio.sleep(0.2)
        running = False
        await asyncio.gather(*tasks)
        assert OLD_ID not in await key_status(broker_c.engine)
    finally:
        running = False
        await asyncio.gather(*tasks, return_exceptions=True)
        for broker in live:
            await broker.stop(0)
    assert not failures, failures[:5]
    assert calls["ok"] >= 150
    assert calls["stores"] > 0
