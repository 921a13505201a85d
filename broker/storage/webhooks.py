"""Queries on ``webhook_endpoints`` and ``webhook_deliveries``. Callers own the transaction.

Each endpoint is delivered to by one broker at a time, the holder of its lease (any replica):
that keeps the endpoint's events in order and means two replicas never send the same event.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.storage.tables import webhook_deliveries as d
from broker.storage.tables import webhook_endpoints as e

PENDING = "PENDING"
DELIVERED = "DELIVERED"
FAILED = "FAILED"


async def ensure_endpoint(conn: AsyncConnection, name: str, cursor: int) -> None:
    """A new endpoint starts at ``cursor`` (the newest event): it gets what happens next.
    Replicas starting together may both try: the second insert is a no-op."""
    dialect = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    await conn.execute(
        dialect(e).values(name=name, cursor=cursor).on_conflict_do_nothing(index_elements=["name"])
    )


async def take_lease(
    conn: AsyncConnection, name: str, owner: str, now: datetime, until: datetime
) -> bool:
    """Take or extend the endpoint's lease; False while another broker holds a live one."""
    result = await conn.execute(
        update(e)
        .where(
            e.c.name == name,
            or_(e.c.lease_owner.is_(None), e.c.lease_owner == owner, e.c.lease_until < now),
        )
        .values(lease_owner=owner, lease_until=until)
    )
    return result.rowcount == 1


async def release_lease(conn: AsyncConnection, name: str, owner: str) -> None:
    await conn.execute(
        update(e)
        .where(e.c.name == name, e.c.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
    )


async def cursor(conn: AsyncConnection, name: str) -> int:
    return int((await conn.execute(select(e.c.cursor).where(e.c.name == name))).scalar_one())


async def enqueue(
    conn: AsyncConnection, name: str, event_ids: Iterable[int], new_cursor: int, now: datetime
) -> None:
    rows = [
        {
            "endpoint": name,
            "event_id": event_id,
            "state": PENDING,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }
        for event_id in event_ids
    ]
    if rows:
        await conn.execute(insert(d), rows)
    await conn.execute(update(e).where(e.c.name == name).values(cursor=new_cursor))


async def head(conn: AsyncConnection, name: str) -> Row[Any] | None:
    """The endpoint's oldest undelivered event: later ones wait for it (per-endpoint order)."""
    query = (
        select(d).where(d.c.endpoint == name, d.c.state == PENDING).order_by(d.c.event_id).limit(1)
    )
    return (await conn.execute(query)).first()


async def mark(conn: AsyncConnection, name: str, event_id: int, values: dict[str, Any]) -> None:
    await conn.execute(
        update(d).where(d.c.endpoint == name, d.c.event_id == event_id).values(**values)
    )


async def retry_failed(
    conn: AsyncConnection, name: str, now: datetime, event_id: int | None = None
) -> int:
    """FAILED deliveries back to PENDING, due now, with a fresh retry window."""
    query = update(d).where(d.c.endpoint == name, d.c.state == FAILED)
    if event_id is not None:
        query = query.where(d.c.event_id == event_id)
    result = await conn.execute(
        query.values(state=PENDING, created_at=now, next_attempt_at=now, attempts=0)
    )
    return int(result.rowcount or 0)


async def summary(conn: AsyncConnection) -> list[Row[Any]]:
    counts = (
        select(d.c.endpoint, d.c.state, func.count().label("n"))
        .group_by(d.c.endpoint, d.c.state)
        .subquery()
    )
    query = select(e, counts.c.state, counts.c.n).outerjoin(counts, counts.c.endpoint == e.c.name)
    return list((await conn.execute(query.order_by(e.c.name))).all())


async def purge(conn: AsyncConnection, before: datetime) -> int:
    """Forget finished deliveries (DELIVERED or FAILED) queued before ``before``."""
    result = await conn.execute(delete(d).where(d.c.state != PENDING, d.c.created_at < before))
    return int(result.rowcount or 0)


async def deliveries(
    conn: AsyncConnection, name: str, state: str | None, limit: int
) -> list[Row[Any]]:
    query = select(d).where(d.c.endpoint == name).order_by(d.c.event_id.desc()).limit(limit)
    if state:
        query = query.where(d.c.state == state)
    return list((await conn.execute(query)).all())
