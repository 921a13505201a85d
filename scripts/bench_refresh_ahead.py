"""The soak of issue 26 in small: do callers wait for refreshes they did not need?

A real ``python -m broker serve`` on PostgreSQL (the bench's seeding and broker start-up),
ROWS integrations holding grants of a fake provider that answers in LATENCY seconds, DUE of them
inside the refresh margin from the start (200 s left: under the 300 s margin, above the 30 s
floor); an open loop of RATE calls/s for SECONDS spread over every integration. Prints the calls
answered ``refreshed``, those slower than half the provider's latency, the provider calls, and
p99 per 5 s window (after a warm-up with the integrations that are not due, the due ones are
first asked for in the first window).

    python scripts/bench_refresh_ahead.py [--rows 200] [--due 40] [--rate 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker_devtools.bench import data
from broker_devtools.bench.scenarios import _SECRET_ENV, Bench, Options
from broker_devtools.fakeauth import FakeAuthServer

Call = tuple[float, float, bool]  # started (s into the run), latency (s), refreshed


async def _load(
    address: str, bearer: str, salt: str, rows: int, due: int, rate: float, seconds: float
) -> list[Call]:
    calls: list[Call] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        metadata = (("authorization", f"Bearer {bearer}"),)
        # Warm-up, not measured: the connection, the pools and the cache, with every
        # integration that is not due (asking for a due one would start its refresh).
        for n in range(due, rows):
            request = pb.GetAccessTokenRequest(integration_id=data.integration_id(salt, n))
            await stub.GetAccessToken(request, metadata=metadata)
        start = time.monotonic()

        async def one(n: int) -> None:
            request = pb.GetAccessTokenRequest(integration_id=data.integration_id(salt, n % rows))
            began = time.monotonic()
            answer = await stub.GetAccessToken(request, metadata=metadata)
            calls.append((began - start, time.monotonic() - began, answer.refreshed))

        tasks: list[asyncio.Future[None]] = []
        n = 0
        while (now := time.monotonic() - start) < seconds:
            while n < now * rate:
                tasks.append(asyncio.ensure_future(one(n * 7)))  # 7: every row, spread
                n += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return calls


async def _make_due(dsn: str, ids: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        left = datetime.now(UTC) + timedelta(seconds=200)
        await conn.execute("UPDATE integrations SET expires_at = $1 WHERE id = ANY($2)", left, ids)
    finally:
        await conn.close()


def _p99_ms(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000 if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--due", type=int, default=40)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--latency", type=float, default=0.5)
    args = parser.parse_args()
    with (
        FakeAuthServer(latency=args.latency, expires_in=3600) as fake,
        Bench(Options()) as bench,
    ):
        grants = tuple(fake.issue_grant(scopes=data.SCOPES) for _ in range(args.rows))
        later = datetime.now(UTC) + timedelta(days=1)
        ds = bench.dataset(
            "soak", args.rows, tokens=grants, expires_at=later, token_url=fake.token_url
        )
        assert ds.dsn is not None
        due = [data.integration_id(ds.salt, i) for i in range(args.due)]
        asyncio.run(_make_due(ds.dsn, due))
        server = bench.start_broker(
            ds, {"BROKER_REFRESH__BACKGROUND": "false", _SECRET_ENV: fake.client_secret}
        )
        try:
            calls = asyncio.run(
                _load(
                    server.address,
                    bench.bearer,
                    ds.salt,
                    args.rows,
                    args.due,
                    args.rate,
                    args.seconds,
                )
            )
        finally:
            bench.stop_broker(server)
    windows: dict[int, list[float]] = {}
    for began, latency, _ in calls:
        windows.setdefault(int(began // 5), []).append(latency)
    slow = sum(1 for _, latency, _ in calls if latency > args.latency / 2)
    print(
        f"calls {len(calls)}, refreshed {sum(1 for c in calls if c[2])}, "
        f"over {args.latency / 2 * 1000:g} ms {slow}, provider calls {fake.refresh_calls}, "
        f"p99 {_p99_ms([c[1] for c in calls]):.1f} ms; "
        + ", ".join(
            f"{w * 5}-{w * 5 + 5} s p99 {_p99_ms(v):.1f} ms" for w, v in sorted(windows.items())
        )
    )


if __name__ == "__main__":
    main()
