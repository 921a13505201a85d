"""GetAccessToken's read by integration id on PostgreSQL (a cache miss, or the cache off):
one prepared statement, one round trip, nothing else on the way.

It has a small asyncpg pool of its own, outside SQLAlchemy's: no pool checkout through
SQLAlchemy's machinery and greenlet per call, and no reset query when a connection goes back
(asyncpg's default reset runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``,
a second round trip per call; these connections only ever run the one read-only statement, so
there is nothing to reset). Rows come back with their JSON columns decoded by the connection's
codec and are converted by position.

Same guarantees as the pooled path: a connection that failed in a way that leaves it unusable
(``connection_broken``: terminated backend, dead socket, timeout, a call cancelled
mid-statement) is closed rather than handed to the next call, and the caller's
``storage_errors`` turns the failure into STORAGE_UNAVAILABLE. At most ``database.pool_size``
connections, opened on first use, named ``credential-broker-read`` in ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from broker.config import DatabaseSettings
from broker.domain.model import StoredIntegration
from broker.storage.engine import is_unavailable
from broker.storage.repository import GET_BY_ID, from_values

APPLICATION_NAME = "credential-broker-read"


async def _decode_json(conn: asyncpg.Connection) -> None:
    # SQLAlchemy's JSON type is ``json`` on PostgreSQL, which asyncpg returns as text.
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """Only one read-only statement ever runs here: no session state to undo."""


class IntegrationReader:
    def __init__(self, dsn: str, settings: DatabaseSettings) -> None:
        self.timeout = settings.timeout_seconds
        self.pool: asyncpg.Pool[Any] = asyncpg.create_pool(
            dsn,
            # Opened on first use: an operator command that never reads opens none.
            min_size=0,
            max_size=settings.pool_size,
            init=_decode_json,
            reset=_nothing_to_reset,
            timeout=settings.timeout_seconds,
            command_timeout=settings.timeout_seconds,
            server_settings={"application_name": APPLICATION_NAME},
        )

    async def open(self) -> IntegrationReader:
        await self.pool
        return self

    async def read(self, integration_id: str) -> StoredIntegration | None:
        """The row, or None; asyncpg's and the socket's errors go through unwrapped (the
        caller's ``storage_errors`` maps them)."""
        async with self.pool.acquire(timeout=self.timeout) as conn:
            try:
                record = await conn.fetchrow(GET_BY_ID, integration_id)
            except BaseException as exc:
                # Dropped, not reused: after a network error or a cancel mid-statement the
                # protocol state is unknown ("another operation is in progress").
                if is_unavailable(exc) or not isinstance(exc, Exception):
                    conn.terminate()
                raise
        return None if record is None else from_values(record)

    def connections(self) -> tuple[float, float]:
        """(open, idle) connections, for the metrics endpoint."""
        return float(self.pool.get_size()), float(self.pool.get_idle_size())

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), self.timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.pool.terminate()


async def open_reader(dsn: str, settings: DatabaseSettings) -> IntegrationReader:
    return await IntegrationReader(dsn, settings).open()
