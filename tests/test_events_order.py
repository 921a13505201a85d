"""Ids become visible in commit order: a transaction that took its event id first and commits
late is never overtaken, so a reader at ``id > cursor`` cannot skip it (both backends)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from broker.config import DatabaseSettings
from broker.storage import events as store
from broker.storage.engine import create_engine


def values(user: str) -> dict[str, object]:
    return {
        "occurred_at": datetime.now(UTC),
        "integration_id": "i",
        "user_id": user,
        "provider": "p",
        "type": "CONNECTED",
    }


async def test_a_late_commit_is_not_overtaken(database_url: str) -> None:
    engine = create_engine(DatabaseSettings(url=database_url))
    try:
        slow = await engine.connect()
        await slow.begin()
        first = await store.insert_event(slow, values("slow"))

        async def fast() -> int:
            async with engine.begin() as conn:
                return await store.insert_event(conn, values("fast"))

        racing = asyncio.create_task(fast())
        await asyncio.sleep(0.5)  # give the second writer every chance to commit first
        async with engine.connect() as conn:
            visible = [r.id for r in await store.page(conn, 0, 10)]
        # Whatever a reader sees now, it must not see a later id while the earlier is pending.
        assert visible == [], "the later transaction waited for the earlier one"
        await slow.commit()
        await slow.close()
        second = await racing
        async with engine.connect() as conn:
            after = [(r.id, r.user_id) for r in await store.page(conn, 0, 10)]
        assert first < second
        assert after == [(first, "slow"), (second, "fast")]
    finally:
        await engine.dispose()
