"""The load generator: separate client processes, each a grpc.aio client with a fixed number of
GetAccessToken calls in flight.

Separate processes (spawn context, so no state is inherited from the orchestrator) because one
Python process cannot saturate a gRPC server by itself; every scenario goes through this same
client, so the client's own cost is the same in the floor and in the broker figures.

Two plans:

- ``Timed``: a warm-up, then a measured window of fixed duration. Every worker picks a random
  integration index per call. A call counts (and its latency is kept) when it *completes*
  inside the window; calls still in flight at the end are awaited and discarded. With
  ``rate`` the loop is open: calls start on a fixed schedule whatever the answers, which is
  how a quiet broker's latency is measured (a closed loop always runs it at full load).
- ``Sweep``: every index of a range is requested ``repeat`` times (repeats adjacent, so
  duplicates are in flight together), then the process ends; all calls count. Used for
  pre-warming, filling the cache, and the refresh storm.

The processes agree on time through CLOCK_MONOTONIC, which is system-wide on Linux: the
orchestrator hands out an absolute start instant once every client is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import grpc

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker_devtools.bench import data

if TYPE_CHECKING:  # the async stub type exists in the stubs only
    from broker.api.credentialbroker.v1.broker_pb2_grpc import CredentialBrokerAsyncStub

_START_DELAY = 0.3  # seconds between "all connected" and the first call
_CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    address: str
    bearer: str | None = None
    salt: str = "echo"
    # Grant tokens by integration index (x-broker-grant), for a runner that requires one.
    grants: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timed:
    duration: float
    warmup: float
    first: int  # integration indexes first .. first+count-1
    count: int
    rate: float | None = None  # calls/s per client process (open loop); None: closed loop


@dataclass(frozen=True)
class Sweep:
    first: int
    count: int
    repeat: int = 1
    # Stop issuing calls after this long (a cache fill on a slow machine must not eat the
    # whole time budget); None: go through the whole range.
    max_seconds: float | None = None


Plan = Timed | Sweep


@dataclass
class LoadResult:
    calls: int  # successful calls counted
    seconds: float  # measured window (Timed) or wall time of the sweep
    latencies: list[float]  # sorted, seconds, successful calls only
    errors: dict[str, int] = field(default_factory=dict)
    response_bytes: int = 0
    clients: int = 0
    in_flight: int = 0

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (q in 0..1) in seconds; None without samples."""
        if not self.latencies:
            return None
        rank = max(1, math.ceil(q * len(self.latencies)))
        return self.latencies[rank - 1]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# -- client process -----------------------------------------------------------------------------


class _Tally:
    def __init__(self) -> None:
        self.latencies = array("d")
        self.errors: Counter[str] = Counter()
        self.response_bytes = 0


async def _call(
    stub: CredentialBrokerAsyncStub,
    target: Target,
    metadata: tuple[tuple[str, str], ...],
    index: int,
) -> tuple[float, str | None, int]:
    request = pb.GetAccessTokenRequest(integration_id=data.integration_id(target.salt, index))
    if target.grants:
        metadata = (*metadata, ("x-broker-grant", target.grants[index % len(target.grants)]))
    began = time.perf_counter()
    try:
        response = await stub.GetAccessToken(request, metadata=metadata, timeout=_CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return time.perf_counter() - began, exc.code().name, 0
    return time.perf_counter() - began, None, response.ByteSize()


async def _timed(
    stub: CredentialBrokerAsyncStub,
    target: Target,
    metadata: tuple[tuple[str, str], ...],
    plan: Timed,
    in_flight: int,
    seed: int,
    start_at: float,
) -> _Tally:
    tally = _Tally()
    window_from = start_at + plan.warmup
    window_to = window_from + plan.duration

    async def worker(rng: random.Random) -> None:
        while time.monotonic() < window_to:
            await one(plan.first + rng.randrange(plan.count))

    async def scheduled(rng: random.Random, rate: float) -> None:
        calls: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        due = start_at
        while due < window_to:
            await _sleep_until(due)
            call = asyncio.create_task(one(plan.first + rng.randrange(plan.count)))
            calls.add(call)
            call.add_done_callback(calls.discard)
            due += interval
        await asyncio.gather(*calls)

    async def one(index: int) -> None:
        latency, error, size = await _call(stub, target, metadata, index)
        if window_from <= time.monotonic() <= window_to:
            if error is None:
                tally.latencies.append(latency)
                tally.response_bytes = size
            else:
                tally.errors[error] += 1

    await _sleep_until(start_at)
    if plan.rate is not None:
        await scheduled(random.Random(seed), plan.rate)
        return tally
    await asyncio.gather(*(worker(random.Random(seed * 1_000 + i)) for i in range(in_flight)))
    return tally


async def _sweep(
    stub: CredentialBrokerAsyncStub,
    target: Target,
    metadata: tuple[tuple[str, str], ...],
    plan: Sweep,
    in_flight: int,
    start_at: float,
) -> _Tally:
    tally = _Tally()
    # Repeats of one index are adjacent, so they are in flight at the same time.
    work = iter([i for i in range(plan.first, plan.first + plan.count) for _ in range(plan.repeat)])

    stop_at = math.inf if plan.max_seconds is None else start_at + plan.max_seconds

    async def worker() -> None:
        for index in work:
            if time.monotonic() >= stop_at:
                return
            latency, error, size = await _call(stub, target, metadata, index)
            if error is None:
                tally.latencies.append(latency)
                tally.response_bytes = size
            else:
                tally.errors[error] += 1

    await _sleep_until(start_at)
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return tally


async def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _client(conn: Connection, target: Target, plan: Plan, in_flight: int, seed: int) -> None:
    metadata = (("authorization", f"Bearer {target.bearer}"),) if target.bearer else ()
    async with grpc.aio.insecure_channel(target.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub: CredentialBrokerAsyncStub = pb_grpc.CredentialBrokerStub(channel)
        conn.send("ready")
        start_at = float(conn.recv())
        if isinstance(plan, Timed):
            tally = await _timed(stub, target, metadata, plan, in_flight, seed, start_at)
        else:
            tally = await _sweep(stub, target, metadata, plan, in_flight, start_at)
        finished = time.monotonic()
    conn.send(
        {
            "latencies": tally.latencies.tobytes(),
            "errors": dict(tally.errors),
            "response_bytes": tally.response_bytes,
            "finished": finished,
        }
    )


def client_main(conn: Connection, target: Target, plan: Plan, in_flight: int, seed: int) -> None:
    """Process entry point (spawned)."""
    try:
        import uvloop

        uvloop.install()  # the cheapest client loop leaves the most CPU to the server
    except ImportError:
        pass
    try:
        asyncio.run(_client(conn, target, plan, in_flight, seed))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send({"failed": f"{type(exc).__name__}: {exc}"})
        raise


# -- orchestration ------------------------------------------------------------------------------


def run(target: Target, plan: Plan, clients: int, in_flight: int, timeout: float) -> LoadResult:
    """Run ``clients`` processes with ``in_flight`` calls each; merge their measurements.

    A Sweep's range is split into contiguous slices, one per process."""
    ctx = multiprocessing.get_context("spawn")
    plans = _split(plan, clients)
    procs: list[Any] = []
    pipes: list[Connection] = []
    try:
        for number, part in enumerate(plans):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=client_main,
                args=(theirs, target, part, in_flight, number + 1),
                name=f"bench-client-{number}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(ours)
        for pipe, proc in zip(pipes, procs, strict=True):
            message = _receive(pipe, proc, 60)
            if message != "ready":
                raise RuntimeError(f"load client failed to start: {message}")
        start_at = time.monotonic() + _START_DELAY
        for pipe in pipes:
            pipe.send(start_at)
        results = [_receive(pipe, proc, timeout) for pipe, proc in zip(pipes, procs, strict=True)]
        for proc in procs:
            proc.join(10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in pipes:
            pipe.close()
    return _merge(results, plan, start_at, len(plans), in_flight)


def _split(plan: Plan, clients: int) -> list[Plan]:
    if isinstance(plan, Timed):
        return [plan] * clients
    clients = max(1, min(clients, plan.count))
    size, extra = divmod(plan.count, clients)
    parts: list[Plan] = []
    first = plan.first
    for number in range(clients):
        count = size + (1 if number < extra else 0)
        parts.append(Sweep(first, count, plan.repeat, plan.max_seconds))
        first += count
    return parts


def _receive(pipe: Connection, proc: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"load client {proc.name} exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"load client {proc.name} did not answer within {timeout:g}s")
    message = pipe.recv()
    if isinstance(message, dict) and "failed" in message:
        raise RuntimeError(f"load client {proc.name} failed: {message['failed']}")
    return message


def _merge(
    results: list[dict[str, Any]], plan: Plan, start_at: float, clients: int, in_flight: int
) -> LoadResult:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    size = 0
    for result in results:
        samples = array("d")
        samples.frombytes(result["latencies"])
        latencies.extend(samples)
        errors.update(result["errors"])
        size = size or int(result["response_bytes"])
    latencies.sort()
    if isinstance(plan, Timed):
        seconds = plan.duration
    else:
        seconds = max(float(r["finished"]) for r in results) - start_at
    return LoadResult(
        calls=len(latencies),
        seconds=seconds,
        latencies=latencies,
        errors=dict(errors),
        response_bytes=size,
        clients=clients,
        in_flight=in_flight,
    )
