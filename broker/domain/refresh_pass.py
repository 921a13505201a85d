"""The background pass: refresh integrations before callers need them.

Each pass claims due rows in batches (the claim is the lease), runs a flight for each
(broker.domain.refresh_flight), and spends at most ``background_attempts_per_provider``
attempts per provider (broker.domain.refresh_policy). Due means an access token that expires
before the next pass, or a refresh token to keep alive (``Upkeep``): idle for half its
provider's idle lifetime, or lapsing soon. A keep-alive refresh is an ordinary flight (lease,
throttle, compare-and-swap, budget): its write starts the idle clock again, so no replica
claims it again for another half lifetime. A refresh token that lapses soon and cannot be
renewed, or whose renewal fails (tried again under the back-off), gets one
INTEGRATION_EXPIRING event (``repository.mark_expiring`` makes it once per expiry across
replicas). On shutdown (``stop_claiming``) no new work is claimed or started, retries stop,
and the calls already sent run to their end and are stored.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from broker import metrics
from broker.domain import events, periodic
from broker.domain.refresh_call import ProviderCall
from broker.domain.refresh_flight import Flights
from broker.domain.refresh_policy import PassBudget, RefreshPolicy, Upkeep
from broker.domain.refresh_store import TokenStore
from broker.errors import BrokerError, StorageUnavailable
from broker.model import Selector, StoredIntegration, TokenRequest
from broker.storage import repository

log = logging.getLogger("broker.refresh")


class BackgroundPass:
    """Claims due rows and refreshes them, pass after pass."""

    def __init__(
        self, policy: RefreshPolicy, flights: Flights, call: ProviderCall, store: TokenStore
    ) -> None:
        self.policy = policy
        self.flights = flights
        self.call = call
        self.store = store
        self.holder = store.holder
        self.settings = policy.settings

    async def run(self, batch: int = 10, max_batches: int = 100) -> int:
        """Refresh integrations that will be due before the next pass; returns the number of
        provider calls made (informational: foreground refreshes running meanwhile count too).

        Each row is claimed (and attempted) at most once per pass, rows backing off after a
        failure are not claimed, rows that never failed are claimed first, and each provider
        gets at most ``background_attempts_per_provider`` attempts: failing rows cannot crowd
        out healthy ones, nor one provider the others."""
        await self.store.flush_unsaved()
        before = self.call.provider_calls
        interval = timedelta(seconds=self.settings.background_interval_seconds)
        widest = self.policy.widest_margin()
        budget = PassBudget(self.settings.background_attempts_per_provider)
        holder = self.holder
        seen: set[str] = set()
        for _ in range(max_batches):
            if self.call.draining:
                break
            now = self.policy.clock()
            async with holder.transaction() as conn:
                claimed = await repository.claim_due(
                    conn,
                    now + widest + interval,
                    now,
                    now + holder.lease,
                    holder.owner,
                    batch,
                    holder.session(),
                    skip_ids=seen,
                    skip_providers=budget.exhausted,
                    idle_cutoffs=self.policy.idle_cutoffs(now + interval),
                    lapsing_before=now + interval + self.policy.notice,
                )
                # The claimed rows: one read per batch, in the claim's transaction.
                ids = [iid for iid, _ in claimed]
                rows = (
                    {r.integration.id: r for r in await repository.get_many(conn, ids)}
                    if ids
                    else {}
                )
            if not claimed:
                break
            seen.update(iid for iid, _ in claimed)
            # The budget is spent in claim order (never-failed rows first), not in the order
            # the rows' reads happen to come back.
            await asyncio.gather(
                *(
                    self._one(iid, rows.get(iid), interval, provider, budget, budget.take(provider))
                    for iid, provider in claimed
                )
            )
        return self.call.provider_calls - before

    async def _one(
        self,
        iid: str,
        row: StoredIntegration | None,
        interval: timedelta,
        provider: str,
        budget: PassBudget,
        granted: bool,
    ) -> None:
        """Refresh one integration whose lease this broker already holds, if it is due and
        was ``granted`` an attempt of its provider's budget for this pass."""
        if not granted:
            # Claimed in the batch that spent the budget; left for the next pass.
            metrics.REFRESH_SKIPPED.labels(provider, "budget").inc()
            await self.store.release(iid, {})
            return
        ahead = TokenRequest(selector=Selector(integration_id=iid), min_valid_for=interval)
        # A caller's flight of ours may be on it (and takes our own lease as its own): let it
        # finish, then make sure the lease claimed here does not linger.
        was_running = await self.flights.settle_running(iid)
        if was_running and self.flights.running(iid):
            return
        upkeep = None
        if row is not None and not was_running and not self.policy.due(row, ahead):
            # Its access token is not due: is its refresh token (keep-alive)?
            upkeep = self.policy.upkeep(row, self.policy.clock() + interval)
            if upkeep is None:
                row = None
        if row is None or was_running or upkeep is Upkeep.NOTICE:
            budget.give_back(provider)  # no attempt made
            await self.store.release(iid, {})
            if upkeep is Upkeep.NOTICE:
                await self._notice(iid, interval)
            return
        try:
            await self.flights.fly_leased(row, ahead)
        except BrokerError as exc:
            log.debug("background refresh of %s did not succeed: %s", iid, exc.reason)
            if upkeep is not None:
                metrics.KEEPALIVE.labels(provider, "failed").inc()
            if upkeep is Upkeep.RENEW:
                # Its expiry is within the notice time and the renewal failed: the application
                # hears of it now (once per expiry), while renewal goes on under the back-off.
                await self._notice(iid, interval, failing=True)
            return
        if upkeep is not None:
            metrics.KEEPALIVE.labels(provider, "ok").inc()
            log.info("integration %s: refresh token kept alive (%s)", iid, upkeep.value)
        if upkeep is Upkeep.RENEW:
            # Renewed only if the refresh brought a later expiry; otherwise it lapses as it
            # would have, and the application hears of it now.
            await self._notice(iid, interval, not_after=row.integration.refresh_token_expires_at)

    async def _notice(
        self,
        iid: str,
        interval: timedelta,
        not_after: datetime | None = None,
        *,
        failing: bool = False,
    ) -> None:
        """The INTEGRATION_EXPIRING event of the row's refresh-token expiry, once (``failing``:
        only if the row's last refresh failed)."""
        now = self.policy.clock()
        try:
            async with self.holder.transaction() as conn:
                marked = await repository.mark_expiring(
                    conn,
                    iid,
                    now + interval + self.policy.notice,
                    not_after=not_after,
                    failing=failing,
                )
                if marked is not None:
                    await events.expiring(conn, marked.integration, now)
        except StorageUnavailable:
            log.warning("could not write the EXPIRING event of integration %s", iid)

    async def run_periodically(self, stop: asyncio.Event | None = None) -> None:
        await periodic.every(
            self.settings.background_interval_seconds,
            self.run,
            "background refresh",
            "%d provider call(s)",
            stop=stop,
        )
