"""The refresh engine: one refresh per integration at a time, on one broker and across replicas.

It is three parts, each with one job, built together here:

* the **policy** (broker.domain.refresh_policy): what is decided without a database or a
  provider — when a token is due, the effective margin, the back-off after a failure and what
  a caller meets during it, the per-pass budget;
* the **flight** (broker.domain.refresh_flight): one refresh per integration — the in-process
  single flight, the lease, the callers waiting on it — with its provider call
  (broker.domain.refresh_call) and its writes, including tokens the database would not take
  yet, retried until stored (broker.domain.refresh_store);
* the **background pass** (broker.domain.refresh_pass): claiming due rows within the per-pass
  budget, running flights for them, the periodic loop.

On shutdown (``stop_claiming``) no new background work is claimed or started, retries stop,
and the calls already sent run to their end and are stored (``drain``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.config import RefreshSettings
from broker.domain.refresh_call import ProviderCall
from broker.domain.refresh_flight import Flights
from broker.domain.refresh_pass import BackgroundPass
from broker.domain.refresh_policy import RefreshPolicy
from broker.domain.refresh_store import Holder, TokenStore, no_session
from broker.domain.tokens import TokenCipher
from broker.model import AccessToken, Clock, StoredIntegration, TokenRequest
from broker.providers.catalog import ProviderRegistry
from broker.providers.client import OAuthClient
from broker.providers.throttle import ProviderThrottle
from broker.storage.changes import Invalidate


class RefreshEngine:
    """The refresh parts of one broker process, and the calls the rest of the broker makes."""

    def __init__(
        self,
        engine: AsyncEngine,
        cipher: TokenCipher,
        registry: ProviderRegistry,
        client: OAuthClient,
        settings: RefreshSettings,
        clock: Clock,
        *,
        owner: str | None = None,
        invalidate: Invalidate | None = None,
        session: Callable[[], int | None] = no_session,
        failure_threshold: int = 3,
    ) -> None:
        """``invalidate``: the cache's, called for every committed write. ``session``: on
        PostgreSQL, the key of this process's session lock, recorded on every lease it takes
        (None while the lock is not held: the lease is then bounded by its time alone).
        ``failure_threshold``: consecutive transient failures after which a REFRESH_FAILED
        event is written."""
        self.settings = settings
        self.policy = RefreshPolicy(settings, registry, clock, failure_threshold=failure_threshold)
        self.holder = Holder(
            engine,
            owner or f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}",
            # The lease must outlive every provider call its holder may make.
            timedelta(seconds=settings.provider_timeout_seconds * (settings.max_attempts + 1) + 30),
            session,
            invalidate,
        )
        self.store = TokenStore(self.holder, clock)
        self.call = ProviderCall(cipher, registry, client, self.policy, self.store)
        self.flights = Flights(cipher, self.policy, self.call, self.store)
        self.passes = BackgroundPass(self.policy, self.flights, self.call, self.store)

    # -- what this process is ------------------------------------------------------------------

    @property
    def owner(self) -> str:
        return self.holder.owner

    @property
    def lease(self) -> timedelta:
        return self.holder.lease

    @property
    def invalidate(self) -> Invalidate | None:
        return self.holder.invalidate

    @property
    def throttle(self) -> ProviderThrottle:
        return self.call.throttle

    @property
    def provider_calls(self) -> int:
        return self.call.provider_calls

    @property
    def callers_waited(self) -> int:
        """Callers that waited on a refresh (their token could not satisfy them)."""
        return self.flights.waited

    @property
    def served_ahead(self) -> int:
        """Callers of a due token served at once while its refresh ran ahead."""
        return self.flights.served_ahead

    # -- serving -------------------------------------------------------------------------------

    def due(
        self, stored: StoredIntegration, request: TokenRequest, now: datetime | None = None
    ) -> bool:
        return self.policy.due(stored, request, now)

    async def refresh(self, stored: StoredIntegration, request: TokenRequest) -> AccessToken:
        return await self.flights.refresh(stored, request)

    async def flush_unsaved(self) -> int:
        return await self.store.flush_unsaved()

    # -- background ----------------------------------------------------------------------------

    async def background_pass(self, batch: int = 10, max_batches: int = 100) -> int:
        return await self.passes.run(batch, max_batches)

    async def run_background(self, stop: asyncio.Event | None = None) -> None:
        await self.passes.run_periodically(stop)

    # -- shutdown ------------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        self.call.draining = True

    @property
    def draining(self) -> bool:
        return self.call.draining

    def answer_callers_by(self, when: float) -> None:
        self.flights.answer_callers_by(when)

    @property
    def in_flight(self) -> int:
        return self.flights.in_flight

    async def drain(self, seconds: float) -> tuple[int, int]:
        return await self.flights.drain(seconds)
