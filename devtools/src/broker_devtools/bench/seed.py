"""Bulk seeding of encrypted integrations, the way the broker itself would have stored them.

Every row gets its own ciphertexts: AES-GCM associated data binds a ciphertext to its row id and
owner (``broker.crypto.Binding``), so one ciphertext cannot be reused across rows. Encryption
is cheap (a few µs); on PostgreSQL the cost is the COPY and the index maintenance, so large
seeds are split into ranges that several processes COPY concurrently (one connection each).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from broker.crypto import parse_keyring
from broker.domain.tokens import TokenCipher
from broker.model import Kind, NewTokens, Owner
from broker_devtools.bench import data

# Column order of the records handed to COPY; every other column takes its server default.
COLUMNS = (
    "id",
    "user_id",
    "provider",
    "account_id",
    "status",
    "access_token_ct",
    "refresh_token_ct",
    "key_id",
    "token_type",
    "scopes",
    "metadata",
    "created_at",
    "updated_at",
    "expires_at",
    "version",
)
_BATCH = 20_000  # rows per COPY statement: bounded memory, few round trips


@dataclass(frozen=True)
class SeedPlan:
    """Rows ``start .. start+count-1`` of the id space ``salt`` (picklable for spawn)."""

    salt: str
    start: int
    count: int
    keyring: str
    environment: str = data.ENVIRONMENT
    provider: str = data.PROVIDER
    # None: valid for data.VALID_FOR from now; a datetime: that expiry (the storm uses now).
    expires_at: datetime | None = None
    # Per-row (access, refresh) tokens, e.g. grants from the fake authorization server; when
    # empty, random tokens of the standard lengths.
    tokens: tuple[tuple[str, str], ...] = ()


def records(plan: SeedPlan, lo: int, hi: int) -> Iterator[tuple[Any, ...]]:
    """Records for rows lo..hi-1 (absolute indexes), in COLUMNS order."""
    cipher = TokenCipher(parse_keyring(plan.keyring, "bench keyring"), plan.environment)
    now = datetime.now(UTC)
    expires = plan.expires_at if plan.expires_at is not None else data.seeded_expiry(now)
    scopes = json.dumps(list(data.SCOPES))
    for index in range(lo, hi):
        iid = data.integration_id(plan.salt, index)
        if plan.tokens:
            access, refresh = plan.tokens[index - plan.start]
        else:
            access = data.random_token(data.TOKEN_LENGTH)
            refresh = data.random_token(data.REFRESH_TOKEN_LENGTH)
        owner = Owner(iid, data.user_id(index), plan.provider, "", Kind.AUTHORIZATION_CODE.value)
        values = cipher.token_values(
            owner, NewTokens(access, refresh, data.TOKEN_TYPE, expires, data.SCOPES)
        )
        yield (
            iid,
            data.user_id(index),
            plan.provider,
            "",
            "CONNECTED",
            values["access_token_ct"],
            values["refresh_token_ct"],
            values["key_id"],
            data.TOKEN_TYPE,
            scopes,
            "{}",
            now,
            now,
            expires,
            1,
        )


# -- PostgreSQL ---------------------------------------------------------------------------------


async def _copy_range(dsn: str, plan: SeedPlan, lo: int, hi: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for first in range(lo, hi, _BATCH):
            batch = list(records(plan, first, min(first + _BATCH, hi)))
            await conn.copy_records_to_table("integrations", records=batch, columns=COLUMNS)
    finally:
        await conn.close()


def _copy_worker(dsn: str, plan: SeedPlan, lo: int, hi: int) -> None:
    asyncio.run(_copy_range(dsn, plan, lo, hi))


def seed_postgres(dsn: str, plan: SeedPlan, workers: int = 1) -> float:
    """COPY the plan's rows into a migrated database; returns the seconds it took (including
    VACUUM ANALYZE, so the planner and the visibility map see the table as a live one would)."""
    began = time.perf_counter()
    bounds = _split(plan.start, plan.count, workers if plan.count >= 50_000 else 1)
    if len(bounds) == 1:
        asyncio.run(_copy_range(dsn, plan, *bounds[0]))
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_copy_worker, args=(dsn, plan, lo, hi)) for lo, hi in bounds]
        try:
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            failed = [p.exitcode for p in procs if p.exitcode != 0]
            if failed:
                raise RuntimeError(f"seeding failed in {len(failed)} worker process(es)")
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
    asyncio.run(_vacuum(dsn))
    return time.perf_counter() - began


async def _vacuum(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM (ANALYZE) integrations")
    finally:
        await conn.close()


def _split(start: int, count: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    bounds, lo = [], start
    for part in range(parts):
        hi = lo + size + (1 if part < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


# -- SQLite -------------------------------------------------------------------------------------


def seed_sqlite(path: str, plan: SeedPlan) -> float:
    """Insert the plan's rows through SQLAlchemy (its SQLite type handling: JSON, datetimes),
    in batches; SQLite seeds stay small (thousands), so one process is plenty."""
    from sqlalchemy import create_engine, insert

    from broker.storage.tables import integrations

    began = time.perf_counter()
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            for first in range(plan.start, plan.start + plan.count, _BATCH):
                hi = min(first + _BATCH, plan.start + plan.count)
                rows = [_as_dict(r) for r in records(plan, first, hi)]
                conn.execute(insert(integrations), rows)
    finally:
        engine.dispose()
    return time.perf_counter() - began


def _as_dict(record: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, record, strict=True))
    # SQLAlchemy's JSON type serialises itself; COPY wants the text.
    row["scopes"] = list(data.SCOPES)
    row["metadata"] = {}
    return row
