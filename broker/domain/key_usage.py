"""The AES-GCM nonce budget: encryptions per key, summed over every broker that ever used it.

Nonces are random 96-bit values, so NIST SP 800-38D allows at most 2^32 encryptions under one
key before the chance of a repeated nonce (which breaks GCM) becomes unacceptable. Each keyring
counts in memory; ``flush_key_usage`` adds those counts to ``key_usage`` (an atomic upsert, so
replicas flushing at once add up) and warns while there is still ample time to rotate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.crypto import Keyring
from broker.crypto.aead import NONCE_LIMIT
from broker.errors import StorageUnavailable
from broker.storage.engine import storage_errors
from broker.storage.tables import key_usage

log = logging.getLogger("broker.keys")


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def _add(conn: AsyncConnection, counts: dict[str, int], now: datetime) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    for kid, n in sorted(counts.items()):
        stmt = dialect.insert(key_usage).values(key_id=kid, encryptions=n, updated_at=now)
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[key_usage.c.key_id],
                set_={"encryptions": key_usage.c.encryptions + n, "updated_at": now},
            )
        )


async def read_key_usage(engine: AsyncEngine) -> dict[str, int]:
    """Recorded encryptions per key id."""
    async with storage_errors(), engine.connect() as conn:
        rows = (await conn.execute(select(key_usage.c.key_id, key_usage.c.encryptions))).all()
    return {str(kid): int(n) for kid, n in rows}


def budget_warning(kid: str, encryptions: int) -> str:
    share = encryptions / NONCE_LIMIT
    return (
        f"key {kid!r} has done {encryptions} encryptions, {share:.1%} of the 2^32 that "
        "AES-GCM allows one key with random nonces; add a new primary key and re-encrypt "
        "(docs/key-rotation.md)"
    )


async def flush_key_usage(
    engine: AsyncEngine,
    keyring: Keyring,
    *,
    warn_fraction: float = 0.25,
    clock: Callable[[], datetime] = _utcnow,
) -> dict[str, int]:
    """Add this process's counts to ``key_usage``; returns the totals, and logs a WARNING when
    the primary key has passed ``warn_fraction`` of its budget. Counts that could not be stored
    go back into the keyring for the next flush."""
    counts = keyring.take_usage()
    try:
        async with storage_errors(), engine.begin() as conn:
            if counts:
                await _add(conn, counts, clock())
            rows = (await conn.execute(select(key_usage.c.key_id, key_usage.c.encryptions))).all()
    except BaseException:
        keyring.restore_usage(counts)
        raise
    totals = {str(kid): int(n) for kid, n in rows}
    # Only the primary still encrypts; an old key past the line is merely waiting to retire.
    used = totals.get(keyring.primary_id, 0)
    if used >= warn_fraction * NONCE_LIMIT:
        log.warning(budget_warning(keyring.primary_id, used))
    return totals


async def flush_periodically(
    engine: AsyncEngine, keyring: Keyring, interval_seconds: float, warn_fraction: float
) -> None:
    """Server task: flush every ``interval_seconds`` until cancelled (then flush once more)."""
    try:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await flush_key_usage(engine, keyring, warn_fraction=warn_fraction)
            except StorageUnavailable:
                log.debug("key usage not flushed: database unavailable; kept for next time")
    finally:
        try:
            await asyncio.shield(flush_key_usage(engine, keyring, warn_fraction=warn_fraction))
        except Exception:  # shutting down: the counts of a few seconds are not worth a traceback
            log.warning("key usage not flushed at shutdown: %d key(s)", len(keyring.usage()))
