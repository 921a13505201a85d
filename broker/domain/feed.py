"""One database poller per process for every WatchIntegrationEvents stream, and the limits on
how many streams there may be.

Each stream used to query the events table on every wake-up and every poll interval, so N
streams cost N queries a second even with nothing happening. Here one task reads new events
(all of them, unfiltered) after the process's ``head`` and keeps the most recent ones in a
bounded buffer; streams filter that buffer in memory. A stream never holds events of its own,
so a slow consumer costs no memory: when it comes back and its cursor has fallen behind the
buffer, it reads from the database from its own cursor (as a stream opened with an old cursor
does), up to the head, and then joins the buffer again. Nothing is skipped and nothing is
repeated either way, because every position is an event id and ids become visible in order
(``broker.storage.events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

from broker import metrics
from broker.errors import BrokerError, CallerStreamLimit, StreamLimit

log = logging.getLogger("broker.events")

# Events read by one poll query; a burst larger than this takes several (in one pass).
POLL_BATCH = 500


class _Event(Protocol):
    @property
    def id(self) -> int: ...


E = TypeVar("E", bound=_Event)


class Feed(Generic[E]):
    """New events as this process sees them, shared by its streams.

    ``head``: every event with an id up to it has been read (None until the first poll).
    ``base``: the buffer holds every event with ``base < id <= head``; a stream whose cursor
    is below ``base`` has to read the gap itself."""

    def __init__(
        self,
        read: Callable[[int, int], Awaitable[list[E]]],
        last_id: Callable[[], Awaitable[int]],
        wait: Callable[[float], Awaitable[None]],
        *,
        poll_seconds: float,
        capacity: int,
    ) -> None:
        self._read = read
        self._last_id = last_id
        self._wait = wait
        self.poll_seconds = poll_seconds
        self.head: int | None = None
        self.base = 0
        self._events: deque[E] = deque(maxlen=capacity)
        self._tick: asyncio.Future[None] | None = None
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.closed = False

    # -- for streams ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def subscribed(self) -> Iterator[None]:
        """Keep the poller running while at least one stream is open."""
        self._subscribers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="event-feed")
        try:
            yield
        finally:
            self._subscribers -= 1

    def tick(self) -> asyncio.Future[None]:
        """Resolved at the next change (new events, head moved, closing). Take it before
        looking at the buffer, so that a change in between is not missed."""
        if self._tick is None or self._tick.done():
            self._tick = asyncio.get_running_loop().create_future()
        return self._tick

    def since(self, cursor: int) -> list[E]:
        """Buffered events after ``cursor`` (which must be at least ``base``), oldest first."""
        newer: list[E] = []
        for event in reversed(self._events):
            if event.id <= cursor:
                break
            newer.append(event)
        newer.reverse()
        return newer

    def close(self) -> None:
        self.closed = True
        self._wake()
        if self._task is not None:
            self._task.cancel()

    # -- the poller ----------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._tick is not None and not self._tick.done():
            self._tick.set_result(None)

    async def _run(self) -> None:
        while self._subscribers and not self.closed:
            try:
                await self._poll()
            except Exception as exc:
                # Streams stay open (their heartbeats go on) and the poll is retried: ending
                # every stream at once would only bring them all back together.
                if not self._failing:
                    if isinstance(exc, BrokerError):
                        log.warning("event poll failed (%s); retrying", exc.reason)
                    else:
                        log.exception("event poll failed; retrying")
                self._failing = True
            else:
                if self._failing:
                    log.info("event poll recovered")
                self._failing = False
            await self._wait(self.poll_seconds)

    async def _poll(self) -> None:
        if self.head is None:
            metrics.EVENT_POLLS.inc()
            self.head = self.base = await self._last_id()
            self._wake()
            return
        while True:
            metrics.EVENT_POLLS.inc()
            batch = await self._read(self.head, POLL_BATCH)
            if not batch:
                return
            for event in batch:
                if len(self._events) == self._events.maxlen:
                    self.base = self._events[0].id
                self._events.append(event)
            self.head = batch[-1].id
            self._wake()
            if len(batch) < POLL_BATCH:
                return


class StreamLimits:
    """Open streams per caller and in all, on this process."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self._open: dict[str, int] = {}
        self._count = 0

    @contextlib.contextmanager
    def admit(self, caller: str) -> Iterator[None]:
        if self._count >= self.total:
            metrics.WATCH_REFUSED.labels("total").inc()
            raise StreamLimit(
                f"this broker has {self.total} event streams open (the limit); retry later, "
                "or on another replica",
                setting="events.max_streams",
                limit=self.total,
            )
        if self._open.get(caller, 0) >= self.per_caller:
            metrics.WATCH_REFUSED.labels("per_caller").inc()
            raise CallerStreamLimit(
                f"caller {caller!r} has {self.per_caller} event streams open on this broker "
                "(the limit); close one first (one stream can follow every event)",
                setting="events.max_streams_per_caller",
                limit=self.per_caller,
            )
        self._open[caller] = self._open.get(caller, 0) + 1
        self._count += 1
        metrics.WATCH_STREAMS.inc()
        try:
            yield
        finally:
            self._count -= 1
            metrics.WATCH_STREAMS.dec()
            left = self._open[caller] - 1
            if left:
                self._open[caller] = left
            else:
                del self._open[caller]
