"""The audit trail: one event per RPC that reads, returns, changes or deletes an integration.

Fail closed: the event of a successful call is durable before its response leaves (for
GetAccessToken, before the token leaves); if it cannot be written the call fails with
UNAVAILABLE, as Vault's audit devices do. Events never carry a token.

Group commit: calls that finish while a batch is being written queue up and go to the
database together in the next transaction, so a busy broker writes one transaction per batch
instead of one per call — and each call still waits for its own event to be committed.

The batch is held open adaptively, in the spirit of PostgreSQL's ``commit_delay`` /
``commit_siblings``: the writer waits (at most ``max_delay``) for more events only when the
broker is busy — at least ``siblings`` calls in flight in the servicer, or events arriving fast
enough that ``siblings`` more are expected within the window (a moving average of the gaps
between them; a cache-hit call never yields inside the servicer, so the arrival rate is the
signal that sees a busy gRPC queue). A quiet broker commits at once, so the window never taxes
a lone call. A transaction costs far more CPU
(broker and database) than one more row in it, so on a busy broker fewer, larger batches are
what lets throughput approach the gRPC floor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import metrics
from broker.domain import ids
from broker.domain.context import Call
from broker.errors import AuditUnavailable
from broker.model import Clock
from broker.storage import audit_log

log = logging.getLogger("broker.audit")


_UNAVAILABLE = "the audit trail cannot be written, so the broker refuses to answer; retry shortly"
# Shortest stretch of time the CPU load is measured over.
_CPU_SAMPLE = 0.01


class Auditor:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        *,
        group_commit: bool = True,
        max_batch: int = 512,
        max_delay: float = 0.003,
        siblings: int = 2,
        busy_cpu: float = 0.5,
        sink: audit_log.EventSink | None = None,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.group_commit = group_commit
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.siblings = siblings
        self.busy_cpu = busy_cpu
        self.cpu_clock = cpu_clock
        self.sink = sink or audit_log.EngineSink(engine)
        # Calls inside a tracked method: each will bring an event soon.
        self.in_flight = 0
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        # The writer holds a batch for calls still being served (not for the window): the
        # last of them to leave wakes it.
        self._awaiting_siblings = False
        # Moving average of the time between events, and when the last one came.
        self._gap = 1.0
        self._last = 0.0
        self.holds = 0  # batches held open (for tests and curiosity)
        # The process's CPU use (cores) over the latest stretch of at least _CPU_SAMPLE s.
        self._load = 0.0
        self._load_at = (0.0, cpu_clock())

    def enter(self) -> None:
        """A call is being served: it will bring an event once it returns."""
        self.in_flight += 1

    def leave(self) -> None:
        """A call was served (its event, if any, is recorded next, before any await). The
        writer is woken only when that ends its wait: it waits for the calls on their way
        and nobody is left (a cache hit enters and leaves without yielding, so in_flight
        drops to 0 on nearly every call; a writer holding for the window sleeps on)."""
        self.in_flight -= 1
        if not self.in_flight and self._awaiting_siblings:
            self._arrived.set()

    def tracking(self, behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Any:
        """Wrap a method in ``enter``/``leave`` (the interceptor calls them itself)."""

        async def tracked(request: Any, context: Any) -> Any:
            self.enter()
            try:
                return await behaviour(request, context)
            finally:
                self.leave()

        return tracked

    def event(self, call: Call, outcome: str) -> tuple[Any, ...]:
        """One row, in ``audit_log.COLUMNS`` order."""
        return (
            ids.event_id(),
            self.clock(),
            call.caller.name,
            call.method,
            call.integration_id,
            call.user_id,
            call.provider,
            outcome,
            call.request_id,
            call.detail,
            call.credential_type,
            call.grant_id,
            call.run_id,
        )

    async def record(self, call: Call, outcome: str) -> None:
        """Return once the event is committed; AuditUnavailable if it cannot be."""
        event = self.event(call, outcome)
        if not self.group_commit:
            await self._write([event])
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._gap += (min(now - self._last, 1.0) - self._gap) * 0.2
        self._last = now
        done: asyncio.Future[None] = loop.create_future()
        pending = self._pending
        pending.append((event, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="audit-writer")
        elif len(pending) >= self.max_batch:
            # A full batch ends the wait at once; otherwise the writer sleeps on (no wake-up
            # per event: see ``_gather`` and ``leave``).
            self._arrived.set()
        await done

    async def _gather(self) -> None:
        """Hold the batch open while calls still being served are on their way to the audit,
        or while events arrive fast."""
        if self.max_delay <= 0:
            return
        busy = self._gap * self.siblings <= self.max_delay and self._cpu_bound()
        if not busy and self.in_flight + len(self._pending) < self.siblings:
            return  # a quiet broker commits at once
        self.holds += 1
        loop = asyncio.get_running_loop()
        end = loop.time() + self.max_delay
        self._awaiting_siblings = not busy
        try:
            while (busy or self.in_flight) and len(self._pending) < self.max_batch:
                left = end - loop.time()
                if left <= 0:
                    return
                self._arrived.clear()
                try:
                    async with asyncio.timeout(left):
                        await self._arrived.wait()
                except TimeoutError:
                    return
        finally:
            self._awaiting_siblings = False

    def _cpu_bound(self) -> bool:
        """True while this process uses at least ``busy_cpu`` cores. Fast arrivals alone do
        not make holding worth it: on a broker with CPU to spare a held batch only adds its
        wait to every call in it (an open loop at a few hundred calls/s), while on a broker
        whose loop is saturated the CPU a larger batch saves is what serves more calls."""
        if self.busy_cpu <= 0:
            return True
        wall, cpu = time.monotonic(), self.cpu_clock()
        since, used = self._load_at
        if wall - since >= _CPU_SAMPLE:
            self._load = (cpu - used) / (wall - since)
            self._load_at = (wall, cpu)
        return self._load >= self.busy_cpu

    async def stage(self, call: Call, conn: AsyncConnection) -> None:
        """Write the success event of a mutation inside its own transaction (see
        ``context.audit_in``); AuditUnavailable, and so a rollback, if it cannot be."""
        try:
            await audit_log.insert_event(conn, self.event(call, "OK"))
        except Exception as exc:
            log.error("audit event could not be written (%s)", type(exc).__name__)
            raise AuditUnavailable(_UNAVAILABLE) from None
        metrics.AUDIT_BATCH.observe(1)

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._gather()
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    await self._write([event for event, _ in batch])
                except Exception as exc:  # every waiter learns it failed, whatever the cause
                    error = (
                        exc if isinstance(exc, AuditUnavailable) else AuditUnavailable(_UNAVAILABLE)
                    )
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(error)
                else:
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            self._writer = None

    async def _write(self, events: list[tuple[Any, ...]]) -> None:
        try:
            await self.sink.write(events)
        except Exception as exc:
            # Whatever went wrong (database down, table missing, constraint), no event means
            # no answer. The class name is logged; the message may quote the SQL and values.
            log.error("audit events could not be written (%s)", type(exc).__name__)
            raise AuditUnavailable(_UNAVAILABLE) from None
        metrics.AUDIT_BATCH.observe(len(events))

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Let the events already handed to the writer reach the database first (for at most
        ``drain_seconds``): closing the sink under a batch would fail it, and with it calls
        that may still be waiting to answer (a shutdown whose grace has not run out)."""
        writer = self._writer
        if writer is not None and not writer.done():
            await asyncio.wait({writer}, timeout=drain_seconds)
        await self.sink.close()
