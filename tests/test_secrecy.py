"""Tokens exist in storage only as ciphertext bound to their place, on SQLite and PostgreSQL.

Plaintext must not be in the database file or table bytes; a ciphertext moved to another row,
column or environment, or corrupted, gives DATA_LOSS CIPHERTEXT_INVALID and never a token.
"""

from __future__ import annotations

import base64
import logging
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.crypto import associated_data, parse_keyring
from broker.errors import CiphertextInvalid
from broker.server.app import Broker, start
from broker.storage.engine import create_engine
from broker.storage.repository import utc
from broker.storage.schema import migrate
from broker.storage.tables import integrations
from tests.helpers.errors import error_info, expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, ENVIRONMENT, KEYS, make_settings

Code = grpc.StatusCode
COLUMNS = ("access_token_ct", "refresh_token_ct")


def canary(kind: str) -> str:
    return f"{kind}-canary-{uuid.uuid4().hex}"


def encodings(token: str) -> list[bytes]:
    """The ways a careless implementation might have written a token down."""
    raw = token.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw), raw[::-1]]


async def store(stub: pb_grpc.CredentialBrokerAsyncStub, **fields: Any) -> str:
    response = await stub.StoreIntegration(store_request(**fields), metadata=ADMIN)
    return str(response.integration.id)


async def get_token(stub: pb_grpc.CredentialBrokerAsyncStub, iid: str) -> pb.GetAccessTokenResponse:
    request = pb.GetAccessTokenRequest(integration_id=iid)
    response: pb.GetAccessTokenResponse = await stub.GetAccessToken(request, metadata=ADMIN)
    return response


async def read_column(broker: Broker, iid: str, column: str) -> bytes:
    async with broker.engine.connect() as conn:
        value = (
            await conn.execute(select(integrations.c[column]).where(integrations.c.id == iid))
        ).scalar_one()
    assert isinstance(value, bytes)
    return value


async def write_column(broker: Broker, iid: str, column: str, value: bytes) -> None:
    async with broker.engine.begin() as conn:
        result = await conn.execute(
            update(integrations).where(integrations.c.id == iid).values({column: value})
        )
        assert result.rowcount == 1


# -- plaintext never reaches storage ----------------------------------------------------------


def _pg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _postgres_bytes(url: str) -> bytes:
    """Every row of every table as text, the raw bytea values, and the heap file on disk."""
    conn = await asyncpg.connect(_pg_dsn(url))
    try:
        chunks: list[bytes] = []
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert {"integrations", "broker_meta"} <= {t["table_name"] for t in tables}
        for table in tables:
            name = table["table_name"]
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{name}" t')  # noqa: S608
            chunks += [r["row"].encode() for r in rows]
        byteas = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type = 'bytea'"
        )
        assert {b["column_name"] for b in byteas} >= set(COLUMNS)
        for col in byteas:
            rows = await conn.fetch(
                f'SELECT "{col["column_name"]}" AS v FROM "{col["table_name"]}"'  # noqa: S608
            )
            chunks += [bytes(r["v"]) for r in rows if r["v"] is not None]
        try:
            await conn.execute("CHECKPOINT")
            chunks.append(
                await conn.fetchval(
                    "SELECT pg_read_binary_file(pg_relation_filepath('integrations'))"
                )
            )
        except asyncpg.InsufficientPrivilegeError:
            pass  # not a superuser: the row dumps above still cover every value
        return b"\n".join(chunks)
    finally:
        await conn.close()


def _sqlite_bytes(url: str) -> bytes:
    db = Path(make_url(url).database or "")
    files = sorted(db.parent.glob(db.name + "*"))  # broker.db, -wal, -shm
    assert db in files
    return b"\n".join(f.read_bytes() for f in files)


async def test_plaintext_never_in_database_bytes(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, backend: str
) -> None:
    owner = f"owner-{uuid.uuid4().hex}"
    tokens = [canary("access"), canary("refresh"), canary("access2"), canary("refresh2")]
    first = await store(stub, user_id=owner, access_token=tokens[0], refresh_token=tokens[1])
    # An upsert rewrites the row; the old and new tokens must both stay out of storage.
    second = await store(stub, user_id=owner, access_token=tokens[2], refresh_token=tokens[3])
    assert first == second
    assert (await get_token(stub, first)).access_token == tokens[2]

    url = broker.settings.database.url.get_secret_value()
    raw = await _postgres_bytes(url) if backend == "postgres" else _sqlite_bytes(url)
    assert owner.encode() in raw, "the dump does not contain the row at all"
    for token in tokens:
        for encoded in encodings(token):
            assert encoded not in raw, f"{token} found in storage as {encoded[:16]!r}…"


# -- moved or corrupted ciphertexts -----------------------------------------------------------


async def expect_data_loss(
    stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, *secrets: str
) -> None:
    error = await expect_error(get_token(stub, iid), Code.DATA_LOSS, "CIPHERTEXT_INVALID")
    shown = (error.details() or "") + repr(error.trailing_metadata()) + repr(error_info(error))
    for secret in secrets:
        assert secret not in shown


async def test_ciphertext_copied_to_another_row_fails(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a_at, a_rt, b_at, b_rt = canary("a-at"), canary("a-rt"), canary("b-at"), canary("b-rt")
    a = await store(stub, user_id="alice", access_token=a_at, refresh_token=a_rt)
    b = await store(stub, user_id="bob", access_token=b_at, refresh_token=b_rt)

    for column in COLUMNS:
        await write_column(broker, b, "access_token_ct", await read_column(broker, a, column))
        await expect_data_loss(stub, b, a_at, a_rt, b_at, b_rt)
        # Looking the row up by owner instead of id reads the same bytes.
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(user_id="bob", provider="twitter"), metadata=ADMIN
            ),
            Code.DATA_LOSS,
            "CIPHERTEXT_INVALID",
        )
    assert (await get_token(stub, a)).access_token == a_at
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (a_at, a_rt, b_at, b_rt):
        assert secret not in logged


async def test_refresh_ciphertext_moved_to_access_column_fails(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    at, rt = canary("at"), canary("rt")
    iid = await store(stub, access_token=at, refresh_token=rt)
    await write_column(broker, iid, "access_token_ct", await read_column(broker, iid, COLUMNS[1]))
    await expect_data_loss(stub, iid, at, rt)


async def test_moved_refresh_token_is_not_adopted_on_upsert(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    """A store without a refresh token keeps (re-encrypts) the row's old one; a refresh token
    moved in from another row must not be laundered into this row that way."""
    victim_rt = canary("victim-rt")
    victim = await store(stub, user_id="victim", refresh_token=victim_rt)
    target_at = canary("target-at")
    target = await store(stub, user_id="target", access_token=target_at)
    await write_column(
        broker, target, "refresh_token_ct", await read_column(broker, victim, "refresh_token_ct")
    )
    request = store_request(user_id="target", access_token=canary("new"), refresh_token="")
    error: grpc.aio.AioRpcError | None = None
    try:
        await stub.StoreIntegration(request, metadata=ADMIN)
    except grpc.aio.AioRpcError as caught:
        error = caught
    if error is not None:
        # Refusing is fine: DATA_LOSS, and the failed upsert wrote nothing.
        assert error.code() == Code.DATA_LOSS, error.details()
        info = error_info(error)
        assert info is not None
        assert info.reason == "CIPHERTEXT_INVALID"
        assert victim_rt not in (error.details() or "")
        assert (await get_token(stub, target)).access_token == target_at
        return
    # Accepting is fine too, as long as the target row cannot yield the victim's refresh token.
    keyring = parse_keyring(KEYS, "test keys")
    blob = await read_column(broker, target, "refresh_token_ct")
    with pytest.raises(CiphertextInvalid):
        keyring.decrypt(blob, associated_data(ENVIRONMENT, target, "refresh_token"))


async def test_ciphertext_from_another_environment_fails(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, tmp_path: Path
) -> None:
    """A whole row (same id, same keys) written by a broker of another environment."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'other-env.db'}"
    engine = create_engine(DatabaseSettings(url=url))
    await migrate(engine, "staging")
    await engine.dispose()
    other = await start(make_settings(url, server={"environment": "staging"}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            other_stub = pb_grpc.CredentialBrokerStub(channel)
            token = canary("staging-at")
            iid = await store(other_stub, user_id="mallory", access_token=token)
            assert (await get_token(other_stub, iid)).access_token == token
        async with other.engine.connect() as conn:
            row = dict(
                (await conn.execute(select(integrations).where(integrations.c.id == iid)))
                .one()
                ._mapping
            )
    finally:
        await other.stop(0)
    for key, value in row.items():
        if key.endswith("_at"):
            row[key] = utc(value)
    async with broker.engine.begin() as conn:
        await conn.execute(insert(integrations).values(**row))
    await expect_data_loss(stub, iid, token)


@pytest.mark.parametrize(
    "where",
    ["version", "key-id", "nonce", "body", "tag", "truncated", "garbage"],
)
async def test_corrupted_ciphertext_gives_data_loss(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, where: str
) -> None:
    token = canary("at")
    iid = await store(stub, access_token=token)
    blob = bytearray(await read_column(broker, iid, "access_token_ct"))
    body = 2 + blob[1] + 12
    if where == "truncated":
        blob = blob[:-1]
    elif where == "garbage":
        blob = bytearray(b"not a ciphertext")
    else:
        position = {"version": 0, "key-id": 2, "nonce": body - 1, "body": body, "tag": -1}[where]
        blob[position] ^= 0x01
    await write_column(broker, iid, "access_token_ct", bytes(blob))
    await expect_data_loss(stub, iid, token)
