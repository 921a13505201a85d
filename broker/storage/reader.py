"""GetAccessToken's read by integration id on PostgreSQL (a cache miss, or the cache off):
one prepared statement, one round trip, nothing else on the way, and concurrent reads
coalesced into one statement.

It has a small asyncpg pool of its own, outside SQLAlchemy's: no pool checkout through
SQLAlchemy's machinery and greenlet per call, and no reset query when a connection goes back
(asyncpg's default reset runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``,
a second round trip per call; these connections only ever run read-only statements, so
there is nothing to reset). Rows come back with their JSON columns decoded by the connection's
codec and are converted by position.

Coalescing, like a dataloader or a group commit without a timer: a read that finds fewer
than ``max_batches`` batches in flight starts one at once (a lone read waits for nothing);
the batch takes every read that arrived by the time it runs (the same event-loop tick) or
while the batches before it were in flight, up to ``MAX_BATCH`` ids, in one
``WHERE id = ANY($1)``. Per row that costs a quarter of the client and server CPU of a
statement per read (measured: ~21 + 19 µs for one row alone, ~5 + 6 per row in eights).

Same guarantees as the pooled path: a connection that failed in a way that leaves it unusable
(``connection_broken``: terminated backend, dead socket, timeout, a batch cancelled
mid-statement) is closed rather than handed to the next batch, and the caller's
``storage_errors`` turns the failure into STORAGE_UNAVAILABLE; a failed batch fails every
read in it with the same exception. A read cancelled by its caller (deadline) leaves the
batch to the others in it; a batch whose every read was cancelled is cancelled too, which
drops its connection if it was mid-statement. At most ``database.pool_size`` connections,
opened on first use, named ``credential-broker-read`` in ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
import json
from itertools import islice
from typing import Any

import asyncpg

from broker import metrics
from broker.config import DatabaseSettings
from broker.model import StoredIntegration
from broker.storage.engine import is_unavailable
from broker.storage.repository import GET_BY_ID, GET_BY_IDS, from_values

APPLICATION_NAME = "credential-broker-read"
# Ids per statement: enough to absorb every read in flight under load (the bench keeps 32 in
# flight), small enough that one statement stays a single short index scan.
MAX_BATCH = 128
# Batches in flight at once, each on its own connection. One, as in a group commit: the reads
# that come while it is out go together in the next. In pg-cold, up to pool_size batches in
# flight cost more server CPU per call (416-457 µs against 360-393) for no more throughput.
MAX_BATCHES = 1

Waiter = asyncio.Future[StoredIntegration | None]


async def _decode_json(conn: asyncpg.Connection) -> None:
    # SQLAlchemy's JSON type is ``json`` on PostgreSQL, which asyncpg returns as text.
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """Only read-only statements ever run here: no session state to undo."""


def _settle(waiters: list[Waiter], outcome: StoredIntegration | BaseException | None) -> None:
    """Hand one outcome to every read still waiting for it (a cancelled one is done already)."""
    for waiter in waiters:
        if waiter.done():
            continue
        if isinstance(outcome, Exception):
            waiter.set_exception(outcome)
        elif isinstance(outcome, BaseException):
            waiter.cancel()  # the batch itself was cancelled (shutdown): so are its reads
        else:
            waiter.set_result(outcome)


class _Batch:
    """The reads one statement answers, by id (one id asked twice has two waiters)."""

    __slots__ = ("task", "waiters")

    def __init__(self, waiters: dict[str, list[Waiter]], task: asyncio.Task[None]) -> None:
        self.waiters = waiters
        self.task = task

    def abandoned(self) -> bool:
        return all(w.done() for ws in self.waiters.values() for w in ws)


class IntegrationReader:
    def __init__(
        self, dsn: str, settings: DatabaseSettings, *, max_batches: int = MAX_BATCHES
    ) -> None:
        self.timeout = settings.timeout_seconds
        # Never more batches than connections: a batch then always finds a free connection
        # (or opens one, under the pool's connect timeout), so acquiring needs no timeout of
        # its own (asyncpg would wrap it in ``wait_for``: a task and a timer per batch).
        self.max_batches = max(1, min(max_batches, settings.pool_size))
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
        self._pending: dict[str, list[Waiter]] = {}  # reads no batch has taken yet
        self._starting = False  # a batch task exists that will take ``_pending`` when it runs
        self._running = 0  # batch tasks started and not finished (starting included)
        self._batches: set[_Batch] = set()  # the ones that took their reads
        self.statements = 0  # statements sent (for tests and the curious)

    async def open(self) -> IntegrationReader:
        await self.pool
        return self

    async def read(self, integration_id: str) -> StoredIntegration | None:
        """The row, or None; asyncpg's and the socket's errors go through unwrapped (the
        caller's ``storage_errors`` maps them)."""
        waiter: Waiter = asyncio.get_running_loop().create_future()
        waiters = self._pending.get(integration_id)
        if waiters is None:
            self._pending[integration_id] = [waiter]
        else:
            waiters.append(waiter)
        if not self._starting and self._running < self.max_batches:
            self._start()
        try:
            return await waiter
        except asyncio.CancelledError:
            self._abandon(integration_id, waiter)
            raise

    def _start(self) -> None:
        self._starting = True
        self._running += 1
        asyncio.get_running_loop().create_task(self._run())

    def _abandon(self, integration_id: str, waiter: Waiter) -> None:
        """A caller gave up on its read: forget it, and stop a batch nobody waits for."""
        waiters = self._pending.get(integration_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._pending[integration_id]
            return
        for batch in self._batches:
            if waiter in batch.waiters.get(integration_id, ()) and batch.abandoned():
                batch.task.cancel()
                return

    def _take(self) -> dict[str, list[Waiter]]:
        if len(self._pending) <= MAX_BATCH:
            taken, self._pending = self._pending, {}
            return taken
        return {i: self._pending.pop(i) for i in list(islice(self._pending, MAX_BATCH))}

    async def _run(self) -> None:
        self._starting = False
        taken = self._take()
        task = asyncio.current_task()
        assert task is not None
        batch = _Batch(taken, task)
        self._batches.add(batch)
        try:
            if not taken:
                return  # every read it was started for was cancelled before it ran
            if self._pending and self._running < self.max_batches:
                self._start()  # more than one batch's worth was waiting
            try:
                records = await self._fetch(list(taken))
            except BaseException as exc:
                # Every read in the batch fails alike (the caller maps the exception).
                for waiters in taken.values():
                    _settle(waiters, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for integration_id, waiters in taken.items():
                # Matched by the row's own id, exactly: a row only ever answers its own id.
                record = records.get(integration_id)
                try:
                    row = None if record is None else from_values(record)
                except Exception as exc:
                    # A row that cannot be read fails the reads of that row only.
                    _settle(waiters, exc)
                else:
                    _settle(waiters, row)
        finally:
            self._batches.discard(batch)
            self._running -= 1
            if self._pending and not self._starting and self._running < self.max_batches:
                self._start()

    async def _fetch(self, ids: list[str]) -> dict[str, asyncpg.Record]:
        async with self.pool.acquire() as conn:  # no timeout: see ``max_batches``
            self.statements += 1
            metrics.READ_BATCH.observe(len(ids))
            try:
                if len(ids) == 1:
                    record = await conn.fetchrow(GET_BY_ID, ids[0])
                    records = [] if record is None else [record]
                else:
                    records = await conn.fetch(GET_BY_IDS, ids)
            except BaseException as exc:
                # Dropped, not reused: after a network error or a cancel mid-statement the
                # protocol state is unknown ("another operation is in progress").
                if is_unavailable(exc) or not isinstance(exc, Exception):
                    conn.terminate()
                raise
        return {r["id"]: r for r in records}

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
