"""The audit table made to fail for real (renamed away and back), on either backend."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
from sqlalchemy.engine import make_url


class AuditTable:
    """Makes inserts into audit_events fail for real: the table is renamed away (and back)
    through a connection of its own, as an operator's mistake or a broken migration would."""

    def __init__(self, database_url: str) -> None:
        self.url = make_url(database_url)

    def _sqlite(self, sql: str) -> None:
        conn = sqlite3.connect(str(self.url.database), timeout=10)
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()

    async def _execute(self, sql: str) -> None:
        if self.url.get_backend_name() == "sqlite":
            # In a thread: the broker shares this event loop and may hold the write lock for
            # a moment; blocking the loop here would keep it from ever letting go.
            await asyncio.to_thread(self._sqlite, sql)
            return
        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        pg = await asyncpg.connect(dsn, timeout=10)
        try:
            await pg.execute(sql)
        finally:
            await pg.close()

    async def hide(self) -> None:
        await self._execute("ALTER TABLE audit_events RENAME TO audit_events_off")

    async def restore(self) -> None:
        await self._execute("ALTER TABLE audit_events_off RENAME TO audit_events")
