"""Reading the audit trail (``broker audit``): newest first, filtered by user, integration or
caller. Events hold no tokens, so they can be printed as they are."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

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
