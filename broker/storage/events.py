"""Queries on ``integration_events``. Callers own the connection/transaction.

Ids are the order readers follow (``id > cursor``), so an id must never become visible after
a larger one: a reader that had already moved past it would skip it for good. Two concurrent
transactions taking ids from one sequence can commit in the opposite order, so on PostgreSQL
every event insert first takes one transaction-scoped advisory lock. The lock is held from
the moment the id is drawn until the transaction commits or rolls back, so ids become visible
strictly in increasing order. Event inserts are the last statement of their transaction and
state changes are rare (plain refreshes write none), so the lock is held for a commit's time.
SQLite has a single writer: its write lock already gives the same guarantee.

A rolled-back transaction leaves a hole in the ids; holes are never filled, readers skip them.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Text, cast, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.storage.engine import bulk_insert
from broker.storage.tables import integration_events as t

EVENTS_CHANNEL = "broker_events"
# pg_advisory_xact_lock key serialising event ids (any constant unique to this purpose).
_ORDER_LOCK = 0x6272_6F6B_6576_01
_SEQUENCE = "integration_events_id_seq"  # of the BIGSERIAL id (migration 0006)


async def insert_event(conn: AsyncConnection, values: dict[str, Any]) -> int:
    if conn.dialect.name != "postgresql":
        result = await conn.execute(insert(t).values(**values).returning(t.c.id))
        return int(result.scalar_one())
    # One round trip: take the order lock, then draw the id (the lock is evaluated in the
    # subquery's FROM before nextval in its select list), insert, and NOTIFY (delivered at
    # commit, never for a rollback) to wake streams and webhooks on every replica.
    lock = select(func.pg_advisory_xact_lock(_ORDER_LOCK).label("locked")).subquery("lock")
    next_id = select(func.nextval(_SEQUENCE)).select_from(lock).scalar_subquery()
    query = (
        insert(t)
        .values(id=next_id, **values)
        .returning(t.c.id, func.pg_notify(EVENTS_CHANNEL, cast(t.c.id, Text)))
    )
    return int((await conn.execute(query)).first()[0])  # type: ignore[index]


async def page(
    conn: AsyncConnection,
    after_id: int,
    limit: int,
    *,
    users: Collection[str] | None = None,
    providers: Collection[str] | None = None,
    types: Collection[str] = (),
    upto: int | None = None,
) -> list[Row[Any]]:
    query = select(t).where(t.c.id > after_id).order_by(t.c.id).limit(limit)
    if upto is not None:
        query = query.where(t.c.id <= upto)
    if users is not None:
        query = query.where(t.c.user_id.in_(list(users)))
    if providers is not None:
        query = query.where(t.c.provider.in_(list(providers)))
    if types:
        query = query.where(t.c.type.in_(list(types)))
    return list((await conn.execute(query)).all())


async def get(conn: AsyncConnection, event_id: int) -> Row[Any] | None:
    return (await conn.execute(select(t).where(t.c.id == event_id))).first()


async def last_id(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.coalesce(func.max(t.c.id), 0)))).scalar_one())


async def purge(conn: AsyncConnection, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` of the events that occurred before ``before``."""
    oldest = select(t.c.id).where(t.c.occurred_at < before).order_by(t.c.id).limit(limit)
    result = await conn.execute(delete(t).where(t.c.id.in_(oldest.scalar_subquery())))
    return int(result.rowcount or 0)


async def last_type(conn: AsyncConnection, integration_id: str) -> str | None:
    """The type of this integration's newest event (to write "once per run" events once)."""
    query = (
        select(t.c.type)
        .where(t.c.integration_id == integration_id)
        .order_by(t.c.id.desc())
        .limit(1)
    )
    found = (await conn.execute(query)).scalar_one_or_none()
    return None if found is None else str(found)


async def insert_events(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Many events in one statement (``broker import``'s batches), ids drawn under the order
    lock as ``insert_event``'s; the last statement of the transaction, like it."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(_ORDER_LOCK)))
    await bulk_insert(conn, t, rows)
    if conn.dialect.name == "postgresql":
        # One wake-up for the batch: readers page from their cursor anyway.
        await conn.execute(select(func.pg_notify(EVENTS_CHANNEL, "")))
