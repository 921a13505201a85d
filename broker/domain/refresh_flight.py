"""One refresh per integration at a time, on one broker and across replicas: the flight.

Order of events for a token that is due:

1. quick unlocked read (done by the service before it calls us);
2. in-process single flight: one task per integration, other callers await its result;
3. a *lease* on the row — one short ``UPDATE … RETURNING`` that succeeds only when nobody holds a
   live lease and the row is still the version we read, and returns the row (the re-read is
   the same statement). It works the same on SQLite and PostgreSQL, holds no database
   connection while the provider is called, and outlives the provider timeout times the
   attempts, so a holder always hears back from the provider before its lease can lapse.
   On PostgreSQL the lease also names the holder's session (broker.storage.liveness): a dead
   holder's lease is free at once, a live holder's is never taken away. Only when it fails is
   the row read, to tell a moved version from another holder;
4. only if the leased row is still stale (no cool-down begun meanwhile: the policy,
   broker.domain.refresh_policy) do we call the provider (broker.domain.refresh_call);
   otherwise the lease is rolled back;
5. write new tokens with ``version + 1`` (compare-and-swap), release the lease and return the new
   row in the same statement (broker.domain.refresh_store).

The flight runs in its own task, shielded from callers: a caller whose deadline passes gets
UNAVAILABLE with RetryInfo while the call goes on and its tokens are stored.

**Refresh ahead.** A caller waits on a flight only when the token it has cannot satisfy it: a
token that is due (inside the margin) but still has the caller's ``min_valid_for`` and at least
``refresh.ahead_floor_seconds`` left is served at once (``refreshed = false``) and its refresh
runs in the background, as the same flight (one per integration; callers that arrive
meanwhile and cannot be satisfied join it) under the same lease and back-off. What it meets
(a failure, a back-off) is recorded on the row as always and never reaches that caller. At
most the provider's concurrency limit of such flights run at once per provider; beyond it
the token is served and the refresh left to a later caller or the background pass. Shutdown
starts none and drains those running like every flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from broker import metrics
from broker.domain.refresh_call import ProviderCall
from broker.domain.refresh_policy import (
    Answer,
    RefreshPolicy,
    caller_wait,
    flight_budget,
)
from broker.domain.refresh_store import TokenStore
from broker.domain.tokens import TokenCipher
from broker.errors import BrokerError, ProviderUnavailable, UnknownProvider
from broker.model import AccessToken, StoredIntegration, TokenRequest
from broker.storage import repository

log = logging.getLogger("broker.refresh")

_Flight = asyncio.Task[Answer]


class _Decided(Exception):
    """Not an error: raised inside the lease transaction to roll the lease back (it was never
    taken) and answer with ``result``."""

    def __init__(self, result: Answer) -> None:
        super().__init__()
        self.result = result


class Flights:
    """The refreshes in flight on this broker, one per integration, and the callers waiting
    on them."""

    def __init__(
        self, cipher: TokenCipher, policy: RefreshPolicy, call: ProviderCall, store: TokenStore
    ) -> None:
        self.cipher = cipher
        self.policy = policy
        self.call = call
        self.store = store
        self.holder = store.holder
        self._flights: dict[str, _Flight] = {}
        # Callers waiting on a flight, and the loop time by which shutdown needs them answered.
        self._waiting: set[asyncio.Timeout] = set()
        self._answer_by: float | None = None
        # Flights started ahead (no caller waiting when they began), by integration: their
        # provider, so each provider's count stays within its concurrency limit.
        self._ahead: dict[str, str] = {}
        # Callers that waited on a flight, and callers served at once while a refresh was due
        # (informational, like ProviderCall.provider_calls).
        self.waited = 0
        self.served_ahead = 0

    # -- callers -------------------------------------------------------------------------------

    async def refresh(self, stored: StoredIntegration, request: TokenRequest) -> AccessToken:
        """Refresh (sharing one flight per integration) and return a token for the caller:
        the stored one at once when it still satisfies the caller (the refresh then runs
        ahead, in the background), otherwise the flight's."""
        if self.policy.serves_ahead(stored, request) and stored.integration.id not in self.store:
            self._refresh_ahead(stored, request)
            self.served_ahead += 1
            metrics.REFRESH_CALLERS.labels(stored.integration.provider, "ahead").inc()
            return self.cipher.access_token(stored)
        self.policy.check_attainable(stored, request)
        self.waited += 1
        metrics.REFRESH_CALLERS.labels(stored.integration.provider, "waited").inc()
        patience = asyncio.timeout(None)
        self._waiting.add(patience)
        try:
            async with patience:
                self._bound(patience, caller_wait(request))
                fresh, refreshed = await self._join(stored, request)
        except TimeoutError:
            if not patience.expired():
                raise
            # The caller's deadline is about to pass; the refresh goes on in its own task and
            # its tokens are stored. Answer while the caller can still hear it.
            if self.policy.still_satisfies(stored, request):
                return self.cipher.access_token(stored)
            raise ProviderUnavailable(
                f"the refresh of integration {stored.integration.id} is still waiting for the "
                "provider; it goes on and will be stored, retry shortly",
                retry_after=1.0,
                integration_id=stored.integration.id,
            ) from None
        except ProviderUnavailable:
            # The provider is down; the token we have may still do for this caller.
            if self.policy.still_satisfies(stored, request):
                return self.cipher.access_token(stored)
            raise
        finally:
            self._waiting.discard(patience)
        self.policy.check_fresh(fresh, request, refreshed)
        return self.cipher.access_token(fresh, refreshed=refreshed)

    def _bound(self, patience: asyncio.Timeout, seconds: float | None) -> None:
        """How long a caller waits on a flight: its deadline, and during shutdown no longer
        than the server's grace period (the flight itself goes on and is stored)."""
        loop = asyncio.get_running_loop()
        ends = [] if seconds is None else [loop.time() + seconds]
        if self._answer_by is not None:
            ends.append(self._answer_by)
        current = patience.when()
        if current is not None:
            ends.append(current)
        if ends:
            patience.reschedule(min(ends))

    def answer_callers_by(self, when: float) -> None:
        """Shutdown: callers still waiting on a provider get UNAVAILABLE (with RetryInfo) by
        loop time ``when`` instead of being cancelled with the server."""
        self._answer_by = when
        for patience in list(self._waiting):
            self._bound(patience, None)

    async def _join(self, stored: StoredIntegration, request: TokenRequest) -> Answer:
        iid = stored.integration.id
        task = self._flights.get(iid)
        if task is None:
            task = self._start(iid, self._run(stored, request))
        # shield: a caller that gives up must not cancel the refresh the others are waiting on,
        # nor the write of tokens the provider has already rotated.
        return await asyncio.shield(task)

    # -- refresh ahead -------------------------------------------------------------------------

    def _refresh_ahead(self, stored: StoredIntegration, request: TokenRequest) -> None:
        """Start the refresh of a token that is due but still served, unless one is running,
        the integration backs off, the broker is shutting down or its provider already has as
        many of these as it takes at once."""
        iid = stored.integration.id
        if iid in self._flights or self.call.draining:
            return
        provider = stored.integration.provider
        if self.call.throttle.paused_for(provider) > 0:
            return  # a Retry-After of the provider's: nothing would be sent before it ends
        if sum(1 for p in self._ahead.values() if p == provider) >= self._ahead_limit(provider):
            return
        # No deadline: the flight's own budget; the caller's min_valid_for, so it stops at once
        # when another replica has refreshed meanwhile.
        ahead = replace(request, force_refresh=False, deadline_seconds=None)
        try:
            # Pure, no statement: a back-off (or anything else that answers without a refresh)
            # starts no task at all.
            if self.policy.decide(iid, stored, ahead, stored.integration.version,
                                  self.policy.clock()) is not None:  # fmt: skip
                return
        except BrokerError:
            return
        self._ahead[iid] = provider
        task = self._start(iid, self._run(stored, ahead))
        task.add_done_callback(lambda done: self._ahead_done(iid, done))

    def _ahead_limit(self, provider: str) -> int:
        limit = self.policy.settings.max_concurrent_per_provider
        with contextlib.suppress(UnknownProvider):
            override = self.policy.registry.get(provider).max_concurrent_refreshes
            if override is not None:
                limit = override
        return limit

    def _ahead_done(self, iid: str, task: _Flight) -> None:
        self._ahead.pop(iid, None)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, BrokerError):
            # Recorded on the row (back-off, events) and logged where it happened.
            log.debug("refresh ahead of integration %s did not succeed: %s", iid, exc.reason)
        elif exc is not None:
            log.error("refresh ahead of integration %s failed", iid, exc_info=exc)

    # -- the flight ----------------------------------------------------------------------------

    def _start(self, iid: str, flight: Coroutine[Any, Any, Answer]) -> _Flight:
        task = asyncio.create_task(flight, name=f"refresh-{iid}")
        self._flights[iid] = task
        task.add_done_callback(lambda done: self._forget(iid, done))
        return task

    def _forget(self, iid: str, task: _Flight) -> None:
        if self._flights.get(iid) is task:
            del self._flights[iid]
        if not task.cancelled():
            task.exception()  # mark retrieved; every waiter got it already

    def _budget_end(self, request: TokenRequest) -> float:
        return asyncio.get_running_loop().time() + flight_budget(request, self.holder.lease)

    async def _run(self, stored: StoredIntegration, request: TokenRequest) -> Answer:
        iid = stored.integration.id
        if iid in self.store:
            return await self.store.retry_unsaved(iid), True
        loop = asyncio.get_running_loop()
        end = self._budget_end(request)
        seen = stored.integration.version
        # The caller's read decides first (a cool-down refuses without a statement); then the
        # lease is tried at the version it read, and the leasing UPDATE returns the row.
        decided = self.policy.decide(iid, stored, request, seen, self.policy.clock())
        if decided is not None:
            return decided
        holder = self.holder
        version = seen
        delay = 0.02
        while True:
            now = self.policy.clock()
            leased = None
            try:
                async with holder.transaction(writes_first=True) as conn:
                    leased = await repository.take_lease(
                        conn, iid, version, holder.owner, now, now + holder.lease, holder.session()
                    )
                    if leased is None:
                        row = await repository.get(conn, iid)
                    else:
                        # The row as leased may say otherwise (a cool-down begun since the
                        # caller's read): then the lease is rolled back, never taken.
                        decided = self.policy.decide(iid, leased, request, seen, now)
                        if decided is not None:
                            raise _Decided(decided)
            except _Decided as answer:
                return answer.result
            if leased is not None:
                return await self.call.refresh_leased(leased, end), True
            # The version moved, or someone else (another replica) holds the lease.
            decided = self.policy.decide(iid, row, request, seen, now)
            if decided is not None:
                return decided
            assert row is not None
            moved = row.integration.version != seen
            if row.integration.version != version:
                version = row.integration.version  # moved and still due: lease that version
                continue
            if loop.time() + delay > end:
                raise ProviderUnavailable(
                    f"integration {iid} is being refreshed by another broker; retry shortly",
                    retry_after=1.0,
                    integration_id=iid,
                )
            # Wait for the holder's write.
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            if moved:
                seen = row.integration.version

    # -- leases taken by the background pass ---------------------------------------------------

    async def settle_running(self, iid: str) -> bool:
        """If a caller's flight of ours is on ``iid`` (it takes a lease the background pass
        claimed as its own), let it finish; True when one was running."""
        running = self._flights.get(iid)
        if running is None:
            return False
        with contextlib.suppress(BrokerError):
            await asyncio.shield(running)
        return True

    def running(self, iid: str) -> bool:
        return iid in self._flights

    async def fly_leased(self, row: StoredIntegration, request: TokenRequest) -> None:
        """Refresh a row whose lease this broker already holds; callers arriving meanwhile
        join this flight instead of waiting on the lease. Failures are recorded on the row."""
        task = self._start(row.integration.id, self._leased(row, request))
        await asyncio.shield(task)

    async def _leased(self, row: StoredIntegration, request: TokenRequest) -> Answer:
        end = self._budget_end(request)
        return await self.call.refresh_leased(row, end, background=True), True

    # -- shutdown ------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def drain(self, seconds: float) -> tuple[int, int]:
        """Wait (at most ``seconds``) for every refresh in flight — caller or background — to
        end and be stored; returns (how many were in flight, how many are still running)."""
        self.call.draining = True
        flights = list(self._flights.values())
        if flights:
            await asyncio.wait(flights, timeout=seconds)
        return len(flights), sum(1 for f in flights if not f.done())
