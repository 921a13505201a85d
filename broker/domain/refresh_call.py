"""The provider call of one refresh, made under the lease its flight holds: the provider's
turn (broker.providers.throttle), the request, what its answer means for the row, and the
write of the new tokens (broker.domain.refresh_store).

A request that was sent is never sent again because of a timeout: only failures that provably
never reached the provider are retried at once (broker.providers.client). When a sent request
gets no usable answer the integration records ``last_refresh_error = 'outcome_unknown'`` and is
not refreshed again before ``refresh.outcome_unknown_retry_seconds`` (docs/providers.md, "Refresh
safety"). After ``invalid_grant`` the row is re-read: if its version moved, another broker
refreshed first (we lost a race, not the grant) and its token is served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NoReturn

from broker import metrics
from broker.domain import events
from broker.domain.refresh_policy import Failure, FailureKind, RefreshPolicy
from broker.domain.refresh_store import TokenStore
from broker.domain.tokens import REFRESH, TokenCipher
from broker.errors import (
    CiphertextInvalid,
    GrantRejected,
    ProviderAskedToWait,
    ProviderMisconfigured,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
    Throttled,
    UnknownProvider,
)
from broker.model import NewTokens, Owner, Status, StoredIntegration
from broker.providers.catalog import ProviderRegistry
from broker.providers.client import OAuthClient, TokenResponse
from broker.providers.mint import Minter
from broker.providers.profile import ProviderProfile
from broker.providers.throttle import ProviderThrottle

log = logging.getLogger("broker.refresh")


class ProviderCall:
    """Gets new tokens for a leased row from its provider and stores them."""

    def __init__(
        self,
        cipher: TokenCipher,
        registry: ProviderRegistry,
        client: OAuthClient,
        policy: RefreshPolicy,
        store: TokenStore,
    ) -> None:
        self.cipher = cipher
        self.registry = registry
        self.client = client
        self.policy = policy
        self.store = store
        self.settings = policy.settings
        self.clock = policy.clock
        self.minter = Minter(client)
        self.throttle = ProviderThrottle(
            self.settings.max_concurrent_per_provider,
            self.settings.max_refreshes_per_second_per_provider,
        )
        self.provider_calls = 0
        # Shutdown: no request is sent any more, no retries; calls already sent run to their
        # end and are stored.
        self.draining = False

    async def refresh_leased(
        self, row: StoredIntegration, end: float, *, background: bool = False
    ) -> StoredIntegration:
        """Refresh ``row`` (leased by this broker) by loop time ``end``; returns the row as
        stored, or raises with the lease given back and the failure recorded."""
        iid = row.integration.id
        provider = row.integration.provider
        if background and self.draining:
            # Claimed but not started when shutdown began: give it back untouched.
            await self.store.release(iid, {})
            raise ProviderUnavailable("the broker is shutting down", integration_id=iid)
        try:
            # Endpoint templates ({subdomain}, {tenant}) filled for this integration.
            profile = self.registry.resolve(provider, row.integration.metadata)
        except ProviderMisconfigured:
            await self._release_unsendable(row, "template_value")
            raise
        except UnknownProvider:
            await self._release_unsendable(row, "no_client")
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
            await self.store.release(iid, {})
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
                await self.store.release(iid, {"next_refresh_at": self.policy.not_before(row, exc)})
                raise ProviderUnavailable(
                    exc.message, retry_after=exc.retry_after, integration_id=iid, provider=provider
                ) from None
            except GrantRejected as exc:
                metrics.REFRESHES.labels(provider, "rejected").inc()
                return await self.store.rejected(row, exc)
            except ProviderMisconfigured as exc:
                metrics.REFRESHES.labels(provider, "misconfigured").inc()
                self.registry.mark_misconfigured(provider, exc.message)
                await self.store.release(
                    iid,
                    self.policy.failed(row, FailureKind.CLIENT_REJECTED).values(),
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
                # Nothing was sent, so a retry is safe.
                wait = self.policy.retry_wait(attempt, exc.retry_after)
                if self.policy.gives_up(attempt, self.draining, loop.time() + wait, end):
                    await self._give_up(row, attempt, exc)
                failed = exc
                await asyncio.sleep(wait)
        values = self._values(row, profile.default_expires_in_seconds, response, refresh_token)
        return await self.store.persist(row, {**values, **carried})

    async def _give_up(
        self, row: StoredIntegration, attempts: int, exc: ProviderUnavailable
    ) -> NoReturn:
        """Record a refresh that failed without reaching the token logic (back-off, a
        REFRESH_FAILED event at the threshold), give the lease back, and raise."""
        iid = row.integration.id
        provider = row.integration.provider
        # (A Retry-After is the throttle's: it pauses every integration of the provider.)
        failed = self.policy.failed(row, FailureKind.UNAVAILABLE)
        await self._release_failed(row, failed)
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

    async def _release_unsendable(self, row: StoredIntegration, error: str) -> None:
        """Give the lease back when no request can be built for the provider (no client
        configured, or an endpoint template without its value): the misconfigured back-off
        and its PROVIDER_MISCONFIGURED event."""
        await self.store.release(
            row.integration.id,
            self.policy.failed(row, FailureKind.NO_CLIENT).values(),
            partial(
                events.provider_misconfigured,
                integration=row.integration,
                at=self.clock(),
                error=error,
            ),
        )

    async def _release_failed(self, row: StoredIntegration, failed: Failure) -> None:
        """Give the lease back with the failure's back-off, and the REFRESH_FAILED event when
        this failure is the one that reaches the threshold."""
        await self.store.release(
            row.integration.id,
            failed.values(),
            partial(
                events.refresh_failed,
                integration=row.integration,
                at=self.clock(),
                failures=failed.failures,
                threshold=self.policy.failure_threshold,
            ),
        )

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
        failed = self.policy.failed(
            row, FailureKind.OUTCOME_UNKNOWN, self.settings.outcome_unknown_retry_seconds
        )
        cool_down = failed.seconds_from(self.clock())
        # An unknown outcome counts in the run of failures, so it can be the one that reaches
        # the threshold (the event is written once per run, at the threshold).
        await self._release_failed(row, failed)
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
        values: dict[str, Any] = {}
        if old_refresh is not None:
            # The keep-alive's idle clock starts again: the refresh token was just used.
            values["refresh_token_used_at"] = response.received_at
            lapses = response.refresh_token_expires_at()
            if response.refresh_token or lapses is not None:
                # A rotated refresh token has its own expiry (None: not said); one that was
                # not rotated keeps the expiry it has, unless the provider restates it.
                values["refresh_token_expires_at"] = lapses
        return {
            **values,
            **self.cipher.token_values(Owner.of(row.integration), tokens),
            "status": Status.CONNECTED.value,
            "last_refreshed_at": response.received_at,
            "updated_at": response.received_at,
            "refresh_failures": 0,
            "last_refresh_error": None,
            "next_refresh_at": None,
            "issued_lifetime_seconds": lifetime or None,
        }
