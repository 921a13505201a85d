"""``broker import``: an application's ``integrations`` table (the seed schema, on a real
PostgreSQL, tokens encrypted by the application with AES-GCM) into the broker, then served,
refreshed at the fake authorization server (rotation on, reuse revokes) exactly once, resumed
after a SIGKILL, verified, and the source's tokens wiped for exactly the imported rows."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.cli import main
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from broker.storage.tables import audit_events, imports, integration_events, integrations
from tests.helpers.clock import FakeClock
from tests.helpers.databases import PostgresFactory
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.processes import write_toml
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, ENVIRONMENT, KEYS, make_settings

pytestmark = pytest.mark.postgres

SEED_TABLE = """
CREATE TABLE integrations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    provider text NOT NULL,
    status text NOT NULL DEFAULT 'connected',
    access_token text,
    refresh_token text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    scopes text[],
    metadata jsonb,
    disconnected_at timestamptz,
    disconnect_reason text
)
"""

# The guide's decrypt command: AES-GCM, base64 of nonce (12 bytes) + ciphertext.
DECRYPT = """\
import base64, json, os, sys, time
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

aead = AESGCM(base64.b64decode(os.environ["APP_TOKEN_KEY"]))
delay = float(os.environ.get("DECRYPT_DELAY", "0"))
for line in sys.stdin:
    time.sleep(delay)
    try:
        raw = base64.b64decode(json.loads(line)["ciphertext"])
        answer = {"plaintext": aead.decrypt(raw[:12], raw[12:], None).decode()}
    except Exception:
        answer = {"error": "cannot decrypt"}
    print(json.dumps(answer), flush=True)
"""

APP_KEY = base64.b64encode(b"k" * 32).decode()


def app_encrypt(plain: str | None) -> str | None:
    if plain is None:
        return None
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(b"k" * 32).encrypt(nonce, plain.encode(), None)).decode()


def providers(fake: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    return {
        "acme": {
            "token_url": fake.token_url,
            "authorization_url": fake.authorization_url,
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
            "rotates_refresh_tokens": True,
            **extra,
        }
    }


@pytest.fixture
async def broker_db(postgres: PostgresFactory) -> str:
    return await postgres.new()


@pytest.fixture
async def source_db(postgres: PostgresFactory) -> AsyncIterator[str]:
    """The application's own database: a plain one, holding only the seed's table."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    url = make_url(postgres.url)
    admin = await asyncpg.connect(
        url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = url.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SEED_TABLE)
    finally:
        await conn.close()
    yield dsn
    admin = await asyncpg.connect(
        url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    )
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def config(tmp_path: Path, database_url: str, fake: FakeAuthServer, **extra: Any) -> Path:
    return write_toml(
        tmp_path / f"broker-{uuid.uuid4().hex[:8]}.toml",
        {
            "server": {"environment": ENVIRONMENT},
            "database": {"url": database_url},
            "keys": {"keys": KEYS},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
            "refresh": {"background": False},
            "providers": providers(fake, **extra),
        },
    )


async def run(capsys: pytest.CaptureFixture[str], cfg: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--config", str(cfg), "import", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def decrypt_flags(tmp_path: Path) -> list[str]:
    script = tmp_path / "decrypt.py"
    script.write_text(DECRYPT)
    return ["--decrypt-command", f"{sys.executable} {script}", "--decrypt-env", "APP_TOKEN_KEY"]


async def insert(dsn: str, rows: list[dict[str, Any]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for row in rows:
            columns = list(row)
            marks = ", ".join(f"${i + 1}" for i in range(len(columns)))
            values = [json.dumps(v) if c == "metadata" else v for c, v in row.items()]
            await conn.execute(
                f"INSERT INTO integrations ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
                *values,
            )
    finally:
        await conn.close()


def sqlite_app(tmp_path: Path, columns: str, insert_sql: str, rows: list[tuple[Any, ...]]) -> Path:
    """The application's ``integrations`` table in a SQLite file."""
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(f"CREATE TABLE integrations ({columns})")
            conn.executemany(insert_sql, rows)
    finally:
        conn.close()
    return db


async def source_rows(dsn: str) -> dict[str, asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["user_id"]: r for r in await conn.fetch("SELECT * FROM integrations")}
    finally:
        await conn.close()


async def count(broker: Broker, table: Any) -> int:
    async with broker.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_import_the_seed_table(
    broker_db: str,
    source_db: str,
    fake: FakeAuthServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_TOKEN_KEY", APP_KEY)
    now = datetime.now(UTC)
    grants = {
        name: fake.issue_grant(scopes=("read",))
        for name in (
            "connected",
            "expired",
            "noexpiry",
            "reauth",
            "gone",
            "dead",
            "plainexp",
            "legacy",
        )
    }
    secrets = [t for pair in grants.values() for t in pair]

    def row(user: str, status: str = "connected", **extra: Any) -> dict[str, Any]:
        access, refresh = grants.get(user, (f"at-{user}-secretvalue", f"rt-{user}-secretvalue"))
        values = {
            "user_id": user,
            "provider": "acme",
            "status": status,
            "access_token": app_encrypt(access),
            "refresh_token": app_encrypt(refresh),
            "expires_at": now + timedelta(hours=1),
            "scopes": ["read"],
            "metadata": {"team": user},
        }
        values.update(extra)
        return values

    await insert(
        source_db,
        [
            row("connected"),
            row("dead"),
            row("expired", "expired", expires_at=now - timedelta(hours=2)),
            row("noexpiry", expires_at=None),
            row("plainexp", expires_at=None, refresh_token=None),
            row("reauth", "needs_reauthorization"),
            row("gone", "disconnected", disconnected_at=now, disconnect_reason="user left"),
            row("myspace", provider="myspace"),
            row("nulls", access_token=None, refresh_token=None),
            row("garbled", access_token="bm90IGEgY2lwaGVydGV4dA=="),
            row("legacy", provider="legacy-acme"),
        ],
    )
    cfg = config(tmp_path, broker_db, fake)
    settings = make_settings(
        broker_db, providers=providers(fake), refresh={"background": False, "margin_seconds": 30}
    )
    base = ["--from", source_db, *decrypt_flags(tmp_path), "--provider-map", "legacy-acme=acme"]
    report = tmp_path / "report.jsonl"
    outputs: list[str] = []

    # A dry run validates every row and writes nothing.
    code, out, err = await run(capsys, cfg, *base, "--dry-run")
    outputs += [out, err]
    assert code == 1, err  # failed rows
    assert "would import 7, skipped 1 (disconnected 1), failed 3" in out, out
    broker = await start(settings)
    try:
        assert await count(broker, integrations) == 0
        assert await count(broker, imports) == 0
        assert await count(broker, integration_events) == 0
    finally:
        await broker.stop(0)

    code, out, err = await run(capsys, cfg, *base, "--report", str(report))
    outputs += [out, err]
    assert code == 1, err
    assert (
        "imported 7, skipped 1 (disconnected 1), failed 3 "
        "(no token 1, undecryptable 1, unknown provider 1)" in out
    ), out
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    failed = {x["reason"] for x in lines if x["outcome"] == "failed"}
    assert failed == {"no token", "undecryptable", "unknown provider"}

    broker = await start(settings)
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")

        stub = pb_grpc.CredentialBrokerStub(channel)
        assert await count(broker, integrations) == 7
        assert await count(broker, imports) == 7
        async with broker.engine.connect() as conn:
            audited = (
                await conn.execute(
                    select(func.count())
                    .select_from(audit_events)
                    .where(audit_events.c.method == "ImportIntegration")
                )
            ).scalar_one()
            types = [r.type for r in await conn.execute(select(integration_events.c.type))]
        assert audited == 7
        assert types.count("CONNECTED") == 7
        assert types.count("NEEDS_REAUTHORIZATION") == 1

        async def token(user: str) -> pb.GetAccessTokenResponse:
            return await stub.GetAccessToken(
                pb.GetAccessTokenRequest(user_id=user, provider="acme"), metadata=ADMIN
            )

        # Served as imported: no refresh.
        assert (await token("connected")).access_token == grants["connected"][0]
        assert (await token("plainexp")).access_token == grants["plainexp"][0]
        assert (await token("legacy")).access_token == grants["legacy"][0]
        assert fake.refresh_calls == 0
        # Expired, and no expiry with a refresh token: refreshed once, at first use.
        for user in ("expired", "noexpiry"):
            first = await token(user)
            assert first.access_token != grants[user][0]
            assert fake.is_access_token_active(first.access_token)
            again = await token(user)
            assert again.access_token == first.access_token
        assert fake.refresh_calls == 2
        assert fake.reuse_revocations == 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await token("reauth")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await channel.close(None)
    finally:
        await broker.stop(0)

    # A second run imports nothing new.
    code, out, err = await run(capsys, cfg, *base)
    outputs += [out, err]
    assert "imported 0, skipped 8 (already imported 7, disconnected 1), failed 3" in out, out

    # The provider revokes one grant; --verify names it; --wipe-source then clears exactly
    # the imported rows that are alive.
    revoked = httpx.post(
        fake.revocation_url,
        data={"token": grants["dead"][1]},
        auth=(fake.client_id, fake.client_secret),
    )
    assert revoked.status_code == 200
    assert not fake.is_grant_active(grants["dead"][1])
    ids = {u: str(r["id"]) for u, r in (await source_rows(source_db)).items()}
    code, out, err = await run(capsys, cfg, *base, "--verify", "--wipe-source", "--yes")
    outputs += [out, err]
    assert f"dead at the provider: source id {ids['dead']}" in out, out
    assert f"source id {ids['reauth']}" in out  # known dead: it needed reauthorization
    assert "wipe-source: cleared the tokens of 5 source row(s)" in out, out
    after = await source_rows(source_db)
    wiped = {
        u for u, r in after.items() if r["access_token"] is None and r["refresh_token"] is None
    }
    assert wiped == {"connected", "expired", "noexpiry", "plainexp", "legacy", "nulls"}
    assert fake.reuse_revocations == 0

    text = "".join(outputs) + report.read_text()
    assert "secretvalue" not in text
    for secret in secrets:
        assert secret not in text


async def test_killed_import_resumes_with_every_row_once(
    broker_db: str,
    source_db: str,
    fake: FakeAuthServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_TOKEN_KEY", APP_KEY)
    rows = [
        {
            "user_id": f"user-{n:04d}",
            "provider": "acme",
            "access_token": app_encrypt(f"at-{n}-secretvalue"),
            "refresh_token": app_encrypt(f"rt-{n}-secretvalue"),
            "expires_at": datetime.now(UTC) + timedelta(hours=1),
        }
        for n in range(120)
    ]
    await insert(source_db, rows)
    cfg = config(tmp_path, broker_db, fake)
    argv = [
        sys.executable,
        "-m",
        "broker",
        "--config",
        str(cfg),
        "import",
        "--from",
        source_db,
        "--batch-size",
        "5",
        *decrypt_flags(tmp_path),
    ]
    env = {**os.environ, "APP_TOKEN_KEY": APP_KEY, "DECRYPT_DELAY": "0.01"}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    settings = make_settings(broker_db, providers=providers(fake))
    broker = await start(settings)
    try:
        for _ in range(600):
            done = await count(broker, imports)
            if done >= 20:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        halfway = await count(broker, imports)
        assert 20 <= halfway < 120
        assert await count(broker, integrations) == halfway  # committed with their records

        code, out, err = await run(capsys, cfg, "--from", source_db, *decrypt_flags(tmp_path))
        assert code == 0, err
        assert f"imported {120 - halfway}, skipped {halfway} (already imported {halfway})" in out
        assert await count(broker, integrations) == 120
        assert await count(broker, imports) == 120
        async with broker.engine.connect() as conn:
            per_user = (
                await conn.execute(
                    select(integrations.c.user_id, func.count()).group_by(integrations.c.user_id)
                )
            ).all()
            connected = (
                await conn.execute(
                    select(func.count())
                    .select_from(integration_events)
                    .where(integration_events.c.type == "CONNECTED")
                )
            ).scalar_one()
        assert len(per_user) == 120
        assert all(n == 1 for _, n in per_user)
        assert connected == 120
    finally:
        await broker.stop(0)


async def test_sqlite_and_json_lines_sources(
    broker_db: str, fake: FakeAuthServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = sqlite_app(
        tmp_path,
        "id TEXT PRIMARY KEY, user_id TEXT, provider TEXT, status TEXT, access_token TEXT, "
        "refresh_token TEXT, created_at TEXT, updated_at TEXT, expires_at TEXT, scopes TEXT, "
        "metadata TEXT, disconnected_at TEXT, disconnect_reason TEXT",
        "INSERT INTO integrations (id, user_id, provider, status, access_token, refresh_token, "
        "updated_at, scopes, metadata) VALUES (?, ?, 'gmail', 'connected', ?, NULL, "
        "'2026-01-01 00:00:00', '[\"read\"]', '{}')",
        [(f"s{n}", f"sq-{n}", f"at-sq-{n}-secretvalue") for n in range(3)],
    )
    cfg = config(tmp_path, broker_db, fake)
    code, out, err = await run(
        capsys, cfg, "--from", str(db), "--provider-map", "gmail=acme", "--where", "id <> 's2'"
    )
    assert code == 0, err
    assert "imported 2, skipped 0, failed 0" in out
    lines = tmp_path / "rows.jsonl"
    lines.write_text(
        json.dumps(
            {"key": "j1", "owner": "js-1", "provider": "acme", "access_token": "at-j1-secretvalue"}
        )
        + "\n"
        + "not json\n"
    )
    code, out, err = await run(capsys, cfg, "--from", str(lines), "--map", "id=key,user_id=owner")
    assert code == 1, err
    assert "imported 1, skipped 0, failed 1 (invalid field 1)" in out
    assert "secretvalue" not in out + err


async def test_conflicts_skip_or_take_the_newer_row(
    broker_db: str,
    source_db: str,
    fake: FakeAuthServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = datetime.now(UTC) - timedelta(days=1)
    await insert(
        source_db,
        [
            {"user_id": u, "provider": "acme", "access_token": f"at-{u}-1", "updated_at": old}
            for u in ("imported", "present", "stale")
        ],
    )
    cfg = config(tmp_path, broker_db, fake)
    settings = make_settings(broker_db, providers=providers(fake))
    broker = await start(settings)
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")
        stub = pb_grpc.CredentialBrokerStub(channel)
        for user in ("present", "stale"):
            await stub.StoreIntegration(
                pb.StoreIntegrationRequest(
                    user_id=user, provider="acme", access_token=f"at-{user}-broker"
                ),
                metadata=ADMIN,
            )

        async def served(user: str) -> str:
            answer = await stub.GetAccessToken(
                pb.GetAccessTokenRequest(user_id=user, provider="acme"), metadata=ADMIN
            )
            return str(answer.access_token)

        code, out, err = await run(capsys, cfg, "--from", source_db)
        assert code == 0, err
        assert "imported 1, skipped 2 (already present 2), failed 0" in out, out
        # The application changed two rows after the first run.
        conn = await asyncpg.connect(source_db)
        try:
            await conn.execute(
                "UPDATE integrations SET access_token = 'at-' || user_id || '-2', "
                "updated_at = now() + interval '1 minute' WHERE user_id IN ('imported', 'present')"
            )
        finally:
            await conn.close()
        code, out, err = await run(capsys, cfg, "--from", source_db)
        assert "imported 0, skipped 3 (already imported 1, already present 2)" in out, out
        assert await served("imported") == "at-imported-1"
        code, out, err = await run(capsys, cfg, "--from", source_db, "--on-conflict", "newer")
        assert code == 0, err
        assert "imported 2 (1 replacing older integrations), skipped 1 (already present 1)" in out
        assert await served("imported") == "at-imported-2"
        assert await served("present") == "at-present-2"
        assert await served("stale") == "at-stale-broker"
        assert await count(broker, integrations) == 3
        await channel.close(None)
    finally:
        await broker.stop(0)


async def test_decrypt_command_gets_a_minimal_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from broker.sources.decrypt import DecryptCommand

    monkeypatch.setenv("BROKER_KEYS", "secret-keyring")
    monkeypatch.setenv("BROKER_DATABASE_URL", "postgresql+asyncpg://u:pw@db/broker")
    monkeypatch.setenv("APP_TOKEN_KEY", "app-key")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    script = (
        "import json, os, sys\n"
        "for line in sys.stdin:\n"
        "    if json.loads(line)['ciphertext'] == 'bad':\n"
        "        print(json.dumps({'error': 'no'}), flush=True)\n"
        "    else:\n"
        "        print(json.dumps({'plaintext': ','.join(sorted(os.environ))}), flush=True)\n"
    )
    (tmp_path / "env.py").write_text(script)
    command = DecryptCommand(
        f"{sys.executable} {tmp_path / 'env.py'}", ["APP_TOKEN_KEY", "BROKER_KEYS"]
    )
    try:
        names, refused = await command.decrypt(["c1", "bad"])
    finally:
        await command.close()
    assert refused is None
    assert names is not None
    seen = set(names.split(","))
    assert "APP_TOKEN_KEY" in seen
    assert not {n for n in seen if n.startswith("BROKER_")}
    assert "UNRELATED_SECRET" not in seen


async def lapses_of(broker: Broker, user: str) -> datetime | None:
    """The refresh token's expiry as GetIntegration shows it (None: not given)."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")
    try:
        stub = pb_grpc.CredentialBrokerStub(channel)
        answer = await stub.GetIntegration(
            pb.GetIntegrationRequest(user_id=user, provider="acme"), metadata=ADMIN
        )
    finally:
        await channel.close(None)
    if not answer.integration.HasField("refresh_token_expires_at"):
        return None
    return answer.integration.refresh_token_expires_at.ToDatetime(tzinfo=UTC)


async def test_refresh_token_expiry_is_mapped_checked_per_row_and_stored(
    broker_db: str,
    source_db: str,
    fake: FakeAuthServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The seed table has no such column: the application added one.
    conn = await asyncpg.connect(source_db)
    try:
        await conn.execute("ALTER TABLE integrations ADD COLUMN rt_lapses timestamptz")
    finally:
        await conn.close()
    lapses = datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC)

    def row(user: str, refresh: str | None, rt_lapses: datetime | None) -> dict[str, Any]:
        return {
            "user_id": user,
            "provider": "acme",
            "access_token": f"at-{user}-secretvalue",
            "refresh_token": refresh,
            "expires_at": datetime.now(UTC) + timedelta(hours=1),
            "rt_lapses": rt_lapses,
        }

    await insert(
        source_db,
        [
            row("lapsing", "rt-lapsing-secretvalue", lapses),
            row("plain", "rt-plain-secretvalue", None),
            row("norefresh", None, lapses),
            row("far", "rt-far-secretvalue", datetime(9500, 1, 1, tzinfo=UTC)),
        ],
    )
    cfg = config(tmp_path, broker_db, fake)
    mapped = ["--from", source_db, "--map", "refresh_token_expires_at=rt_lapses"]

    # Not in the default mapping: without --map the column is not read.
    code, out, err = await run(capsys, cfg, "--from", source_db, "--dry-run")
    assert code == 0, err
    assert "would import 4, skipped 0, failed 0" in out, out
    # The dry run checks it as StoreIntegration does, row by row, and writes nothing.
    report = tmp_path / "dry.jsonl"
    code, out, err = await run(capsys, cfg, *mapped, "--dry-run", "--report", str(report))
    assert code == 1, err
    assert "would import 2, skipped 0, failed 2 (invalid field 2)" in out, out
    details = sorted(
        x["detail"] for x in map(json.loads, report.read_text().splitlines()) if x.get("detail")
    )
    assert details == [
        "refresh_token_expires_at: give it only with refresh_token",
        "refresh_token_expires_at: must be between the years 1970 and 9000",
    ]
    settings = make_settings(broker_db, providers=providers(fake), refresh={"background": False})
    broker = await start(settings)
    try:
        assert await count(broker, integrations) == 0
    finally:
        await broker.stop(0)

    code, out, err = await run(capsys, cfg, *mapped)
    assert code == 1, err
    assert "imported 2, skipped 0, failed 2 (invalid field 2)" in out, out
    assert "secretvalue" not in out + err
    broker = await start(settings)
    try:
        assert await lapses_of(broker, "lapsing") == lapses
        assert await lapses_of(broker, "plain") is None
        assert await count(broker, integrations) == 2
    finally:
        await broker.stop(0)


async def test_refresh_token_expiry_from_sqlite_and_json_lines(
    broker_db: str, fake: FakeAuthServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = sqlite_app(
        tmp_path,
        "id TEXT PRIMARY KEY, user_id TEXT, provider TEXT, access_token TEXT, "
        "refresh_token TEXT, refresh_lapses TEXT",
        "INSERT INTO integrations VALUES (?, ?, 'acme', ?, ?, ?)",
        [
            ("s1", "sq-1", "at-sq-1-secretvalue", "rt-sq-1-secretvalue", "2030-01-02 03:04:05"),
            ("s2", "sq-2", "at-sq-2-secretvalue", "rt-sq-2-secretvalue", "next tuesday"),
        ],
    )
    cfg = config(tmp_path, broker_db, fake)
    sqlite_map = (
        "refresh_token_expires_at=refresh_lapses,status=,expires_at=,scopes=,metadata=,"
        "created_at=,updated_at=,disconnected_at=,disconnect_reason="
    )
    report = tmp_path / "sqlite.jsonl"
    code, out, err = await run(
        capsys, cfg, "--from", str(db), "--map", sqlite_map, "--report", str(report)
    )
    assert code == 1, err
    assert "imported 1, skipped 0, failed 1 (invalid field 1)" in out, out
    failed = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(x["source_id"], x["detail"]) for x in failed if x["outcome"] == "failed"] == [
        ("s2", "refresh_token_expires_at: is not an ISO 8601 time")
    ]

    lines = tmp_path / "rows.jsonl"
    lines.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"j{n}",
                    "user_id": f"js-{n}",
                    "provider": "acme",
                    "access_token": f"at-j{n}-secretvalue",
                    "refresh_token": f"rt-j{n}-secretvalue",
                    "rt_expiry": value,
                }
            )
            + "\n"
            for n, value in ((1, "2031-05-06T07:08:09Z"), (2, "soon"), (3, 12345.5))
        )
    )
    code, out, err = await run(
        capsys, cfg, "--from", str(lines), "--map", "refresh_token_expires_at=rt_expiry"
    )
    assert code == 1, err
    assert "imported 2, skipped 0, failed 1 (invalid field 1)" in out, out
    assert "secretvalue" not in out + err
    settings = make_settings(broker_db, providers=providers(fake), refresh={"background": False})
    broker = await start(settings)
    try:
        assert await lapses_of(broker, "sq-1") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert await lapses_of(broker, "js-1") == datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
        # A number is seconds since the epoch, as for expires_at.
        assert await lapses_of(broker, "js-3") == datetime(1970, 1, 1, 3, 25, 45, 500000, UTC)
        assert await count(broker, integrations) == 3
    finally:
        await broker.stop(0)


async def test_an_imported_grant_is_kept_alive_from_its_import(
    broker_db: str,
    source_db: str,
    fake: FakeAuthServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    idle = 3600  # the provider's refresh_token_idle_lifetime_seconds
    interval = timedelta(seconds=30)  # one background pass
    access, refresh = fake.issue_grant(scopes=("read",))
    await insert(
        source_db,
        [
            {
                "user_id": "idle",
                "provider": "acme",
                "access_token": access,
                "refresh_token": refresh,
                # The access token lives on: only the refresh token's upkeep refreshes it.
                "expires_at": datetime.now(UTC) + timedelta(days=30),
            }
        ],
    )
    cfg = config(tmp_path, broker_db, fake, refresh_token_idle_lifetime_seconds=idle)
    code, out, err = await run(capsys, cfg, "--from", source_db)
    assert code == 0, err
    assert "imported 1, skipped 0, failed 0" in out, out
    clock = FakeClock()
    settings = make_settings(
        broker_db,
        providers=providers(fake, refresh_token_idle_lifetime_seconds=idle),
        refresh={"background": False},
    )
    broker = await start(settings, clock=clock)
    try:
        async with broker.engine.connect() as conn:
            imported_at = (
                await conn.execute(select(integrations.c.refresh_token_used_at))
            ).scalar_one()
        # The idle clock starts at the import, as for StoreIntegration.
        assert imported_at is not None
        clock.now = imported_at + timedelta(seconds=idle / 2) - interval
        await broker.refresher.background_pass()
        assert fake.refresh_calls == 0
        clock.now = imported_at + timedelta(seconds=idle / 2)
        await broker.refresher.background_pass()
        assert fake.refresh_calls == 1
        assert fake.reuse_revocations == 0
        async with broker.engine.connect() as conn:
            kept = (await conn.execute(select(integrations.c.refresh_token_used_at))).scalar_one()
        assert kept == clock.now
    finally:
        await broker.stop(0)
