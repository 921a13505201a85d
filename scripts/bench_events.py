"""What an event costs on the refresh-failure path: the transaction that records a failed
refresh (lease released, failure counted), with and without its integration event, run
sequentially on a fresh database. Prints per-transaction p50/p99 and the difference.

    .venv/bin/python scripts/bench_events.py --database-url sqlite+aiosqlite:///./.bench/ev.db
    .venv/bin/python scripts/bench_events.py --database-url postgresql+asyncpg://postgres@127.0.0.1/x

The database must be empty or migrated; rows are added, never dropped. On a shared machine the
numbers move by tens of percent between runs: compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import update

from broker.config import DatabaseSettings
from broker.domain import events
from broker.model import Integration, Status
from broker.storage import repository
from broker.storage.engine import create_engine, write_transaction
from broker.storage.schema import migrate
from broker.storage.tables import integrations


def integration(iid: str) -> Integration:
    now = datetime.now(UTC)
    return Integration(
        id=iid,
        user_id=f"bench-{iid}",
        provider="acme",
        account_id="",
        status=Status.CONNECTED,
        token_type="Bearer",
        scopes=(),
        metadata={},
        created_at=now,
        updated_at=now,
        expires_at=None,
        last_refreshed_at=None,
        disconnected_at=None,
        disconnect_reason=None,
        has_refresh_token=True,
        version=1,
    )


async def run(url: str, count: int) -> None:
    engine = create_engine(DatabaseSettings(url=url))
    await migrate(engine, "bench")
    iid = str(uuid.uuid4())
    target = integration(iid)
    async with engine.begin() as conn:
        now = datetime.now(UTC)
        await repository.insert_row(
            conn,
            {
                "id": iid,
                "user_id": target.user_id,
                "provider": "acme",
                "account_id": "",
                "status": "CONNECTED",
                "scopes": [],
                "metadata": {},
                "created_at": now,
                "updated_at": now,
                "version": 1,
            },
        )

    async def one(with_event: bool, n: int) -> float:
        started = time.perf_counter()
        async with write_transaction(engine) as conn:
            # What RefreshEngine._release writes after a transient failure.
            await conn.execute(
                update(integrations)
                .where(integrations.c.id == iid)
                .values(refresh_failures=n, refresh_lease_owner=None, refresh_lease_until=None)
            )
            if with_event:
                # The threshold equals the count: the event is written every time.
                await events.refresh_failed(conn, target, datetime.now(UTC), n, n)
        return time.perf_counter() - started

    results: dict[bool, list[float]] = {False: [], True: []}
    for n in range(1, count + 1):
        for with_event in (False, True):  # interleaved, so drift hits both alike
            results[with_event].append(await one(with_event, n))
    await engine.dispose()
    rows = []
    for with_event, times in results.items():
        times.sort()
        p50 = statistics.median(times) * 1000
        p99 = times[int(len(times) * 0.99) - 1] * 1000
        rows.append((with_event, p50, p99))
        label = "with event   " if with_event else "without event"
        print(f"{label}  p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({len(times)} transactions)")
    print(f"event cost   p50 +{rows[1][1] - rows[0][1]:.3f} ms per failure transaction")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--database-url", required=True)
    p.add_argument("--count", type=int, default=1000)
    args = p.parse_args()
    asyncio.run(run(args.database_url, args.count))


if __name__ == "__main__":
    main()
