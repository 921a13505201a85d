"""The ``imports`` table: which source row became which integration (``broker import``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.storage.engine import bulk_insert
from broker.storage.repository import utc
from broker.storage.tables import imports as t

# Bound parameters per IN list: well under SQLite's and asyncpg's limits.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Imported:
    source_id: str
    integration_id: str
    source_updated_at: datetime | None
    verified: str | None
    wiped_at: datetime | None


def _imported(row: object) -> Imported:
    m = row._mapping  # type: ignore[attr-defined]
    return Imported(
        m["source_id"],
        m["integration_id"],
        utc(m["source_updated_at"]),
        m["verified"],
        utc(m["wiped_at"]),
    )


async def find(
    conn: AsyncConnection, source: str, source_ids: Sequence[str]
) -> dict[str, Imported]:
    found: dict[str, Imported] = {}
    for start in range(0, len(source_ids), _CHUNK):
        chunk = list(source_ids[start : start + _CHUNK])
        rows = await conn.execute(select(t).where(t.c.source == source, t.c.source_id.in_(chunk)))
        for row in rows:
            record = _imported(row)
            found[record.source_id] = record
    return found


async def record(
    conn: AsyncConnection,
    source: str,
    source_id: str,
    integration_id: str,
    source_updated_at: datetime | None,
    at: datetime,
    *,
    replace: bool,
) -> None:
    """In the transaction that stored the integration: both commit or neither."""
    values = {
        "integration_id": integration_id,
        "source_updated_at": source_updated_at,
        "imported_at": at,
        "verified": None,
        "verified_at": None,
        "wiped_at": None,
    }
    if replace:
        await conn.execute(
            update(t).where(t.c.source == source, t.c.source_id == source_id).values(**values)
        )
    else:
        await conn.execute(insert(t).values(source=source, source_id=source_id, **values))


async def all_of(conn: AsyncConnection, source: str) -> list[Imported]:
    rows = await conn.execute(select(t).where(t.c.source == source).order_by(t.c.source_id))
    return [_imported(r) for r in rows]


async def set_verified(
    conn: AsyncConnection, source: str, source_id: str, verdict: str, at: datetime
) -> None:
    await conn.execute(
        update(t)
        .where(t.c.source == source, t.c.source_id == source_id)
        .values(verified=verdict, verified_at=at)
    )


async def set_wiped(
    conn: AsyncConnection, source: str, source_ids: Sequence[str], at: datetime
) -> None:
    for start in range(0, len(source_ids), _CHUNK):
        chunk = list(source_ids[start : start + _CHUNK])
        await conn.execute(
            update(t).where(t.c.source == source, t.c.source_id.in_(chunk)).values(wiped_at=at)
        )


async def record_many(
    conn: AsyncConnection, source: str, rows: list[tuple[str, str, datetime | None]], at: datetime
) -> None:
    """New records (source id, integration id, source updated_at) in one statement."""
    if rows:
        await bulk_insert(
            conn,
            t,
            [
                {
                    "source": source,
                    "source_id": source_id,
                    "integration_id": integration_id,
                    "source_updated_at": updated,
                    "imported_at": at,
                }
                for source_id, integration_id, updated in rows
            ],
        )


async def plan_each_statement(conn: AsyncConnection) -> None:
    """On PostgreSQL, plan this transaction's statements for their own parameters. An import
    starts on empty tables: the generic plan a prepared statement settles on after a few runs
    would be a sequential scan, kept while the table grows to every imported row (each batch
    slower than the last)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
