"""Many WatchIntegrationEvents streams, on both backends: they are capped per caller and per
process (RESOURCE_EXHAUSTED naming the limit), they share one database poller (the queries
on the events table do not grow with the number of streams), and each one still receives
every event exactly once and in order: live, after a resume, and when it fell behind the
shared buffer and had to catch up from its own cursor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from broker import metrics
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import CallerSettings, Settings
from broker.domain.events import Event, EventFilter
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from tests.helpers.errors import error_info
from tests.helpers.events import Reader, all_events, event_settings, store
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.settings import ADMIN
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually, holds

Code = grpc.StatusCode
OTHER = (("authorization", "Bearer other-watcher"),)
POLL = 0.2


def with_events(settings: Settings, **events: Any) -> Settings:
    return settings.model_copy(update={"events": settings.events.model_copy(update=events)})


def fanout_settings(database_url: str, fake: FakeAuthServer, **events: Any) -> Settings:
    settings = event_settings(database_url, fake)
    other = CallerSettings(token_sha256=hash_token("other-watcher"))
    settings = settings.model_copy(update={"callers": {**settings.callers, "other": other}})
    return with_events(settings, poll_seconds=POLL, **events)


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return fanout_settings(database_url, fake, max_streams=120, heartbeat_seconds=0.5)


class StatementCounter:
    """SELECTs on the events table, counted at the driver (every connection of the engine)."""

    def __init__(self, broker: Broker) -> None:
        self.count = 0
        self.engine = broker.engine.sync_engine
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        text = statement.lstrip().upper()
        if text.startswith("SELECT") and "INTEGRATION_EVENTS" in text:
            self.count += 1

    async def over(self, seconds: float) -> int:
        start = self.count
        await asyncio.sleep(seconds)
        return self.count - start


def gauge() -> float:
    return float(metrics.WATCH_STREAMS._value.get())


async def outcome(call: Any) -> Code:
    """How a stream ended: its error, or CANCELLED by the test."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    except asyncio.CancelledError:  # the call's, raised by grpc.aio; not this task's
        return Code.CANCELLED
    return Code.OK


async def test_streams_are_capped_per_caller_and_in_total(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    base = gauge()
    admin = [stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=ADMIN)]
    admin += [
        stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=ADMIN)
        for _ in range(199)
    ]
    tasks = [asyncio.create_task(outcome(c)) for c in admin]
    await eventually(lambda: holds(sum(t.done() for t in tasks) == 100), "100 refusals")
    await asyncio.sleep(0.5)
    refused = [t for t in tasks if t.done()]
    assert len(refused) == 100, "only the per-caller limit (events.max_streams_per_caller)"
    assert {t.result() for t in refused} == {Code.RESOURCE_EXHAUSTED}
    error = await expect_refusal(stub, ADMIN)
    info = error_info(error)
    assert info is not None
    assert info.reason == "CALLER_STREAM_LIMIT"
    assert dict(info.metadata) == {"setting": "events.max_streams_per_caller", "limit": "100"}
    assert gauge() - base == 100
    # Another caller has its own allowance, up to what the process has left (120 in all).
    others = [
        stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=OTHER)
        for _ in range(20)
    ]
    other_tasks = [asyncio.create_task(outcome(c)) for c in others]
    await asyncio.sleep(1)
    assert not any(t.done() for t in other_tasks)
    info = error_info(await expect_refusal(stub, OTHER))
    assert info is not None
    assert (info.reason, info.metadata["setting"]) == ("STREAM_LIMIT", "events.max_streams")
    # A closed stream gives its place back.
    for call in admin:
        call.cancel()
    await eventually(lambda: holds(gauge() - base == 20), "the admin streams to close")
    late = stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=ADMIN)
    first: Any = await late.read()
    assert first.HasField("heartbeat") or first.HasField("event")
    late.cancel()
    for call in others:
        call.cancel()
    await asyncio.gather(*tasks, *other_tasks)
    await eventually(lambda: holds(gauge() == base), "every stream to close")


async def expect_refusal(stub: pb_grpc.CredentialBrokerAsyncStub, md: Any) -> Any:
    call = stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    return caught.value


async def test_one_poller_serves_every_stream_and_each_gets_every_event_once_in_order(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, fake: FakeAuthServer
) -> None:
    counter = StatementCounter(broker)
    window = 2.0
    one = Reader(stub, pb.WatchIntegrationEventsRequest())
    await asyncio.sleep(1)
    with_one = await counter.over(window)
    readers = [one] + [Reader(stub, pb.WatchIntegrationEventsRequest()) for _ in range(99)]
    await asyncio.sleep(1)
    polls = metrics.EVENT_POLLS._value.get()
    with_hundred = await counter.over(window)
    # One query per poll interval whatever the number of streams (a stream of its own would
    # make that 100 per interval).
    assert with_one <= window / POLL + 2
    assert with_hundred <= window / POLL + 2, (with_one, with_hundred)
    assert metrics.EVENT_POLLS._value.get() - polls <= window / POLL + 2

    # Live events while writers run: still one poll per wake-up, and every stream has all.
    before = counter.count
    await asyncio.gather(*(store(stub, fake, user=f"u{i}", expires_in=3600) for i in range(30)))
    for reader in readers:
        await reader.has(30)
    expected = [e.id for e in await all_events(stub)]
    assert len(expected) == 30
    for reader in readers:
        assert [e.id for e in reader.events] == expected
    assert counter.count - before < 60, "queries follow commits and polls, not streams"
    for reader in readers:
        reader.stop()


@pytest.fixture
async def small_buffer(settings: Settings) -> AsyncIterator[Broker]:
    """A broker whose shared buffer keeps only 3 events, so streams fall behind it."""
    running = await start(with_events(settings, stream_buffer_events=3))
    yield running
    await running.stop(0)


async def test_a_stream_behind_the_buffer_catches_up_from_its_own_cursor(
    small_buffer: Broker, fake: FakeAuthServer
) -> None:
    async with broker_stub(small_buffer.port) as stub:
        for i in range(3):
            await store(stub, fake, user=f"early{i}", expires_in=3600)
        live = Reader(stub, pb.WatchIntegrationEventsRequest())
        await live.has(3)
        # A consumer that stops reading (the domain's own stream, so nothing buffers for
        # it in a transport): 20 events go by, far more than the shared buffer holds.
        slow = small_buffer.runtime.events.watch(0, EventFilter())
        first = await anext(slow)
        assert isinstance(first, Event)
        catch_ups = metrics.EVENT_CATCH_UPS._value.get()
        for i in range(20):
            await store(stub, fake, user=f"late{i}", expires_in=3600)
        await live.has(23)
        rest: list[int] = []
        while len(rest) < 22:
            item = await asyncio.wait_for(anext(slow), 5)
            if isinstance(item, Event):
                rest.append(item.id)
        await slow.aclose()
        expected = [e.id for e in await all_events(stub)]
        assert [first.id, *rest] == expected, "every event once, in order"
        assert [e.id for e in live.events] == expected
        assert metrics.EVENT_CATCH_UPS._value.get() > catch_ups
        live.stop()


async def test_resuming_streams_under_writers_with_a_small_buffer_miss_nothing(
    small_buffer: Broker, fake: FakeAuthServer
) -> None:
    from tests.helpers.events import read_resuming

    async with broker_stub(small_buffer.port) as stub:
        await store(stub, fake, user="first", expires_in=3600)
        start_id = (await all_events(stub))[-1].id
        filtered = Reader(stub, pb.WatchIntegrationEventsRequest(user_id="w7"))

        async def write(i: int) -> None:
            await store(stub, fake, user=f"w{i % 10}", expires_in=3600)

        writers = asyncio.gather(*(write(i) for i in range(40)))
        seen = await asyncio.wait_for(read_resuming(stub, start_id, writers), 60)
        stored = [e.id for e in await all_events(stub) if e.id > start_id]
        assert len(stored) == 40
        assert [e.id for e in seen] == stored
        await filtered.has(4)
        await asyncio.sleep(0.5)
        assert [e.user_id for e in filtered.events] == ["w7"] * 4
        filtered.stop()
