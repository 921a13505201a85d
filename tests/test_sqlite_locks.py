"""A SQLite write lock held by another process (the CLI, an operator's sqlite3 shell) is waited
out for ``database.timeout_seconds`` — not a fixed five seconds — and then the call fails with
STORAGE_UNAVAILABLE, changing nothing; once the lock goes, the same call succeeds."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from broker.server.app import start
from tests.helpers.databases import new_database
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub


async def test_a_held_write_lock_is_waited_out_for_the_configured_timeout(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = await new_database("sqlite", tmp_path, request)
    settings = make_settings(url, database={"url": url, "timeout_seconds": 0.5})
    broker = await start(settings)
    holder = sqlite3.connect(tmp_path / "broker.db", isolation_level=None)
    try:
        async with broker_stub(broker.port) as stub:
            holder.execute("BEGIN IMMEDIATE")
            began = time.monotonic()
            await expect_error(
                stub.StoreIntegration(store_request(), metadata=ADMIN),
                grpc.StatusCode.UNAVAILABLE,
                "STORAGE_UNAVAILABLE",
            )
            waited = time.monotonic() - began
            # At least the configured wait, and nowhere near the 5 s a fixed pragma imposed.
            assert 0.4 <= waited < 3.0, waited
            holder.execute("ROLLBACK")
            stored = await stub.StoreIntegration(store_request(), metadata=ADMIN)
            assert stored.integration.id
            # The refused call left nothing behind: only the second store is there.
            count = holder.execute("SELECT count(*) FROM integrations").fetchone()[0]
            assert count == 1
    finally:
        holder.close()
        await broker.stop(0)
