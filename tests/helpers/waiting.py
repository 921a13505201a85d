"""Waiting for a condition to hold: polled, with a deadline that fails the test and names what
never happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    """Await ``check`` every 50 ms until it is true."""
    end = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def holds(value: bool) -> bool:
    """A plain condition as ``eventually`` takes it: ``eventually(lambda: holds(x), ...)``."""
    return value


async def wait_until(check: Callable[[], bool], what: str, within: float = 30) -> None:
    """A plain condition, checked every 10 ms without blocking the event loop (it is usually
    about something that loop's own tasks or another process change)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def block_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """A plain condition, from synchronous code (the loop sleeps in between)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
