"""The refresh engine: one refresh per integration at a time, on one broker and across replicas.

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
4. only if the leased row is still stale (no cool-down begun meanwhile) do we call the provider,
   in that provider's turn (broker.providers.throttle: its concurrency and rate limits, a
   Retry-After pause); otherwise the lease is rolled back;
5. write new tokens with ``version + 1`` (compare-and-swap), release the lease and return the new
   row in the same statement.

After ``invalid_grant`` the row is re-read: if its version moved, another broker refreshed first
(we lost a race, not the grant) and its token is served. Tokens that the provider issued but the
database would not take are kept in memory and retried until stored — never dropped: for a
provider that rotates refresh tokens the old one is already dead.

A request that was sent is never sent again because of a timeout: only failures that provably
never reached the provider are retried at once (broker.providers.client). The provider call
runs in its own task, shielded from callers: a caller whose deadline passes gets UNAVAILABLE
with RetryInfo while the call goes on and its tokens are stored. When a sent request gets no
usable answer the integration records ``last_refresh_error = 'outcome_unknown'`` and is not
refreshed again before ``refresh.outcome_unknown_retry_seconds`` (docs/providers.md, "Refresh
safety").

On shutdown (``stop_claiming``) no new background work is claimed or started, retries stop,
and the calls already sent run to their end and are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NoReturn

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import metrics
from broker.config import RefreshSettings
from broker.domain import events, periodic, refresh_policy
from broker.domain.refresh_policy import Failure, FailureKind, PassBudget
from broker.domain.tokens import REFRESH, TokenCipher, check_servable, remaining
from broker.errors import (
    BrokerError,
    CiphertextInvalid,
    GrantRejected,
    IntegrationNotFound,
    MinValidityUnattainable,
    ProviderAskedToWait,
    ProviderMisconfigured,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
    ReauthorizationRequired,
    StorageUnavailable,
    Throttled,
    UnknownProvider,
)
from broker.model import (
    AccessToken,
    Clock,
    NewTokens,
    Owner,
    Selector,
    Status,
    StoredIntegration,
    TokenRequest,
)
from broker.providers.catalog import ProviderRegistry
from broker.providers.client import OAuthClient, TokenResponse
from broker.providers.mint import Minter
from broker.providers.profile import ProviderProfile
from broker.providers.throttle import ProviderThrottle
from broker.storage import repository
from broker.storage.changes import Invalidate
from broker.storage.engine import storage_errors, write_transaction

log = logging.getLogger("broker.refresh")

# How long a caller without a gRPC deadline may wait for a refresh, provider retries included.
DEFAULT_BUDGET = 20.0
_PERSIST_ATTEMPTS = 5
OUTCOME_UNKNOWN = FailureKind.OUTCOME_UNKNOWN.value


def _no_session() -> int | None:
    return None


_EventWrite = Callable[[AsyncConnection], Awaitable[object]]


@dataclass(slots=True)
class _Unsaved:
    """New tokens the provider issued that are not in the database yet."""

    base_version: int
    values: dict[str, Any]
    stored: StoredIntegration
    before: StoredIntegration | None = None  # the row refreshed, for its RECOVERED event


class _Decided(Exception):
    """Not an error: raised inside the lease transaction to roll the lease back (it was never
    taken) and answer with ``result``."""

    def __init__(self, result: tuple[StoredIntegration, bool]) -> None:
        super().__init__()
        self.result = result


def _secret_name(row: StoredIntegration) -> str:
    kind = row.integration.credential_type
    return f"{kind.value} credential" if kind.minted else "refresh token"


class RefreshEngine:
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
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        self.registry = registry
        self.client = client
        self.settings = settings
        self.clock = clock
        self.owner = owner or f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
        # The lease must outlive every provider call its holder may make.
        self.lease = timedelta(
            seconds=settings.provider_timeout_seconds * (settings.max_attempts + 1) + 30
        )
        self._flights: dict[str, asyncio.Task[tuple[StoredIntegration, bool]]] = {}
        self._margins: dict[str, timedelta] = {}
        self._unsaved: dict[str, _Unsaved] = {}
        self.provider_calls = 0
        self.throttle = ProviderThrottle(
            settings.max_concurrent_per_provider, settings.max_refreshes_per_second_per_provider
        )
        self.minter = Minter(client)
        # Set by the runtime when a cache is in use: called for every committed write.
        self.invalidate: Invalidate | None = None
        # Set by the server on PostgreSQL: the key of this process's session lock, recorded
        # on every lease it takes (None: the lease is bounded by its time alone).
        self.session: Callable[[], int | None] = _no_session
        # Shutdown: no new background work, no retries; calls already sent run to their end.
        self.draining = False
        # Callers waiting on a flight, and the loop time by which shutdown needs them answered.
        self._waiting: set[asyncio.Timeout] = set()
        self._answer_by: float | None = None
        # Consecutive transient failures after which a REFRESH_FAILED event is written.
        self.failure_threshold = 3
        self.backoff = refresh_policy.Backoff(
            settings.failure_backoff_seconds, settings.failure_backoff_max_seconds
        )

    # -- deciding ------------------------------------------------------------------------------

    def margin(self, provider: str) -> timedelta:
        # On the hot path (every due() check): remembered per provider name. The registry and
        # settings are fixed for the life of this engine (a reload builds a new runtime).
        margin = self._margins.get(provider)
        if margin is None:
            seconds = self.settings.margin_seconds
            # A membership test, not a raised UnknownProvider, for built-ins stored without
            # a configured client.
            if provider in self.registry:
                profile_margin = self.registry.get(provider).refresh_margin_seconds
                if profile_margin is not None:
                    seconds = profile_margin
            margin = self._margins[provider] = timedelta(seconds=seconds)
        return margin

    def due(
        self, stored: StoredIntegration, request: TokenRequest, now: datetime | None = None
    ) -> bool:
        """Refresh when ``expires_at - now < max(effective margin, min_valid_for)``; the
        effective margin is at most half the lifetime of the token the provider last issued
        (broker.domain.refresh_policy)."""
        integration = stored.integration
        if integration.expires_at is None:
            return False
        return refresh_policy.is_due(
            integration.expires_at,
            self.clock() if now is None else now,
            self.margin(integration.provider),
            stored.issued_lifetime_seconds,
            request.min_valid_for,
        )

    # -- serving -------------------------------------------------------------------------------

    async def refresh(self, stored: StoredIntegration, request: TokenRequest) -> AccessToken:
        """Refresh (sharing one flight per integration) and return a token for the caller."""
        lifetime = stored.issued_lifetime_seconds
        if lifetime is not None and not request.force_refresh:
            # Remembered from the last refresh: asking the provider again would only bring
            # another token of the same lifetime.
            self._check_attainable(stored, request, lifetime)
        patience = asyncio.timeout(None)
        self._waiting.add(patience)
        try:
            async with patience:
                self._bound(patience, _caller_wait(request))
                fresh, refreshed = await self._flight(stored, request, wait=True)
        except TimeoutError:
            if not patience.expired():
                raise
            # The caller's deadline is about to pass; the refresh goes on in its own task and
            # its tokens are stored. Answer while the caller can still hear it.
            if self._still_satisfies(stored, request):
                return self.cipher.access_token(stored)
            raise ProviderUnavailable(
                f"the refresh of integration {stored.integration.id} is still waiting for the "
                "provider; it goes on and will be stored, retry shortly",
                retry_after=1.0,
                integration_id=stored.integration.id,
            ) from None
        except ProviderUnavailable:
            # The provider is down; the token we have may still do for this caller.
            if self._still_satisfies(stored, request):
                return self.cipher.access_token(stored)
            raise
        finally:
            self._waiting.discard(patience)
        check_servable(fresh, request.required_scopes)
        left = remaining(fresh.integration.expires_at, self.clock())
        if refreshed and left is not None and left < request.min_valid_for:
            lifetime = fresh.issued_lifetime_seconds
            raise _unattainable(
                fresh, request, int(left.total_seconds()) if lifetime is None else lifetime
            )
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

    def _still_satisfies(self, stored: StoredIntegration, request: TokenRequest) -> bool:
        left = remaining(stored.integration.expires_at, self.clock())
        return left is not None and left >= request.min_valid_for and left > timedelta(0)

    def _check_attainable(
        self, stored: StoredIntegration, request: TokenRequest, lifetime: int
    ) -> None:
        # Equal cannot be met either: the token starts losing time the moment it is issued.
        if request.min_valid_for >= timedelta(seconds=lifetime):
            raise _unattainable(stored, request, lifetime)

    async def _flight(
        self, stored: StoredIntegration, request: TokenRequest, *, wait: bool
    ) -> tuple[StoredIntegration, bool]:
        iid = stored.integration.id
        task = self._flights.get(iid)
        if task is None:
            task = asyncio.create_task(self._run(stored, request, wait), name=f"refresh-{iid}")
            self._flights[iid] = task
            task.add_done_callback(lambda done: self._forget(iid, done))
        # shield: a caller that gives up must not cancel the refresh the others are waiting on,
        # nor the write of tokens the provider has already rotated.
        return await asyncio.shield(task)

    def _forget(self, iid: str, task: asyncio.Task[tuple[StoredIntegration, bool]]) -> None:
        if self._flights.get(iid) is task:
            del self._flights[iid]
        if not task.cancelled():
            task.exception()  # mark retrieved; every waiter got it already

    def _budget_end(self, request: TokenRequest) -> float:
        budget = DEFAULT_BUDGET if request.deadline_seconds is None else request.deadline_seconds
        budget = min(budget, self.lease.total_seconds() - 10)
        return asyncio.get_running_loop().time() + max(0.0, budget - _answer_time(budget))

    async def _run(
        self, stored: StoredIntegration, request: TokenRequest, wait: bool
    ) -> tuple[StoredIntegration, bool]:
        iid = stored.integration.id
        if iid in self._unsaved:
            return await self._retry_unsaved(iid), True
        loop = asyncio.get_running_loop()
        end = self._budget_end(request)
        seen = stored.integration.version
        # The caller's read decides first (a cool-down refuses without a statement); then the
        # lease is tried at the version it read, and the leasing UPDATE returns the row.
        decided = self._decide(iid, stored, request, seen, self.clock())
        if decided is not None:
            return decided
        version = seen
        delay = 0.02
        while True:
            now = self.clock()
            leased = None
            try:
                async with write_transaction(self.engine, self.invalidate) as conn:
                    leased = await repository.take_lease(
                        conn, iid, version, self.owner, now, now + self.lease, self.session()
                    )
                    if leased is None:
                        row = await repository.get(conn, iid)
                    else:
                        # The row as leased may say otherwise (a cool-down begun since the
                        # caller's read): then the lease is rolled back, never taken.
                        decided = self._decide(iid, leased, request, seen, now)
                        if decided is not None:
                            raise _Decided(decided)
            except _Decided as answer:
                return answer.result
            if leased is not None:
                return await self._refresh_leased(leased, end), True
            # The version moved, or someone else (another replica) holds the lease.
            decided = self._decide(iid, row, request, seen, now)
            if decided is not None:
                return decided
            assert row is not None
            moved = row.integration.version != seen
            if row.integration.version != version:
                version = row.integration.version  # moved and still due: lease that version
                continue
            if not wait or loop.time() + delay > end:
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

    def _decide(
        self,
        iid: str,
        row: StoredIntegration | None,
        request: TokenRequest,
        seen: int,
        now: Any,
    ) -> tuple[StoredIntegration, bool] | None:
        """What the row says before a refresh: an answer without one (the row, whether it was
        refreshed since ``seen``), an error, or None: go ahead."""
        if row is None:
            raise IntegrationNotFound.for_id(iid)
        check_servable(row)
        moved = row.integration.version != seen
        if moved and not self.due(row, request):
            return row, True
        if not moved and not request.force_refresh and not self.due(row, request):
            return row, False
        if self._cooling_down(row, request, now):
            return row, moved
        if not row.renewable:
            raise ReauthorizationRequired(
                f"integration {row.integration.id} has no refresh token and its access token is "
                "expiring; the user must authorize again",
                integration_id=row.integration.id,
            )
        return None

    def _cooling_down(self, row: StoredIntegration, request: TokenRequest, now: Any) -> bool:
        """After a failed refresh of any kind the integration backs off: no request is sent
        before its ``next_refresh_at`` (after an unknown outcome that is also what keeps a
        maybe-rotated refresh token from being presented again at once: docs/providers.md,
        "Refresh safety"). True: serve the stored token, it still does for this caller;
        otherwise the caller meets the failure the integration backs off from."""
        failed = refresh_policy.cool_down(row.last_refresh_error, row.next_refresh_at, now)
        if failed is None or self._outlived(row, failed):
            return False
        iid = row.integration.id
        provider = row.integration.provider
        metrics.REFRESH_SKIPPED.labels(provider, "cool_down").inc()
        if self._still_satisfies(row, request):
            return True
        wait = max(1.0, failed.seconds_from(now))
        if failed.kind.misconfigured:
            cause = (
                "has no OAuth client configured on this broker"
                if failed.kind is FailureKind.NO_CLIENT
                else "refused the last refresh"
            )
            raise ProviderMisconfigured(
                f"provider {provider!r} {cause} of integration {iid}; the broker tries again "
                f"in {wait:.0f}s, or at once after the integration is stored again",
                integration_id=iid,
                provider=provider,
                retry_after_seconds=f"{wait:.0f}",
            )
        if failed.kind is FailureKind.OUTCOME_UNKNOWN:
            message = (
                f"the last refresh of integration {iid} was sent but got no usable answer; "
                "the broker waits before trying again"
            )
        else:
            message = (
                f"the last refresh of integration {iid} failed (provider {provider!r} "
                "unavailable); the broker waits before trying again"
            )
        raise ProviderUnavailable(message, retry_after=wait, integration_id=iid, provider=provider)

    def _outlived(self, row: StoredIntegration, failed: Failure) -> bool:
        """A refusal of the broker's own configuration that this process's configuration no
        longer bears out: the operator fixed it and restarted. Callers try at once rather than
        wait out the back-off (a refusal seen again flags the provider, and they wait again).
        A minted integration's refusal is of its own credential: storing it again ends that."""
        provider = row.integration.provider
        if failed.kind is FailureKind.NO_CLIENT:
            return provider in self.registry
        if failed.kind is FailureKind.CLIENT_REJECTED:
            minted = row.integration.credential_type.minted
            return not minted and not self.registry.is_misconfigured(provider)
        return False

    def _failed(self, row: StoredIntegration, kind: FailureKind, at_least: float = 0.0) -> Failure:
        """One more failure in the row's run, and how long it backs off (the one schedule for
        every kind of failure, so a broken endpoint is not pressed on every pass or call)."""
        failed = refresh_policy.failure(
            kind, row.refresh_failures, self.clock(), self.backoff, at_least=at_least
        )
        metrics.REFRESH_BACKOFF.labels(row.integration.provider).observe(
            failed.seconds_from(self.clock())
        )
        return failed

    # -- calling the provider ------------------------------------------------------------------

    async def _refresh_leased(
        self, row: StoredIntegration, end: float, *, background: bool = False
    ) -> StoredIntegration:
        iid = row.integration.id
        provider = row.integration.provider
        if background and self.draining:
            # Claimed but not started when shutdown began: give it back untouched.
            await self._release(iid, {})
            raise ProviderUnavailable("the broker is shutting down", integration_id=iid)
        try:
            profile = self.registry.get(provider)
        except UnknownProvider:
            await self._release(
                iid,
                self._failed(row, FailureKind.NO_CLIENT).values(),
                partial(
                    events.provider_misconfigured,
                    integration=row.integration,
                    at=self.clock(),
                    error="no_client",
                ),
            )
            raise ProviderMisconfigured(
                f"provider {provider!r} has no OAuth client configured on this broker "
                f"(set providers.{provider}.client_id and client_secret_env)",
                provider=provider,
            ) from None
        try:
            obtain, refresh_token, carried = self._renewal(row, profile)
        except CiphertextInvalid:
            # Tampered, or re-parented in the database: nothing is sent to any provider. The
            # lease goes back at once so callers hear DATA_LOSS, not "being refreshed".
            log.error(
                "integration %s: its stored secret does not decrypt for its row and owner; "
                "not refreshing",
                iid,
            )
            await self._release(iid, {})
            raise
        loop = asyncio.get_running_loop()
        attempt = 0
        failed: ProviderUnavailable | None = None  # the previous attempt's failure
        while True:
            attempt += 1
            try:
                # The provider's turn (its concurrency and rate limits, a Retry-After pause);
                # the slot is held for the request only, never across a database statement.
                async with self.throttle.turn(
                    provider,
                    end,
                    max_concurrent=profile.max_concurrent_refreshes,
                    per_second=profile.max_refreshes_per_second,
                ):
                    if self.draining:
                        # Queued when shutdown began: shutdown waits only for requests already
                        # sent, so one sent now could have its rotated answer cut off.
                        raise Throttled(
                            "the broker is shutting down; the refresh was not sent",
                            retry_after=1.0,
                        )
                    self.provider_calls += 1
                    response = await obtain()
                metrics.REFRESHES.labels(provider, "ok").inc()
                break
            except Throttled as exc:
                metrics.REFRESHES.labels(provider, "throttled").inc()
                if failed is not None:
                    # The attempt before failed for real: that failure is what to record.
                    await self._give_up(row, attempt - 1, failed)
                # Not sent: nothing to count against the integration. The background pass
                # leaves it alone until the provider's turn may come (it would claim it again
                # at once otherwise, for as long as the pause lasts).
                await self._release(iid, {"next_refresh_at": self._not_before(row, exc)})
                raise ProviderUnavailable(
                    exc.message, retry_after=exc.retry_after, integration_id=iid, provider=provider
                ) from None
            except GrantRejected as exc:
                metrics.REFRESHES.labels(provider, "rejected").inc()
                return await self._rejected(row, exc)
            except ProviderMisconfigured as exc:
                metrics.REFRESHES.labels(provider, "misconfigured").inc()
                self.registry.mark_misconfigured(provider, exc.message)
                await self._release(
                    iid,
                    self._failed(row, FailureKind.CLIENT_REJECTED).values(),
                    partial(
                        events.provider_misconfigured,
                        integration=row.integration,
                        at=self.clock(),
                        error=exc.metadata.get("provider_error", ""),
                    ),
                )
                log.error("provider %s is misconfigured: %s", provider, exc.message)
                raise
            except ProviderOutcomeUnknown as exc:
                metrics.REFRESHES.labels(provider, "unknown").inc()
                await self._outcome_unknown(row, exc)
            except ProviderUnavailable as exc:
                metrics.REFRESHES.labels(provider, "unavailable").inc()
                if isinstance(exc, ProviderAskedToWait):
                    # Retry-After speaks for the provider, not for this one refresh token: every
                    # integration of the provider waits (broker.providers.throttle).
                    self.throttle.pause(provider, exc.retry_after)
                backoff = min(8.0, 0.2 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                wait = max(backoff, min(exc.retry_after, 30.0) if attempt > 0 else 0.0)
                # Nothing was sent, so a retry is safe; it needs time to connect, not to be
                # answered (the answer may outlive the caller: see refresh()).
                connect = self.settings.provider_connect_timeout_seconds
                if (
                    attempt >= self.settings.max_attempts
                    or self.draining
                    or loop.time() + wait + connect > end
                ):
                    await self._give_up(row, attempt, exc)
                failed = exc
                await asyncio.sleep(wait)
        values = self._values(row, profile.default_expires_in_seconds, response, refresh_token)
        return await self._persist(row, {**values, **carried})

    async def _give_up(
        self, row: StoredIntegration, attempts: int, exc: ProviderUnavailable
    ) -> NoReturn:
        """Record a refresh that failed without reaching the token logic (back-off, a
        REFRESH_FAILED event at the threshold), give the lease back, and raise."""
        iid = row.integration.id
        provider = row.integration.provider
        # (A Retry-After is the throttle's: it pauses every integration of the provider.)
        failed = self._failed(row, FailureKind.UNAVAILABLE)
        await self._release(
            iid,
            failed.values(),
            partial(
                events.refresh_failed,
                integration=row.integration,
                at=self.clock(),
                failures=failed.failures,
                threshold=self.failure_threshold,
            ),
        )
        log.warning(
            "refresh of integration %s (%s) failed after %d attempt(s): %s",
            iid,
            provider,
            attempts,
            exc.message,
        )
        raise ProviderUnavailable(
            f"provider {provider!r} is unavailable and the stored token cannot "
            f"satisfy the request: {exc.message}",
            # When this integration will be tried again (callers meanwhile get this answer).
            retry_after=max(failed.seconds_from(self.clock()), exc.retry_after, 1.0),
            integration_id=iid,
            provider=provider,
        ) from None

    def _not_before(self, row: StoredIntegration, exc: Throttled) -> datetime:
        """When the background pass may try a throttled integration again (never earlier
        than a wait it already had)."""
        until = self.clock() + timedelta(seconds=max(1.0, exc.retry_after))
        earlier = row.next_refresh_at
        return until if earlier is None or earlier < until else earlier

    def _renewal(
        self, row: StoredIntegration, profile: ProviderProfile
    ) -> tuple[Callable[[], Awaitable[TokenResponse]], str | None, dict[str, Any]]:
        """Where refreshing and minting part ways: (how to get new tokens, the refresh token
        to keep, extra column values for the write). Everything around it — single flight,
        lease, retries, failure classification, compare-and-swap — is the same for both."""
        kind = row.integration.credential_type
        if kind.minted:
            credential = self.cipher.credential(row)
            # Re-encrypted under the primary key in the same write, so the row's key_id holds.
            carried = self.cipher.credential_values(Owner.of(row.integration), credential)

            async def mint() -> TokenResponse:
                try:
                    return await self.minter.mint(profile, kind.value, credential.fields)
                except ProviderOutcomeUnknown as exc:
                    # Minting again uses nothing up: a lost answer is only a retryable failure.
                    raise ProviderUnavailable(
                        exc.message, retry_after=exc.retry_after, **exc.metadata
                    ) from exc

            return mint, None, carried
        assert row.refresh_token_ct is not None
        refresh_token = self.cipher.decrypt(
            Owner.of(row.integration), REFRESH, row.refresh_token_ct
        )
        return (lambda: self.client.refresh(profile, refresh_token)), refresh_token, {}

    async def _outcome_unknown(self, row: StoredIntegration, exc: ProviderOutcomeUnknown) -> None:
        iid = row.integration.id
        # Never sooner than the pause that lets a first request still being processed end.
        failed = self._failed(
            row, FailureKind.OUTCOME_UNKNOWN, self.settings.outcome_unknown_retry_seconds
        )
        cool_down = failed.seconds_from(self.clock())
        await self._release(
            iid,
            failed.values(),
            # An unknown outcome counts in the run of failures, so it can be the one that
            # reaches the threshold (the event is written once per run, at the threshold).
            partial(
                events.refresh_failed,
                integration=row.integration,
                at=self.clock(),
                failures=failed.failures,
                threshold=self.failure_threshold,
            ),
        )
        log.warning(
            "refresh of integration %s (%s) was sent but its outcome is unknown (%s); not "
            "sending that refresh token again for %gs. If the provider did rotate it, the next "
            "attempt will be refused and the integration will need reauthorization",
            iid,
            row.integration.provider,
            exc.message,
            cool_down,
        )
        raise ProviderUnavailable(
            f"provider {row.integration.provider!r} did not give a usable answer to the refresh "
            f"of integration {iid}: {exc.message}",
            retry_after=max(1.0, cool_down),
            integration_id=iid,
            provider=row.integration.provider,
        ) from None

    def _values(
        self,
        row: StoredIntegration,
        profile_default: int | None,
        response: TokenResponse,
        old_refresh: str | None,
    ) -> dict[str, Any]:
        default = (
            profile_default
            if profile_default is not None
            else self.settings.default_expires_in_seconds
        )
        lifetime = response.expires_in if response.expires_in is not None else default
        tokens = NewTokens(
            access_token=response.access_token,
            # Google (and others) omit refresh_token on refresh: keep the one we have.
            refresh_token=response.refresh_token or old_refresh,
            token_type=response.token_type or row.integration.token_type,
            expires_at=response.expires_at(default),
            scopes=response.scopes if response.scopes is not None else row.integration.scopes,
        )
        return {
            **self.cipher.token_values(Owner.of(row.integration), tokens),
            "status": Status.CONNECTED.value,
            "last_refreshed_at": response.received_at,
            "updated_at": response.received_at,
            "refresh_failures": 0,
            "last_refresh_error": None,
            "next_refresh_at": None,
            "issued_lifetime_seconds": lifetime or None,
        }

    async def _rejected(self, row: StoredIntegration, exc: GrantRejected) -> StoredIntegration:
        iid = row.integration.id
        async with write_transaction(self.engine, self.invalidate) as conn:
            current = await repository.get(conn, iid)
            if current is None:
                raise IntegrationNotFound.for_id(iid)
            if current.integration.version != row.integration.version:
                # The row changed under us: another writer refreshed or replaced the tokens,
                # so the provider rejected a refresh token that is no longer ours to use.
                await repository.release_lease(conn, iid, self.owner, {})
                log.info("integration %s: lost a refresh race; serving the newer token", iid)
                return current
            await repository.write_refreshed(
                conn,
                iid,
                row.integration.version,
                {
                    "status": Status.NEEDS_REAUTHORIZATION.value,
                    "last_refresh_error": exc.error[:64],
                    "updated_at": self.clock(),
                },
            )
            await events.needs_reauthorization(
                conn, row.integration, self.clock(), exc.error, _secret_name(row)
            )
        log.info("integration %s: provider answered %s; needs reauthorization", iid, exc.error)
        raise ReauthorizationRequired(
            f"the provider rejected the {_secret_name(row)} of integration {iid} ({exc.error}); "
            "the user must authorize again",
            integration_id=iid,
        )

    async def _release(
        self, iid: str, values: dict[str, Any], event: _EventWrite | None = None
    ) -> None:
        try:
            async with write_transaction(self.engine, self.invalidate) as conn:
                released = await repository.release_lease(conn, iid, self.owner, values)
                if released and event is not None:
                    await event(conn)
        except StorageUnavailable:
            # The lease lapses by itself; nothing was rotated, so nothing is lost.
            log.warning("could not release the refresh lease of integration %s", iid)

    # -- writing -------------------------------------------------------------------------------

    async def _persist(self, row: StoredIntegration, values: dict[str, Any]) -> StoredIntegration:
        iid = row.integration.id
        for attempt in range(_PERSIST_ATTEMPTS):
            try:
                return await self._write(iid, row.integration.version, values, row)
            except StorageUnavailable:
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        # The provider has issued new tokens (and may have revoked the old refresh token):
        # keep them in memory, serve them, and keep trying to store them.
        log.error(
            "integration %s: the provider issued new tokens but the database did not accept "
            "them after %d attempts; holding them in memory and retrying",
            iid,
            _PERSIST_ATTEMPTS,
        )
        pending = _Unsaved(row.integration.version, values, self._in_memory(row, values), row)
        self._unsaved[iid] = pending
        return pending.stored

    async def _write(
        self,
        iid: str,
        version: int,
        values: dict[str, Any],
        before: StoredIntegration | None = None,
    ) -> StoredIntegration:
        async with write_transaction(self.engine, self.invalidate) as conn:
            written = await repository.write_refreshed(conn, iid, version, values)
            if written is None:
                current = await repository.get(conn, iid)
            else:
                current = written  # RETURNING: the row as written, no re-read
                if before is not None:
                    await events.refreshed(conn, before, values["updated_at"])
        if current is None:
            raise IntegrationNotFound.for_id(iid)
        if written is None:
            # Someone replaced the row while we held the lease (a new StoreIntegration, a
            # Disconnect): their state wins over tokens from the grant they replaced.
            log.warning("integration %s changed during refresh; newer state kept", iid)
        self._unsaved.pop(iid, None)
        return current

    def _in_memory(self, row: StoredIntegration, values: dict[str, Any]) -> StoredIntegration:
        integration = replace(
            row.integration,
            status=Status.CONNECTED,
            token_type=values["token_type"],
            expires_at=values["expires_at"],
            scopes=tuple(values["scopes"]),
            last_refreshed_at=values["last_refreshed_at"],
            has_refresh_token=values.get("refresh_token_ct", row.refresh_token_ct) is not None,
        )
        return replace(
            row,
            integration=integration,
            access_token_ct=values["access_token_ct"],
            refresh_token_ct=values.get("refresh_token_ct", row.refresh_token_ct),
        )

    async def _retry_unsaved(self, iid: str) -> StoredIntegration:
        pending = self._unsaved[iid]
        try:
            return await self._write(iid, pending.base_version, pending.values, pending.before)
        except StorageUnavailable:
            return pending.stored

    async def flush_unsaved(self) -> int:
        """Try to store every token set still held in memory; returns how many remain."""
        for iid in list(self._unsaved):
            with contextlib.suppress(StorageUnavailable):
                await self._retry_unsaved(iid)
        return len(self._unsaved)

    # -- background ----------------------------------------------------------------------------

    async def background_pass(self, batch: int = 10, max_batches: int = 100) -> int:
        """Refresh integrations that will be due before the next pass; returns the number of
        provider calls made (informational: foreground refreshes running meanwhile count too).

        Each row is claimed (and attempted) at most once per pass, rows backing off after a
        failure are not claimed, rows that never failed are claimed first, and each provider
        gets at most ``background_attempts_per_provider`` attempts: failing rows cannot crowd
        out healthy ones, nor one provider the others."""
        await self.flush_unsaved()
        before = self.provider_calls
        interval = timedelta(seconds=self.settings.background_interval_seconds)
        widest = max(
            [timedelta(seconds=self.settings.margin_seconds)]
            + [self.margin(p.name) for p in self.registry]
        )
        budget = PassBudget(self.settings.background_attempts_per_provider)
        seen: set[str] = set()
        for _ in range(max_batches):
            if self.draining:
                break
            now = self.clock()
            async with write_transaction(self.engine, self.invalidate) as conn:
                claimed = await repository.claim_due(
                    conn,
                    now + widest + interval,
                    now,
                    now + self.lease,
                    self.owner,
                    batch,
                    self.session(),
                    skip_ids=seen,
                    skip_providers=budget.exhausted,
                )
            if not claimed:
                break
            seen.update(iid for iid, _ in claimed)
            # The budget is spent in claim order (never-failed rows first), not in the order
            # the rows' reads happen to come back.
            await asyncio.gather(
                *(
                    self._background_one(iid, interval, provider, budget, budget.take(provider))
                    for iid, provider in claimed
                )
            )
        return self.provider_calls - before

    async def _background_one(
        self, iid: str, interval: timedelta, provider: str, budget: PassBudget, granted: bool
    ) -> None:
        """Refresh one integration whose lease this broker already holds, if it is due and
        was ``granted`` an attempt of its provider's budget for this pass."""
        if not granted:
            # Claimed in the batch that spent the budget; left for the next pass.
            metrics.REFRESH_SKIPPED.labels(provider, "budget").inc()
            await self._release(iid, {})
            return
        ahead = TokenRequest(selector=Selector(integration_id=iid), min_valid_for=interval)
        async with storage_errors(), self.engine.connect() as conn:
            row = await repository.get(conn, iid)
        running = self._flights.get(iid)
        if running is not None:
            # A caller's flight of ours is on it (and takes our own lease as its own): let it
            # finish, then make sure the lease claimed here does not linger.
            with contextlib.suppress(BrokerError):
                await asyncio.shield(running)
            if iid in self._flights:
                return
        if row is None or running is not None or not self.due(row, ahead):
            budget.give_back(provider)  # no attempt made
            await self._release(iid, {})
            return
        task = asyncio.create_task(self._leased_flight(row, ahead), name=f"refresh-{iid}")
        # Foreground callers arriving meanwhile join this flight instead of waiting on the lease.
        self._flights[iid] = task
        task.add_done_callback(lambda done: self._forget(iid, done))
        try:
            await asyncio.shield(task)
        except BrokerError as exc:
            log.debug("background refresh of %s did not succeed: %s", iid, exc.reason)

    async def _leased_flight(
        self, row: StoredIntegration, request: TokenRequest
    ) -> tuple[StoredIntegration, bool]:
        return await self._refresh_leased(row, self._budget_end(request), background=True), True

    async def run_background(self, stop: asyncio.Event | None = None) -> None:
        await periodic.every(
            self.settings.background_interval_seconds,
            self.background_pass,
            "background refresh",
            "%d provider call(s)",
            stop=stop,
        )

    # -- shutdown ------------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        self.draining = True

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def drain(self, seconds: float) -> tuple[int, int]:
        """Wait (at most ``seconds``) for every refresh in flight — caller or background — to
        end and be stored; returns (how many were in flight, how many are still running)."""
        self.draining = True
        flights = list(self._flights.values())
        if flights:
            await asyncio.wait(flights, timeout=seconds)
        return len(flights), sum(1 for f in flights if not f.done())


def _unattainable(
    stored: StoredIntegration, request: TokenRequest, lifetime: int
) -> MinValidityUnattainable:
    asked = request.min_valid_for.total_seconds()
    return MinValidityUnattainable(
        f"min_valid_for {asked:g}s cannot be met: provider {stored.integration.provider!r} "
        f"issues tokens valid for {lifetime}s; ask for less than that",
        integration_id=stored.integration.id,
        provider=stored.integration.provider,
        token_lifetime_seconds=str(lifetime),
        min_valid_for_seconds=f"{asked:g}",
    )


def _caller_wait(request: TokenRequest) -> float | None:
    """How long a caller waits on a flight: its deadline, less enough to deliver the answer."""
    if request.deadline_seconds is None:
        return None
    left = request.deadline_seconds
    return max(0.0, left - _answer_time(left))


def _answer_time(budget: float) -> float:
    # Time kept back from a caller's deadline to deliver the answer (the audit write included)
    # on a busy host: a fifth, at least half a second, at most half the deadline.
    return min(max(0.5, budget * 0.2), budget / 2)
