"""Reading the audit trail (``broker audit``): newest first, filtered by user, integration or
caller. Events hold no tokens, so they can be printed as they are."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.storage.repository import utc
from broker.storage.tables import audit_events as t


async def list_events(
    conn: AsyncConnection,
    *,
    user_id: str | None = None,
    integration_id: str | None = None,
    caller: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    query = select(t)
    if user_id:
        query = query.where(t.c.user_id == user_id)
    if integration_id:
        query = query.where(t.c.integration_id == integration_id)
    if caller:
        query = query.where(t.c.caller == caller)
    if since is not None:
        query = query.where(t.c.occurred_at >= since)
    rows = (await conn.execute(query.order_by(t.c.occurred_at.desc()).limit(limit))).all()
    events = []
    for row in rows:
        event = dict(row._mapping)
        event["occurred_at"] = utc(event["occurred_at"])
        events.append(event)
    return events


COLUMNS = (
    "id",
    "occurred_at",
    "caller",
    "method",
    "integration_id",
    "user_id",
    "provider",
    "outcome",
    "request_id",
    "detail",
)
_SQLITE_INSERT = (
    "INSERT INTO audit_events (id, occurred_at, caller, method, integration_id, user_id, "
    "provider, outcome, request_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLAlchemy's storage format for DateTime on SQLite (naive UTC), so its reads parse our rows.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


async def insert_events(engine: AsyncEngine, rows: list[tuple[Any, ...]]) -> None:
    """Commit a batch of events (tuples in ``COLUMNS`` order) in one go.

    This is the one write on the GetAccessToken hot path, so it goes straight to the driver:
    COPY on PostgreSQL, one executemany on SQLite — no SQL compiled per batch.
    """
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        if conn.dialect.name == "postgresql":
            await driver.copy_records_to_table("audit_events", records=rows, columns=COLUMNS)
            return
        await driver.executemany(
            _SQLITE_INSERT,
            [(r[0], r[1].astimezone(UTC).strftime(_SQLITE_TIME), *r[2:]) for r in rows],
        )
        await driver.commit()
