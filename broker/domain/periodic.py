"""Background passes (refresh, revocation retries, flow purge) share one loop shape: run the
pass, log what it did, survive a database outage or a bug, wait, repeat until cancelled — or,
for passes that call providers, until ``stop`` is set: then the pass under way finishes (its
provider calls are never cut off after sending) and no new one starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from broker.errors import StorageUnavailable

log = logging.getLogger("broker.background")


async def every(
    seconds: float,
    step: Callable[[], Awaitable[int]],
    what: str,
    done: str = "%d done",
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Run ``step`` every ``seconds`` until cancelled or ``stop`` is set; ``done`` formats a
    non-zero result."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            count = await step()
            if count:
                log.info("%s: " + done, what, count)
        except StorageUnavailable:
            log.warning("%s: database unavailable", what)
        except Exception:
            log.exception("%s failed", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
