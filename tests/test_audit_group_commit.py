"""The adaptive group commit: batches grow while calls are in flight, a quiet broker commits at
once, a failed batch fails every call in it, and the PostgreSQL sink survives losing its
connection."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.config import DatabaseSettings
from broker.domain.audit import Auditor
from broker.domain.context import Call, Caller
from broker.errors import AuditUnavailable
from broker.storage import audit_log
from broker.storage.engine import create_engine
from broker.storage.schema import migrate
from tests.helpers.databases import plain_dsn
from tests.helpers.settings import ENVIRONMENT

CALLER = Caller(name="runner", methods=frozenset({"GetAccessToken"}), providers=None)


class RecordingSink:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        await asyncio.sleep(0.0005)  # a commit takes a moment; calls keep arriving meanwhile
        if self.fail:
            raise OSError("disk on fire")
        self.batches.append(len(rows))

    async def close(self) -> None:
        return None


def auditor(sink: RecordingSink, **kwargs: Any) -> Auditor:
    return Auditor(None, lambda: datetime.now(UTC), sink=sink, **kwargs)  # type: ignore[arg-type]


async def serve(audit: Auditor, clients: int, calls: int, rng: random.Random) -> None:
    """A closed loop: ``clients`` callers, each making ``calls`` calls one after another
    through a tracked method and recording its event (as the interceptor does)."""

    async def method(request: Any, context: Any) -> None:
        await asyncio.sleep(rng.uniform(0, 0.0005))
        # Serving a call costs CPU on the one event loop: calls reach the audit one by one.
        time.sleep(0.0003)

    tracked = audit.tracking(method)

    async def client(c: int) -> None:
        for i in range(calls):
            await tracked(None, None)
            await audit.record(Call(CALLER, "GetAccessToken", f"req-{c}-{i}"), "OK")

    await asyncio.gather(*(client(c) for c in range(clients)))


async def test_busy_broker_writes_few_large_batches() -> None:
    rng = random.Random(7)
    gathered = RecordingSink()
    await serve(auditor(gathered, max_delay=1.0, siblings=4), 16, 8, rng)
    eager = RecordingSink()
    await serve(auditor(eager, max_delay=0, siblings=4), 16, 8, random.Random(7))
    assert sum(gathered.batches) == sum(eager.batches) == 128
    # Holding the batch open while calls are in flight groups every client's call into one
    # transaction; without the window batches are whatever arrived during the last commit.
    assert max(gathered.batches) == 16, gathered.batches
    assert len(gathered.batches) * 2 <= len(eager.batches), (gathered.batches, eager.batches)


async def test_quiet_broker_commits_at_once() -> None:
    """Fewer calls in flight than ``siblings`` and events far apart: no window at all."""
    sink = RecordingSink()
    audit = auditor(sink, max_delay=0.05, siblings=4)
    for i in range(5):
        await asyncio.wait_for(serve(audit, 1, 1, random.Random(i)), timeout=10)
        await asyncio.sleep(0.1)
    assert sink.batches == [1, 1, 1, 1, 1]
    assert audit.holds == 0


async def test_fast_arrivals_hold_the_batch_open() -> None:
    """Events arriving every 0.3 ms while the servicer never yields (a cache hit): the rate
    alone says the broker is busy, and the window gathers them."""

    async def arrivals(audit: Auditor) -> None:
        pending = []
        for i in range(200):
            pending.append(
                asyncio.create_task(audit.record(Call(CALLER, "GetAccessToken", f"r{i}"), "OK"))
            )
            await asyncio.sleep(0.0003)
        await asyncio.gather(*pending)

    class FastSink(RecordingSink):
        async def write(self, rows: list[tuple[Any, ...]]) -> None:
            self.batches.append(len(rows))

    eager, gathered = FastSink(), FastSink()
    await arrivals(auditor(eager, max_delay=0, siblings=2))
    # This test's process is mostly asleep: its CPU must read as busy for the rate to count.
    held = auditor(gathered, max_delay=0.02, siblings=2, cpu_clock=cpu_at(1.0))
    await arrivals(held)
    assert sum(eager.batches) == sum(gathered.batches) == 200
    assert held.holds > 0
    assert len(gathered.batches) * 3 <= len(eager.batches), (gathered.batches, eager.batches)


async def test_fast_arrivals_with_cpu_to_spare_commit_at_once() -> None:
    """The same fast arrivals on a broker using a tenth of a core: a window would only add
    its wait to every call (the open-loop case), so every event is committed at once."""
    sink = RecordingSink()
    audit = auditor(sink, max_delay=0.02, siblings=2, busy_cpu=0.5, cpu_clock=cpu_at(0.1))
    for i in range(50):
        await audit.record(Call(CALLER, "GetAccessToken", f"r{i}"), "OK")
        await asyncio.sleep(0.0003)
    assert audit.holds == 0
    assert sink.batches == [1] * 50


async def test_close_lets_the_batch_being_written_finish() -> None:
    """Closing (shutdown) while a batch is on its way: the batch is committed and its calls
    answered, not failed by a sink closed under it."""

    class ClosingSink(RecordingSink):
        closed = False

        async def write(self, rows: list[tuple[Any, ...]]) -> None:
            await asyncio.sleep(0.2)
            if self.closed:
                raise OSError("connection closed")
            self.batches.append(len(rows))

        async def close(self) -> None:
            self.closed = True

    sink = ClosingSink()
    audit = auditor(sink, max_delay=0, siblings=2)
    calls = [
        asyncio.create_task(audit.record(Call(CALLER, "GetAccessToken", f"r{i}"), "OK"))
        for i in range(3)
    ]
    await asyncio.sleep(0.05)  # the writer has taken them and is writing
    await audit.close(drain_seconds=5)
    await asyncio.wait_for(asyncio.gather(*calls), timeout=5)
    assert sum(sink.batches) == 3
    assert sink.closed


def cpu_at(cores: float) -> Any:
    """A process CPU clock that reads ``cores`` cores busy (CPU seconds per wall second)."""
    return lambda: time.monotonic() * cores


async def test_window_never_outlasts_max_delay_when_a_call_hangs() -> None:
    """A call stuck in the servicer (a slow refresh) keeps ``in_flight`` up; the batch still
    goes after ``max_delay`` instead of waiting for it."""
    sink = RecordingSink()
    audit = auditor(sink, max_delay=0.05, siblings=2)
    release = asyncio.Event()

    async def stuck(request: Any, context: Any) -> None:
        await release.wait()

    hanging = asyncio.create_task(audit.tracking(stuck)(None, None))
    await asyncio.sleep(0)
    await asyncio.wait_for(serve(audit, 3, 1, random.Random(1)), timeout=10)
    assert sum(sink.batches) == 3
    release.set()
    await hanging


async def test_failed_batch_fails_every_call_in_it() -> None:
    audit = auditor(RecordingSink(fail=True), max_delay=0.05, siblings=2)
    results = await asyncio.gather(
        *(audit.record(Call(CALLER, "GetAccessToken", f"r{i}"), "OK") for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, AuditUnavailable) for r in results), results


@pytest.mark.postgres
async def test_postgres_sink_reconnects_after_losing_its_connection(
    postgres: Any,
) -> None:
    url = await postgres.new()
    engine = create_engine(DatabaseSettings(url=url))
    sink = audit_log.sink_for(engine, 5.0)
    assert isinstance(sink, audit_log.PostgresSink)
    audit = auditor(RecordingSink(), max_delay=0)
    audit.sink = sink
    admin = await asyncpg.connect(plain_dsn(url))
    try:
        await audit.record(Call(CALLER, "GetAccessToken", "before"), "OK")
        # Only this test's database: other tests (and other brokers) share the server.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'credential-broker-audit' AND datname = current_database()"
        )
        # The first batch after the loss may fail (fail closed); the next one reconnects.
        with contextlib.suppress(AuditUnavailable):
            await audit.record(Call(CALLER, "GetAccessToken", "lost"), "OK")
        await audit.record(Call(CALLER, "GetAccessToken", "after"), "OK")
        ids = {r["request_id"] for r in await admin.fetch("SELECT request_id FROM audit_events")}
        assert {"before", "after"} <= ids
    finally:
        await admin.close()
        await audit.close(drain_seconds=5)
        await engine.dispose()


async def test_sqlite_sink_checkpoints_beside_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit connection never checkpoints inside a commit (its fsync would hold up every
    call in that batch); the sink's own checkpoints keep the write-ahead log from growing."""
    audit = auditor(RecordingSink(), max_delay=0)
    rows = [audit.event(Call(CALLER, "GetAccessToken", f"r{i}"), "OK") for i in range(10_000)]

    async def wal_after_writing(name: str) -> int:
        database = tmp_path / f"{name}.db"
        engine = create_engine(DatabaseSettings(url=f"sqlite+aiosqlite:///{database}"))
        await migrate(engine, ENVIRONMENT)
        await engine.dispose()
        sink = audit_log.SqliteSink(str(database), 5.0)
        try:
            for start in range(0, len(rows), 500):
                await sink.write(rows[start : start + 500])
                if sink._checkpoint is not None:
                    await sink._checkpoint
        finally:
            await sink.close()
        with sqlite3.connect(database) as check:
            assert check.execute("SELECT count(*) FROM audit_events").fetchone() == (10_000,)
            # Other connections (the broker's pool, the CLI) keep SQLite's own default.
            assert check.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
        return (tmp_path / f"{name}.db-wal").stat().st_size

    checkpointed = await wal_after_writing("checkpointed")
    monkeypatch.setattr(audit_log, "_CHECKPOINT_ROWS", 1_000_000)
    never = await wal_after_writing("never")
    assert checkpointed * 3 <= never, (checkpointed, never)


async def test_sqlite_sink_never_blocks_the_loop_on_a_held_write_lock(tmp_path: Path) -> None:
    """A batch is written on the event loop only when the write lock is free at once; while
    another connection holds it (a refresh being written, the CLI) the batch waits in the
    sink's thread and the loop keeps serving."""
    database = tmp_path / "audit.db"
    engine = create_engine(DatabaseSettings(url=f"sqlite+aiosqlite:///{database}"))
    await migrate(engine, ENVIRONMENT)
    await engine.dispose()
    sink = audit_log.SqliteSink(str(database), 5.0)
    audit = auditor(RecordingSink(), max_delay=0)
    event = audit.event(Call(CALLER, "GetAccessToken", "free"), "OK")
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        await sink.write([event])  # the lock is free: written here, on the loop
        holder.execute("BEGIN IMMEDIATE")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        waiting = asyncio.create_task(
            sink.write([audit.event(Call(CALLER, "GetAccessToken", "held"), "OK")])
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()  # waits for the lock ...
        assert ticks >= 10  # ... without stopping the loop
        holder.execute("COMMIT")
        await asyncio.wait_for(waiting, 5)
        ticking.cancel()
    finally:
        holder.close()
        await sink.close()
    with sqlite3.connect(database) as check:
        found = {r[0] for r in check.execute("SELECT request_id FROM audit_events")}
    assert found == {"free", "held"}
