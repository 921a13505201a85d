"""Cross-replica cache invalidation: a dedicated PostgreSQL connection LISTENs for the
notifications that every write sends (``broker.storage.engine.touch``).

If the connection drops, the cache is flushed and bypassed (``available = False``) until the
listener is back: a replica that cannot hear about writes must not answer from memory. After
reconnecting it flushes once more, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg

from broker.storage.engine import CHANNEL, GRANT_CHANNEL, asyncpg_dsn
from broker.storage.events import EVENTS_CHANNEL

log = logging.getLogger("broker.cache")


class _Cache(Protocol):
    """What the listener does to a cache it keeps honest: bypass it (``available``) and empty
    it while writes cannot be heard, and drop the entries a write names."""

    available: bool

    def flush(self) -> None: ...


class IntegrationCacheLike(_Cache, Protocol):
    def invalidate(self, integration_id: str, user_id: str, provider: str) -> None: ...


class GrantCacheLike(_Cache, Protocol):
    def invalidate(self, grant_id: str) -> None: ...


class InvalidationListener:
    def __init__(
        self,
        url: str,
        cache: IntegrationCacheLike,
        *,
        retry_seconds: float = 0.5,
        grants: GrantCacheLike | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self.cache = cache
        # Revoked grants arrive on their own channel and must be heard the same way.
        self.grants = grants
        # Integration events committed on any replica wake this process's event readers.
        self.on_event = on_event
        self.retry_seconds = retry_seconds
        self.connected = asyncio.Event()
        self.notifications = 0
        self._conn: Any = None

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        integration_id, _, rest = payload.partition("\x1f")
        user_id, _, provider = rest.partition("\x1f")
        self.cache.invalidate(integration_id, user_id, provider)

    def _on_grant(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        if self.grants is not None:
            self.grants.invalidate(payload.partition("\x1f")[0])

    def _on_event(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        if self.on_event is not None:
            self.on_event()

    def _on_lost(self, _conn: Any) -> None:
        self._lost()

    def _lost(self, *, stopping: bool = False) -> None:
        # Closing the channel at shutdown is no loss worth a warning; the cache goes all the same.
        if self.cache.available and not stopping:
            log.warning("cache invalidation channel lost: cache flushed and bypassed")
        self.cache.available = False
        self.cache.flush()
        if self.grants is not None:
            self.grants.available = False
            self.grants.flush()
        self.connected.clear()

    async def run(self) -> None:
        """Keep a listening connection; runs until cancelled."""
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
            except Exception as exc:
                self._lost()
                log.debug("cache listener cannot connect (%s); retrying", type(exc).__name__)
                await asyncio.sleep(self.retry_seconds)
                continue
            self._conn = conn
            try:
                conn.add_termination_listener(self._on_lost)
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(GRANT_CHANNEL, self._on_grant)
                await conn.add_listener(EVENTS_CHANNEL, self._on_event)
                # Writes made while nobody listened are unknown: start from nothing.
                self.cache.flush()
                self.cache.available = True
                if self.grants is not None:
                    self.grants.flush()
                    self.grants.available = True
                self.connected.set()
                log.info("cache invalidation channel listening")
                while not conn.is_closed():
                    await asyncio.sleep(self.retry_seconds)
                    # A dead TCP peer may not close the connection for a long time: probe.
                    try:
                        await asyncio.wait_for(conn.execute("SELECT 1"), timeout=2)
                    except Exception:  # closed, reset, timed out: all mean "reconnect"
                        break
            except Exception as exc:
                log.debug("cache listener failed (%s); reconnecting", type(exc).__name__)
            finally:
                task = asyncio.current_task()
                stopping = task is not None and task.cancelling() > 0
                if stopping:
                    conn.remove_termination_listener(self._on_lost)
                self._lost(stopping=stopping)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), timeout=1)
                self._conn = None
