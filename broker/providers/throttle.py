"""How hard this broker may press one provider's token endpoint.

Per provider, for the refreshes (and mints) of every integration of that provider together:

- at most ``max_concurrent`` requests at once (an ``asyncio.Semaphore``): a storm of expired
  tokens becomes a steady queue instead of hundreds of simultaneous requests (and connections);
- at most ``per_second`` requests started per second, when set (``aiolimiter``'s leaky bucket);
- none at all while the provider has asked us to wait: a 429 or 503 with ``Retry-After`` for one
  integration pauses every integration of that provider until then, so the broker does not keep
  knocking with the others' refresh tokens.

A slot is only waited for, never held, outside the provider request: no database connection is
held while waiting or calling. A wait that would outlast the refresh's budget is refused at once
(``Throttled``): nothing was sent, so nothing is lost and the caller gets UNAVAILABLE with
RetryInfo as for any provider outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from broker.errors import Throttled

# A Retry-After longer than this is taken as this: a provider's (or a proxy's) mistake must not
# stop a provider's refreshes for a day. The integration that got it backs off on its own.
MAX_PAUSE_SECONDS = 600.0


@dataclass
class _Lane:
    slots: asyncio.Semaphore
    rate: AsyncLimiter | None
    limit: int
    paused_until: float = 0.0  # loop time
    in_flight: int = 0


class ProviderThrottle:
    """One lane per provider name, made on first use with that provider's limits."""

    def __init__(self, max_concurrent: int, per_second: float | None = None) -> None:
        self.max_concurrent = max_concurrent
        self.per_second = per_second or None
        self._lanes: dict[str, _Lane] = {}

    def _lane(self, provider: str, max_concurrent: int | None, per_second: float | None) -> _Lane:
        lane = self._lanes.get(provider)
        if lane is None:
            limit = max_concurrent or self.max_concurrent
            rate = per_second or self.per_second
            lane = _Lane(
                slots=asyncio.Semaphore(limit),
                # The bucket holds one second's worth: a burst of `rate` after a quiet spell,
                # then `rate` a second.
                rate=None if rate is None else AsyncLimiter(rate, 1.0),
                limit=limit,
            )
            self._lanes[provider] = lane
        return lane

    def pause(self, provider: str, seconds: float) -> None:
        """The provider asked us (Retry-After) to send nothing for ``seconds``."""
        lane = self._lanes.get(provider)
        if lane is None or seconds <= 0:
            return
        until = asyncio.get_running_loop().time() + min(seconds, MAX_PAUSE_SECONDS)
        lane.paused_until = max(lane.paused_until, until)

    def paused_for(self, provider: str) -> float:
        """Seconds left of the provider's pause (0: not paused)."""
        lane = self._lanes.get(provider)
        if lane is None:
            return 0.0
        return max(0.0, lane.paused_until - asyncio.get_running_loop().time())

    def in_flight(self, provider: str) -> int:
        lane = self._lanes.get(provider)
        return 0 if lane is None else lane.in_flight

    @contextlib.asynccontextmanager
    async def turn(
        self,
        provider: str,
        until: float,
        *,
        max_concurrent: int | None = None,
        per_second: float | None = None,
    ) -> AsyncIterator[None]:
        """Wait for this provider's turn (no later than loop time ``until``), then hold one of
        its slots for the request sent inside the block."""
        lane = self._lane(provider, max_concurrent, per_second)
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wait_out_pause(lane, provider, until)
                try:
                    async with asyncio.timeout_at(until):
                        await lane.slots.acquire()
                except TimeoutError:
                    raise self._refused(provider, lane, loop.time()) from None
                try:
                    # A pause may have begun while we queued: wait it out without a slot.
                    if lane.paused_until > loop.time():
                        lane.slots.release()
                        continue
                    if lane.rate is not None:
                        async with asyncio.timeout_at(until):
                            await lane.rate.acquire()
                except BaseException:
                    lane.slots.release()
                    raise
                break
        except TimeoutError:
            raise self._refused(provider, lane, loop.time()) from None
        lane.in_flight += 1
        try:
            yield
        finally:
            lane.in_flight -= 1
            lane.slots.release()

    async def _wait_out_pause(self, lane: _Lane, provider: str, until: float) -> None:
        loop = asyncio.get_running_loop()
        while (left := lane.paused_until - loop.time()) > 0:
            if loop.time() + left > until:
                raise self._refused(provider, lane, loop.time())
            await asyncio.sleep(left)

    def _refused(self, provider: str, lane: _Lane, now: float) -> Throttled:
        paused = lane.paused_until - now
        if paused > 0:
            return Throttled(
                f"provider {provider!r} asked the broker to wait (Retry-After); the refresh "
                "was not sent",
                retry_after=max(1.0, paused),
                provider=provider,
            )
        return Throttled(
            f"provider {provider!r} already has {lane.limit} refresh(es) in flight from this "
            "broker and this one's turn would not come in time; it was not sent",
            retry_after=1.0,
            provider=provider,
        )
