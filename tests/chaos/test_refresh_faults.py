"""Faults during refreshes: SIGTERM (background and caller refreshes), kill -9, a provider
slower than the caller's deadline, a replica frozen (SIGSTOP) while it holds leases."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from broker.storage.tables import integrations as t
from tests.chaos.conftest import Code, Figures, call_token, until_served
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.processes import BrokerProcess
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.chaos

SIZE = 10


async def assert_nothing_lost(cluster: Any, figures: Figures, *, window: int = 0) -> None:
    """Rotations issued = stored and no grant revoked — beyond ``window`` grants that were in
    flight when the process died (the documented kill -9 crash window)."""
    # A dead client's requests are still processed by the provider: count them too.
    await wait_until(lambda: cluster.fake.in_flight == 0, "the provider to finish", within=30)
    figures.rotations_issued = cluster.fake.rotations
    figures.rotations_stored = await cluster.rotations_stored()
    figures.grants_lost = cluster.lost()
    figures.report()
    assert figures.grants_lost <= window
    assert figures.rotations_issued - figures.rotations_stored <= window
    if not window:
        assert figures.rotations_issued == figures.rotations_stored
        assert sorted(await cluster.in_sync()) == sorted(cluster.grants)


async def kill_9(
    victim: BrokerProcess,
    calls: Sequence[asyncio.Future[Code]],
    fake: FakeAuthServer,
    figures: Figures,
) -> tuple[int, float]:
    """kill -9 with refreshes in flight; returns (requests in flight, when it died). The calls
    to the victim are dropped from the figures: nobody can answer them."""
    window = fake.refresh_calls - fake.rotations
    assert victim.proc is not None
    victim.proc.kill()
    killed = time.monotonic()
    await victim.proc.wait()
    for call in calls:
        call.cancel()
    fake.latency = 0.0
    figures.calls = 0
    figures.errors.clear()
    return window, killed


async def test_sigterm_during_background_refreshes(
    cluster_factory: Any, fake: FakeAuthServer, chaos_backend: str
) -> None:
    cluster = await cluster_factory(chaos_backend, background=True)
    process, stub = await cluster.start()
    ids = await cluster.seed(stub, SIZE)
    figures = cluster.figures(f"SIGTERM during background refreshes ({chaos_backend})")
    await cluster.expire(ids, in_seconds=10)  # inside the margin: the background pass claims
    await wait_until(lambda: fake.refresh_calls >= SIZE // 2, "background refreshes in flight")
    in_flight = fake.refresh_calls - fake.rotations
    began = time.monotonic()
    assert await process.stop(timeout=30) == 0
    figures.notes["in_flight_at_sigterm"] = in_flight
    figures.notes["shutdown_seconds"] = round(time.monotonic() - began, 2)
    assert any("drained" in line for line in process.log), "shutdown says what it drained"
    assert await cluster.leases() == 0, "no lease outlives a graceful shutdown"
    # A new broker serves every integration at once: nothing is left leased or lost.
    _, stub = await cluster.start()
    done = await until_served(stub, ids, figures)
    figures.recovery_seconds = max(done.values()) - began
    assert not figures.errors
    await assert_nothing_lost(cluster, figures)


async def test_sigterm_during_refreshes_run_ahead(
    cluster_factory: Any, fake: FakeAuthServer, chaos_backend: str
) -> None:
    """Callers answered at once with tokens that still satisfy them, their refreshes running
    ahead at the provider when SIGTERM comes: shutdown drains them and every rotation is
    stored."""
    cluster = await cluster_factory(chaos_backend, margin_seconds=300)
    process, stub = await cluster.start()
    ids = await cluster.seed(stub, SIZE, expires_in=200)  # due, far above the floor
    figures = cluster.figures(f"SIGTERM during refreshes run ahead ({chaos_backend})")
    codes = await asyncio.gather(*(call_token(stub, iid, figures) for iid in ids))
    assert set(codes) == {Code.OK}
    await wait_until(lambda: fake.refresh_calls == SIZE, "every refresh ahead sent")
    in_flight = fake.refresh_calls - fake.rotations
    assert in_flight > 0, "the callers were answered before their refreshes ended"
    began = time.monotonic()
    assert await process.stop(timeout=30) == 0
    figures.notes["in_flight_at_sigterm"] = in_flight
    figures.notes["shutdown_seconds"] = round(time.monotonic() - began, 2)
    assert any("drained" in line for line in process.log), "shutdown says what it drained"
    assert await cluster.leases() == 0, "no lease outlives a graceful shutdown"
    assert await cluster.rotations_stored() == SIZE
    _, stub = await cluster.start()
    done = await until_served(stub, ids, figures)
    figures.recovery_seconds = max(done.values()) - began
    assert not figures.errors
    await assert_nothing_lost(cluster, figures)


@pytest.mark.postgres
async def test_sigterm_during_caller_refreshes(cluster_factory: Any, fake: FakeAuthServer) -> None:
    cluster = await cluster_factory("postgres")
    first, stub = await cluster.start()
    _, other = await cluster.start()
    ids = await cluster.seed(stub, SIZE, expires_in=0)
    figures = cluster.figures("SIGTERM during caller refreshes (postgres, 2 replicas)")
    calls = [asyncio.ensure_future(call_token(stub, iid, figures, timeout=10)) for iid in ids * 3]
    await wait_until(lambda: fake.refresh_calls >= SIZE // 2, "caller refreshes in flight")
    figures.notes["in_flight_at_sigterm"] = fake.refresh_calls - fake.rotations
    began = time.monotonic()
    assert first.proc is not None
    first.proc.send_signal(signal.SIGTERM)
    ends: list[tuple[float, Code]] = []
    for call in asyncio.as_completed(calls):
        ends.append((time.monotonic() - began, await call))
    assert await first.stop(timeout=30) == 0
    # gRPC's own server.stop() cancels calls its transport had accepted but not yet handed to
    # the broker: they come back CANCELLED at the instant of SIGTERM, before any work. Every
    # call the broker started ends OK, or UNAVAILABLE with RetryInfo.
    rejected = [code for when, code in ends if code == Code.CANCELLED and when < 0.5]
    started = [code for when, code in ends if not (code == Code.CANCELLED and when < 0.5)]
    assert set(started) <= {Code.OK, Code.UNAVAILABLE}, ends
    figures.notes["cancelled_by_grpc_before_start"] = len(rejected)
    figures.errors.pop("CANCELLED", None)
    done = await until_served(other, ids, figures)
    figures.recovery_seconds = max(done.values()) - began
    assert set(figures.errors) <= {"UNAVAILABLE"}
    await assert_nothing_lost(cluster, figures)


@pytest.mark.postgres
async def test_kill_9_during_refreshes_another_replica_takes_over(
    cluster_factory: Any, fake: FakeAuthServer
) -> None:
    cluster = await cluster_factory("postgres")
    victim, stub = await cluster.start()
    _, survivor = await cluster.start()
    ids = await cluster.seed(stub, SIZE, expires_in=0)
    crashing = ids[:4]
    figures = cluster.figures("kill -9 during refreshes (postgres, 2 replicas)")
    fake.latency = 2.0  # the answers are still on their way when the process dies
    calls = [asyncio.ensure_future(call_token(stub, iid, figures, 30)) for iid in crashing]
    await wait_until(lambda: fake.refresh_calls >= len(crashing), "refreshes sent")
    window, killed = await kill_9(victim, calls, fake, figures)
    # The survivor must not wait out the dead holder's lease: its session is gone.
    done = await until_served(
        survivor, ids, figures, give_up_on=frozenset({Code.FAILED_PRECONDITION})
    )
    takeover = max(done[iid] for iid in crashing) - killed
    figures.recovery_seconds = max(done.values()) - killed
    figures.notes["crash_window_requests"] = window
    figures.notes["takeover_seconds"] = round(takeover, 2)
    assert takeover < 15, "takeover waits for the session to go, not for the lease to lapse"
    assert set(figures.errors) <= {"UNAVAILABLE", "FAILED_PRECONDITION"}
    # Only integrations whose refresh was in flight at the kill may be lost, no other.
    survivors = [iid for iid in ids if iid not in crashing]
    assert set(survivors) <= set(await cluster.in_sync())
    await assert_nothing_lost(cluster, figures, window=window)


async def test_provider_slower_than_the_callers_deadline(
    cluster_factory: Any, fake: FakeAuthServer, chaos_backend: str
) -> None:
    cluster = await cluster_factory(chaos_backend, provider_timeout_seconds=8)
    _, stub = await cluster.start()
    ids = await cluster.seed(stub, 5, expires_in=0)
    figures = cluster.figures(f"provider slower than the caller's deadline ({chaos_backend})")
    fake.latency = 3.0  # callers wait 2 s; the broker's read timeout is 8 s
    began = time.monotonic()
    done = await until_served(stub, ids, figures, timeout=2)
    figures.recovery_seconds = max(done.values()) - began
    assert figures.errors["UNAVAILABLE"] >= 1, "callers were told to come back"
    assert set(figures.errors) == {"UNAVAILABLE"}
    assert fake.refresh_calls == len(ids), "no refresh token was sent twice"
    await assert_nothing_lost(cluster, figures)


@pytest.mark.postgres
async def test_stalled_replica_keeps_its_leases(cluster_factory: Any, fake: FakeAuthServer) -> None:
    cluster = await cluster_factory("postgres")
    frozen, stub = await cluster.start()
    _, other = await cluster.start()
    ids = await cluster.seed(stub, 5, expires_in=0)
    figures = cluster.figures("stalled replica (SIGSTOP past its lease, postgres)")
    # Calls to the frozen replica: patient, they complete once it runs again.
    held = [asyncio.ensure_future(call_token(stub, iid, figures, 60)) for iid in ids]
    await wait_until(lambda: fake.refresh_calls >= len(ids), "refreshes sent")
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        # The provider answers into the frozen replica's sockets, and its leases run out.
        await wait_until(lambda: fake.rotations >= len(ids), "provider answers", within=20)
        async with cluster.engine.begin() as conn:
            await conn.execute(
                update(t)
                .where(t.c.id.in_(ids))
                .values(refresh_lease_until=datetime.now(UTC) - timedelta(seconds=1))
            )
        # The other replica must not steal them (the holder may have sent): it answers
        # UNAVAILABLE with RetryInfo, and never presents the old refresh tokens.
        for _ in range(2):
            asked = time.monotonic()
            codes = await asyncio.gather(*(call_token(other, iid, figures, 5) for iid in ids))
            took = time.monotonic() - asked
            assert set(codes) == {Code.UNAVAILABLE}, f"{codes} after {took:.2f}s"
        assert fake.refresh_calls == len(ids)
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    held_codes = await asyncio.gather(*held)
    assert set(held_codes) == {Code.OK}, "\n".join(frozen.log[-15:])
    done = await until_served(other, ids, figures)
    figures.recovery_seconds = max(done.values()) - resumed
    assert set(figures.errors) == {"UNAVAILABLE"}
    assert fake.refresh_calls == len(ids)
    await assert_nothing_lost(cluster, figures)


async def test_kill_9_on_sqlite_the_restarted_broker_takes_its_leases_back(
    cluster_factory: Any, fake: FakeAuthServer
) -> None:
    cluster = await cluster_factory("sqlite")
    victim, stub = await cluster.start()
    ids = await cluster.seed(stub, 4, expires_in=0)
    figures = cluster.figures("kill -9 during refreshes (sqlite, restart)")
    fake.latency = 2.0
    calls = [asyncio.ensure_future(call_token(stub, iid, figures, 30)) for iid in ids[:2]]
    await wait_until(lambda: fake.refresh_calls >= 2, "refreshes sent")
    window, killed = await kill_9(victim, calls, fake, figures)
    assert await cluster.leases() == 2, "the dead broker left its leases"
    restarted, stub = await cluster.start()
    assert any("took over 2 refresh lease(s)" in line for line in restarted.log)
    done = await until_served(stub, ids, figures, give_up_on=frozenset({Code.FAILED_PRECONDITION}))
    figures.recovery_seconds = max(done.values()) - killed
    figures.notes["crash_window_requests"] = window
    assert set(await cluster.in_sync()) >= set(ids[2:])
    await assert_nothing_lost(cluster, figures, window=window)
