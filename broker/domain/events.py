"""Integration events: the transactional outbox and the readers that follow it.

``record`` is called inside the write transaction of every state change, so a change and its
event commit or roll back together. ``EventLog`` serves them: a page of history, or a watch
that replays from a cursor and then follows new events live. Live events come from one poller
per process (``broker.domain.feed``) shared by every watch, woken by PostgreSQL NOTIFY (heard
by ``broker.storage.notify``) or by a commit in this process, with a short poll as the floor.
Ids are handed out in commit order (``broker.storage.events``), so ``id > cursor`` never skips
an event whose transaction committed late. Events never carry a token or secret: messages are
written by the broker from fixed text and OAuth error codes, never a provider's free text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import metrics
from broker.domain import context, periodic, validation
from broker.domain.feed import Feed, StreamLimits
from broker.errors import InvalidArgument
from broker.model import Integration, Revocation
from broker.storage import events as store
from broker.storage import webhooks as webhook_store
from broker.storage.engine import after_commit, storage_errors
from broker.storage.repository import utc

log = logging.getLogger("broker.events")


class EventType(enum.StrEnum):
    CONNECTED = "CONNECTED"
    REFRESH_FAILED = "REFRESH_FAILED"
    RECOVERED = "RECOVERED"
    NEEDS_REAUTHORIZATION = "NEEDS_REAUTHORIZATION"
    EXPIRED = "EXPIRED"
    PROVIDER_MISCONFIGURED = "PROVIDER_MISCONFIGURED"
    DISCONNECTED = "DISCONNECTED"
    REVOCATION_SETTLED = "REVOCATION_SETTLED"
    EXPIRING = "EXPIRING"


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    occurred_at: datetime
    integration_id: str
    user_id: str
    provider: str
    account_id: str
    type: EventType
    reason: str
    message: str
    failure_count: int | None
    revocation: str | None

    @property
    def message_source(self) -> str:
        """Who wrote ``message``: a DISCONNECTED event's is the caller's reason (cleaned by
        ``validation.caller_text``), every other event's is the broker's own text."""
        return "caller" if self.type is EventType.DISCONNECTED and self.message else "broker"

    def as_json(self) -> dict[str, Any]:
        """The webhook body's ``data`` (and what `broker webhooks` prints)."""
        return {
            "id": self.id,
            "occurred_at": self.occurred_at.isoformat(),
            "integration_id": self.integration_id,
            "user_id": self.user_id,
            "provider": self.provider,
            "account_id": self.account_id,
            "type": self.type.value,
            "reason": self.reason,
            "message": self.message,
            "message_source": self.message_source,
            "failure_count": self.failure_count,
            "revocation": self.revocation,
        }


@dataclass(frozen=True, slots=True)
class Heartbeat:
    last_event_id: int


@dataclass(frozen=True, slots=True)
class EventFilter:
    user_id: str = ""
    provider: str = ""
    types: tuple[EventType, ...] = ()


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[Event]
    next_page_token: str


def from_row(row: Any) -> Event:
    m = row._mapping
    occurred = utc(m["occurred_at"])
    assert occurred is not None
    return Event(
        id=int(m["id"]),
        occurred_at=occurred,
        integration_id=m["integration_id"],
        user_id=m["user_id"],
        provider=m["provider"],
        account_id=m["account_id"],
        type=EventType(m["type"]),
        reason=m["reason"],
        message=m["message"],
        failure_count=m["failure_count"],
        revocation=m["revocation"],
    )


class Wakeup:
    """Wakes every waiting reader in this process (the streams' poller, webhook dispatchers).
    One per process: the writers (`record`) are plain functions inside transactions and cannot
    know which readers exist; a spurious wake-up only costs a query."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                with contextlib.suppress(RuntimeError):  # its loop has closed
                    waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def wait(self, seconds: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, seconds)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


WAKEUP = Wakeup()


async def record(
    conn: AsyncConnection,
    type: EventType,
    integration: Integration,
    at: datetime,
    *,
    reason: str = "",
    message: str = "",
    failure_count: int | None = None,
    revocation: str | None = None,
) -> int:
    """Write one event in the caller's transaction (call it last: see broker.storage.events)."""
    event_id = await store.insert_event(
        conn,
        {
            "occurred_at": at,
            "integration_id": integration.id,
            "user_id": integration.user_id,
            "provider": integration.provider,
            "account_id": integration.account_id,
            "type": type.value,
            "reason": reason[:64],
            "message": message[:255],
            "failure_count": failure_count,
            "revocation": revocation,
        },
    )
    after_commit(conn, lambda: _written(type))
    return event_id


def _written(type: EventType) -> None:
    metrics.EVENTS_WRITTEN.labels(type.value).inc()
    WAKEUP.notify()


# Events per read of a stream catching up from its own cursor.
_CATCH_UP = 500


def encode_cursor(event_id: int) -> str:
    return base64.urlsafe_b64encode(f"e{event_id}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not raw.startswith("e"):
            raise ValueError(raw)
        return int(raw[1:])
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this broker issued") from None


class EventLog:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Any,
        *,
        retention: timedelta,
        poll_seconds: float,
        heartbeat_seconds: float,
        max_streams_per_caller: int = 100,
        max_streams: int = 1000,
        stream_buffer_events: int = 4096,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.retention = retention
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        # Set at shutdown (by ``close``): open watches end cleanly (status OK) instead of
        # being cancelled.
        self.closing = asyncio.Event()
        self.limits = StreamLimits(max_streams_per_caller, max_streams)
        self.feed: Feed[Event] = Feed(
            self._read_new,
            self._last_id,
            WAKEUP.wait,
            poll_seconds=poll_seconds,
            capacity=stream_buffer_events,
        )

    def close(self) -> None:
        self.closing.set()
        self.feed.close()

    def _scope(self, filters: EventFilter) -> tuple[Collection[str] | None, Collection[str] | None]:
        """The users and providers this caller may read (None: all), narrowed by the filters;
        a filter outside the caller's policy (or grant) is PERMISSION_DENIED."""
        validation.text("user_id", filters.user_id, validation.MAX_ID, required=False)
        validation.text("provider", filters.provider, validation.MAX_PROVIDER, required=False)
        context.check_owner(filters.user_id, filters.provider or None)
        call = context.current_call.get()
        users: Collection[str] | None = None if call is None else call.caller.users
        grant = context.current_grant()
        if grant is not None:
            users = {grant.user_id}
        if filters.user_id:
            users = {filters.user_id}
        providers = {filters.provider} if filters.provider else context.allowed_providers()
        return users, providers

    async def _read(
        self,
        after_id: int,
        limit: int,
        filters: EventFilter,
        scope: tuple[Collection[str] | None, Collection[str] | None],
        upto: int | None = None,
    ) -> list[Event]:
        users, providers = scope
        async with storage_errors(), self.engine.connect() as conn:
            rows = await store.page(
                conn,
                after_id,
                limit,
                users=users,
                providers=providers,
                types=[t.value for t in filters.types],
                upto=upto,
            )
        return [from_row(r) for r in rows]

    async def _read_new(self, after_id: int, limit: int) -> list[Event]:
        """The shared poller's read: every event, whoever may see it."""
        async with storage_errors(), self.engine.connect() as conn:
            return [from_row(r) for r in await store.page(conn, after_id, limit)]

    async def _last_id(self) -> int:
        async with storage_errors(), self.engine.connect() as conn:
            return await store.last_id(conn)

    async def list(
        self, after_id: int, filters: EventFilter, page_size: int, page_token: str
    ) -> EventPage:
        if after_id < 0:
            raise InvalidArgument("after_event_id", "must be 0 or a positive event id")
        size = validation.page_size(page_size)
        scope = self._scope(filters)
        cursor = decode_cursor(page_token) if page_token else after_id
        found = await self._read(cursor, size + 1, filters, scope)
        items = found[:size]
        more = len(found) > size
        return EventPage(items, encode_cursor(items[-1].id) if more and items else "")

    async def watch(
        self, after_id: int, filters: EventFilter
    ) -> AsyncGenerator[Event | Heartbeat, None]:
        """Stored events after the cursor, then new ones as they commit, with heartbeats.

        Close it with ``aclose`` (``contextlib.aclosing``): that is when its place under the
        stream limits is given back."""
        if after_id < 0:
            raise InvalidArgument("after_event_id", "must be 0 or a positive event id")
        scope = self._scope(filters)
        call = context.current_call.get()
        with self.limits.admit(call.caller.name if call else ""), self.feed.subscribed():
            async for item in self._follow(after_id, filters, scope):
                yield item

    async def _follow(
        self,
        cursor: int,
        filters: EventFilter,
        scope: tuple[Collection[str] | None, Collection[str] | None],
    ) -> AsyncIterator[Event | Heartbeat]:
        # ``cursor``: every event up to it has been considered for this stream (delivered or
        # filtered out); ``delivered``: the last one sent, which heartbeats report.
        users, providers = scope
        types = frozenset(filters.types)
        feed = self.feed
        delivered = cursor
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        # A stream that opens reads what the database holds after its cursor once, itself: the
        # shared buffer may not yet hold what another process has just committed, and no
        # heartbeat may come before an event that was committed when the stream opened.
        opening = True
        while not self.closing.is_set():
            tick = feed.tick()
            head = feed.head
            if opening or (head is not None and cursor < feed.base):
                # Behind what the shared buffer holds (an old cursor, or a slow consumer the
                # buffer moved past): read the gap from the database, up to the head.
                metrics.EVENT_CATCH_UPS.inc()
                upto = None if opening else head
                batch = await self._read(cursor, _CATCH_UP, filters, scope, upto=upto)
                for event in batch:
                    cursor = delivered = event.id
                    yield event
                if batch:
                    quiet_since = loop.time()
                if len(batch) < _CATCH_UP:
                    opening = False
                    if head is not None:
                        cursor = max(cursor, head)
                continue
            if head is not None:
                for event in feed.since(cursor):
                    cursor = event.id
                    if (
                        (users is None or event.user_id in users)
                        and (providers is None or event.provider in providers)
                        and (not types or event.type in types)
                    ):
                        delivered = event.id
                        quiet_since = loop.time()
                        yield event
                cursor = max(cursor, head)
            quiet = loop.time() - quiet_since
            if quiet >= self.heartbeat_seconds:
                quiet_since = loop.time()
                quiet = 0.0
                yield Heartbeat(delivered)
            if not tick.done():
                await asyncio.wait([tick], timeout=self.heartbeat_seconds - quiet)

    async def purge_pass(self) -> int:
        """Delete events (and finished webhook deliveries) older than the retention period;
        returns how many events."""
        before = self.clock() - self.retention
        async with storage_errors(), self.engine.begin() as conn:
            await webhook_store.purge(conn, before)
        total = 0
        while True:
            async with storage_errors(), self.engine.begin() as conn:
                deleted = await store.purge(conn, before, 1000)
            total += deleted
            if deleted < 1000:
                return total

    async def run_purger(self, interval_seconds: float) -> None:
        await periodic.every(interval_seconds, self.purge_pass, "event retention", "%d purged")


# -- the events of each state change (called inside its write transaction) ---------------------


async def connected(
    conn: AsyncConnection, integration: Integration, at: datetime, created: bool
) -> None:
    call = context.current_call.get()
    await record(
        conn,
        EventType.CONNECTED,
        integration,
        at,
        reason="CREATED" if created else "RECONNECTED",
        message=f"tokens stored by {call.method if call else 'the broker CLI'}",
    )


async def revocation_settled(
    conn: AsyncConnection, integration: Integration, at: datetime, outcome: Revocation
) -> None:
    await record(
        conn,
        EventType.REVOCATION_SETTLED,
        integration,
        at,
        reason=f"REVOCATION_{outcome.value}",
        message=f"provider-side revocation ended {outcome.value}",
        revocation=outcome.value,
    )


async def needs_reauthorization(
    conn: AsyncConnection,
    integration: Integration,
    at: datetime,
    error: str,
    rejected: str = "refresh token",
) -> None:
    await record(
        conn,
        EventType.NEEDS_REAUTHORIZATION,
        integration,
        at,
        reason="REAUTHORIZATION_REQUIRED",
        message=f"the provider rejected the {rejected} ({error[:64]}); the user must "
        "authorize again",
    )


async def refresh_failed(
    conn: AsyncConnection, integration: Integration, at: datetime, failures: int, threshold: int
) -> None:
    """Once per run of transient failures: when the run reaches ``threshold``."""
    if failures != threshold:
        return
    await record(
        conn,
        EventType.REFRESH_FAILED,
        integration,
        at,
        reason="PROVIDER_UNAVAILABLE",
        message=f"{failures} refreshes in a row failed; the provider is unavailable",
        failure_count=failures,
    )


async def expiring(conn: AsyncConnection, integration: Integration, at: datetime) -> None:
    """Once per refresh-token expiry (the caller's ``mark_expiring`` makes it once): the
    refresh token lapses soon and the broker cannot renew it."""
    lapses = integration.refresh_token_expires_at
    when = "soon" if lapses is None else f"at {lapses.isoformat(timespec='seconds')}"
    await record(
        conn,
        EventType.EXPIRING,
        integration,
        at,
        reason="REFRESH_TOKEN_EXPIRING",
        message=f"the refresh token lapses {when} and the provider does not renew it; the "
        "user must authorize again before then",
    )


async def provider_misconfigured(
    conn: AsyncConnection, integration: Integration, at: datetime, error: str
) -> None:
    """Once per run: not again while this integration's last event already says so."""
    if await store.last_type(conn, integration.id) == EventType.PROVIDER_MISCONFIGURED.value:
        return
    await record(
        conn,
        EventType.PROVIDER_MISCONFIGURED,
        integration,
        at,
        reason="PROVIDER_MISCONFIGURED",
        message=f"the provider rejected this broker's OAuth client ({error[:64] or 'no client'})",
    )


_FAILING = (EventType.REFRESH_FAILED.value, EventType.PROVIDER_MISCONFIGURED.value)


async def refreshed(conn: AsyncConnection, before: Any, at: datetime) -> None:
    """RECOVERED when a refresh succeeds after a failure event, or brings an EXPIRED
    integration back to CONNECTED; a plain refresh writes nothing (it is a metric)."""
    integration: Integration = before.integration
    expired = integration.status.value == "EXPIRED"
    if not expired and before.last_refresh_error is None:
        # No lookup on the common path: a failure event is only ever written together with
        # last_refresh_error (the refresh engine's release), and only a refresh (this one) or
        # a new StoreIntegration (whose CONNECTED event follows it) clears that column.
        return
    if not expired and await store.last_type(conn, integration.id) not in _FAILING:
        return
    await record(
        conn,
        EventType.RECOVERED,
        integration,
        at,
        reason="REFRESHED",
        message="refreshed after expiry" if expired else "a refresh succeeded after failures",
    )


async def connected_many(
    conn: AsyncConnection, integrations: Sequence[Integration], at: datetime, message: str
) -> None:
    """``connected`` (CREATED) for a batch of new integrations, in one statement: the last
    of the transaction that inserted them (``broker import``)."""
    if not integrations:
        return
    await store.insert_events(
        conn,
        [
            {
                "occurred_at": at,
                "integration_id": i.id,
                "user_id": i.user_id,
                "provider": i.provider,
                "account_id": i.account_id,
                "type": EventType.CONNECTED.value,
                "reason": "CREATED",
                "message": message[:255],
                "failure_count": None,
                "revocation": None,
            }
            for i in integrations
        ],
    )
    count = len(integrations)
    after_commit(conn, lambda: _written_many(count))


def _written_many(count: int) -> None:
    metrics.EVENTS_WRITTEN.labels(EventType.CONNECTED.value).inc(count)
    WAKEUP.notify()
