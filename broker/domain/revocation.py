"""Revocation at the provider when an integration is disconnected (RFC 7009).

The refresh token goes first — revoking it ends the whole grant at providers that follow
RFC 7009 §2.1 — then the access token. A provider that is down leaves the revocation PENDING;
a background task retries it with backoff until it succeeds, is refused, or runs out of
attempts (FAILED). The ciphertexts are wiped as soon as the outcome is final.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.domain import events, periodic
from broker.domain.tokens import ACCESS, REFRESH, TokenCipher
from broker.errors import (
    BrokerError,
    CiphertextInvalid,
    ProviderMisconfigured,
    ProviderUnavailable,
)
from broker.model import Clock, Kind, Owner, Revocation, StoredIntegration
from broker.providers.catalog import ProviderRegistry
from broker.providers.client import OAuthClient, RevocationNotSupported
from broker.providers.mint import Minter
from broker.providers.profile import ProviderProfile
from broker.storage import repository
from broker.storage.changes import Invalidate
from broker.storage.engine import storage_errors, write_transaction

log = logging.getLogger("broker.revocation")

MAX_ATTEMPTS = 8


class ProviderRevoker:
    def __init__(
        self,
        engine: AsyncEngine,
        cipher: TokenCipher,
        registry: ProviderRegistry,
        client: OAuthClient,
        clock: Clock,
        owner: str,
        lease: timedelta,
        *,
        invalidate: Invalidate | None = None,
    ) -> None:
        """``invalidate``: the cache's, called for every committed write."""
        self.engine = engine
        self.cipher = cipher
        self.registry = registry
        self.client = client
        self.clock = clock
        self.owner = owner
        self.lease = lease
        self.minter = Minter(client)
        self.invalidate = invalidate
        # Shutdown: the revocation under way finishes; the rest of the batch is given back.
        self.draining = False

    async def revoke(self, stored: StoredIntegration) -> Revocation:
        integration = stored.integration
        if integration.provider not in self.registry:
            return Revocation.NOT_SUPPORTED
        try:
            profile = self.registry.resolve(integration.provider, integration.metadata)
        except ProviderMisconfigured as exc:
            # Its endpoints cannot be named (a template value is missing): like a provider
            # without a client, nothing can be sent.
            log.warning("integration %s: cannot revoke (%s)", integration.id, exc.message)
            return Revocation.NOT_SUPPORTED
        try:
            calls = self._calls(stored, profile)
        except CiphertextInvalid:
            log.error("integration %s: cannot decrypt its tokens to revoke them", integration.id)
            return Revocation.FAILED
        if calls is None:
            return Revocation.NOT_SUPPORTED
        try:
            for call in calls:
                await call()
        except RevocationNotSupported:
            return Revocation.NOT_SUPPORTED
        except ProviderUnavailable as exc:
            log.warning("integration %s: revocation pending (%s)", integration.id, exc.message)
            return Revocation.PENDING
        except BrokerError as exc:
            log.warning("integration %s: revocation refused (%s)", integration.id, exc.reason)
            return Revocation.FAILED
        return Revocation.REVOKED

    def _calls(
        self, stored: StoredIntegration, profile: ProviderProfile
    ) -> list[Callable[[], Awaitable[None]]] | None:
        """The provider calls that revoke what the integration holds; None: nothing can be.

        Authorization code: the refresh token first, then the access token (RFC 7009). Of the
        other kinds only a GitHub installation token can be revoked (DELETE
        /installation/token); API keys, passwords, client secrets and private keys are their
        owner's to revoke at the provider, and other minted tokens simply expire.
        """
        integration = stored.integration
        owner = Owner.of(integration)
        kind = integration.credential_type
        if kind is Kind.AUTHORIZATION_CODE:
            if not profile.revocation_url:
                return None
            held = ((REFRESH, stored.refresh_token_ct), (ACCESS, stored.access_token_ct))
            return [
                partial(self.client.revoke, profile, self.cipher.decrypt(owner, hint, blob), hint)
                for hint, blob in held
                if blob is not None
            ]
        if kind is Kind.GITHUB_APP_INSTALLATION and stored.access_token_ct is not None:
            token = self.cipher.decrypt(owner, ACCESS, stored.access_token_ct)
            return [partial(self.minter.revoke_installation_token, profile, token)]
        return None

    async def settle(self, integration_id: str, outcome: Revocation, attempts: int) -> None:
        values: dict[str, Any] = {
            "revocation": outcome.value,
            "revocation_attempts": attempts,
            "refresh_lease_owner": None,
            "refresh_lease_until": None,
            "refresh_lease_session": None,
        }
        if outcome is Revocation.PENDING and attempts >= MAX_ATTEMPTS:
            values["revocation"] = Revocation.FAILED.value
            log.error(
                "integration %s: revocation failed after %d attempts", integration_id, attempts
            )
        if values["revocation"] == Revocation.PENDING.value:
            delay = min(3600.0, 5.0 * 2 ** (attempts - 1))
            values["next_revocation_at"] = self.clock() + timedelta(seconds=delay)
        else:
            values.update(
                access_token_ct=None, refresh_token_ct=None, credential_ct=None, key_id=None
            )
            values["next_revocation_at"] = None
        async with write_transaction(self.engine, self.invalidate) as conn:
            current = await repository.get(conn, integration_id, for_update=True)
            if current is not None:
                await repository.update_row(
                    conn, integration_id, current.integration.version, values
                )
                if values["revocation"] != Revocation.PENDING.value:
                    await events.revocation_settled(
                        conn, current.integration, self.clock(), Revocation(values["revocation"])
                    )

    async def retry_pending(self, limit: int = 50) -> int:
        """One pass over PENDING revocations that are due; returns how many were tried."""
        now = self.clock()
        async with write_transaction(self.engine, self.invalidate) as conn:
            ids = await repository.claim_pending_revocations(
                conn, now, now + self.lease, self.owner, limit
            )
        for n, iid in enumerate(ids):
            if self.draining:
                await self._release(ids[n:])
                break
            async with storage_errors(), self.engine.connect() as conn:
                stored = await repository.get(conn, iid)
            if stored is None:
                continue
            outcome = await self.revoke(stored)
            await self.settle(iid, outcome, stored.revocation_attempts + 1)
        return len(ids)

    def stop_claiming(self) -> None:
        """Shutdown: the revocation under way finishes; the rest of the batch is given back."""
        self.draining = True

    async def _release(self, ids: list[str]) -> None:
        async with write_transaction(self.engine, self.invalidate) as conn:
            for iid in ids:
                await repository.release_lease(conn, iid, self.owner, {})
        log.info("shutdown: gave back %d pending revocation(s) not started", len(ids))

    async def run_background(self, interval: float, stop: asyncio.Event | None = None) -> None:
        await periodic.every(
            interval, self.retry_pending, "revocation retries", "%d tried", stop=stop
        )
