"""Holder liveness on PostgreSQL: each broker process keeps one dedicated session holding a
session-level advisory lock on a random 63-bit key for as long as the process lives.

A refresh lease records that key (``refresh_lease_session``). PostgreSQL drops the lock the
moment the holder's session ends — ``kill -9``, a crashed host once TCP gives up, a closed
connection — so other replicas see the lease as free at once instead of after its time runs
out, by looking the key up in ``pg_locks`` (readable by any role; no superuser needed).

While the lock is held the lease is never taken away, even past its time: a holder that is
alive but stalled (SIGSTOP, a long GC pause) may have sent the refresh token already, and
sending it again from another replica would look like reuse to a strict provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import asyncpg

from broker.storage.engine import asyncpg_dsn

log = logging.getLogger("broker.refresh")


def new_key() -> int:
    # Positive, so (classid << 32 | objid) in pg_locks reads back as the same bigint.
    return secrets.randbits(62) + 1


class SessionLock:
    def __init__(self, url: str, key: int | None = None, *, retry_seconds: float = 0.5) -> None:
        self._dsn = asyncpg_dsn(url)
        self.key = new_key() if key is None else key
        self.retry_seconds = retry_seconds
        self.held = asyncio.Event()
        self._conn: Any = None

    def session(self) -> int | None:
        """The key to record on a lease, or None while the lock is not held (then a lease
        is bounded by its time alone)."""
        return self.key if self.held.is_set() else None

    async def run(self) -> None:
        """Hold the lock, reconnecting when the session is lost; runs until cancelled."""
        try:
            while True:
                await self._hold_once()
                await asyncio.sleep(self.retry_seconds)
        finally:
            await self._close()

    async def _hold_once(self) -> None:
        try:
            conn = await asyncpg.connect(
                self._dsn, timeout=5, server_settings={"application_name": "broker-lease-holder"}
            )
        except Exception as exc:
            log.debug("lease session cannot connect (%s); retrying", type(exc).__name__)
            return
        self._conn = conn
        try:
            # try_: the old session of this process may not have ended on the server yet.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key):
                return
            self.held.set()
            log.info("refresh lease session holding its lock")
            strikes = 0
            while not conn.is_closed() and strikes < 2:
                await asyncio.sleep(self.retry_seconds)
                try:
                    await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5)
                    strikes = 0
                except TimeoutError:
                    # One timeout may only mean this process was frozen (SIGSTOP) while the
                    # timer ran: dropping the session then would free our leases to others
                    # while we still hold answers in our sockets. A second one is real.
                    strikes += 1
        except Exception as exc:
            if self.held.is_set():
                log.warning("refresh lease session lost (%s); reconnecting", type(exc).__name__)
        finally:
            self.held.clear()
            await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
