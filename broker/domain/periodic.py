"""Background passes (refresh, revocation retries, flow purge) share one loop shape: run the
pass, log what it did, survive a database outage or a bug, wait, repeat until cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from broker.errors import StorageUnavailable

log = logging.getLogger("broker.background")


async def every(
    seconds: float, step: Callable[[], Awaitable[int]], what: str, done: str = "%d done"
) -> None:
    """Run ``step`` every ``seconds`` until cancelled; ``done`` formats a non-zero result."""
    while True:
        try:
            count = await step()
            if count:
                log.info("%s: " + done, what, count)
        except StorageUnavailable:
            log.warning("%s: database unavailable", what)
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(seconds)
