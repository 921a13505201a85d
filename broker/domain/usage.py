"""When each integration's access token was last served (``Integration.last_used_at``),
without a database write on the hot path.

GetAccessToken and Proxy note the time in memory (a dict store); a background task writes the
notes every ``refresh.last_used_flush_seconds`` (default 60 s), one UPDATE per batch of rows,
and only to rows whose stored value is older than that interval: ``last_used_at`` is precise to
about one flush interval, and a busy integration is written at most about once per interval
whatever its call rate. The write bumps no ``version`` (a refresh's compare-and-swap must not
lose to it) and invalidates no cache entry (what callers are served does not change).
GetIntegration shows this process's notes not yet written too; another replica's appear once
it has flushed. Notes still in memory at shutdown are written then; a crash loses at most one
interval of them.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.domain import periodic
from broker.errors import StorageUnavailable
from broker.model import Clock
from broker.storage import repository
from broker.storage.engine import write_transaction

log = logging.getLogger("broker.usage")

# Rows per UPDATE.
BATCH = 500


class UsageNotes:
    """Last-use times noted in memory, written in batches."""

    def __init__(self, engine: AsyncEngine, clock: Clock, interval_seconds: float) -> None:
        self.engine = engine
        self.clock = clock
        self.interval = timedelta(seconds=interval_seconds)
        self._used: dict[str, datetime] = {}

    def note(self, integration_id: str, at: datetime) -> None:
        """An access token of this integration was served at ``at`` (the hot path: no I/O)."""
        self._used[integration_id] = at

    def pending(self, integration_id: str) -> datetime | None:
        """A use noted here and not written yet."""
        return self._used.get(integration_id)

    def __len__(self) -> int:
        return len(self._used)

    async def flush(self) -> int:
        """Write the notes (one UPDATE per batch); returns the rows updated. Notes that could
        not be written are kept for the next flush."""
        taken, self._used = self._used, {}
        if not taken:
            return 0
        written = 0
        ids = sorted(taken)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            at = max(taken[iid] for iid in chunk)
            try:
                async with write_transaction(self.engine) as conn:
                    written += await repository.note_last_used(conn, chunk, at, at - self.interval)
            except StorageUnavailable:
                # Kept (a newer note wins) and written by a later flush.
                for iid in ids[start:]:
                    if iid not in self._used or self._used[iid] < taken[iid]:
                        self._used[iid] = taken[iid]
                raise
        metrics.LAST_USED_FLUSHES.inc(written)
        return written

    async def run_periodically(self, stop: asyncio.Event | None = None) -> None:
        await periodic.every(
            self.interval.total_seconds(), self.flush, "last-use write", "%d row(s)", stop=stop
        )
