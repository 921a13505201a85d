"""Where a refresh meets the database after its lease is taken: giving the lease back (with a
failure's bookkeeping and event), recording a grant the provider refused, writing new tokens
with ``version + 1`` (compare-and-swap) and keeping the tokens a provider issued that the
database would not take.

Those are never dropped: for a provider that rotates refresh tokens the old one is already
dead. They are held in memory, served, and retried until stored (by the next flight of the
integration, every background pass, and once more at shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.domain import events
from broker.errors import (
    GrantRejected,
    IntegrationNotFound,
    ReauthorizationRequired,
    StorageUnavailable,
)
from broker.model import Clock, Status, StoredIntegration
from broker.storage import repository
from broker.storage.changes import Invalidate
from broker.storage.engine import write_transaction

log = logging.getLogger("broker.refresh")

_PERSIST_ATTEMPTS = 5

EventWrite = Callable[[AsyncConnection], Awaitable[object]]


def no_session() -> int | None:
    return None


def _secret_name(row: StoredIntegration) -> str:
    kind = row.integration.credential_type
    return f"{kind.value} credential" if kind.minted else "refresh token"


@dataclass(frozen=True, slots=True)
class Holder:
    """This process as a lease holder: its name on the leases it takes, how long they last,
    the key of its session lock (PostgreSQL; None while not held, or on SQLite: the lease is
    then bounded by its time alone), and the database it writes to, with the cache's
    invalidation called for every committed write."""

    engine: AsyncEngine
    owner: str
    lease: timedelta
    session: Callable[[], int | None] = no_session
    invalidate: Invalidate | None = None

    def transaction(
        self, *, writes_first: bool = False
    ) -> AbstractAsyncContextManager[AsyncConnection]:
        """``writes_first``: the transaction's first statement writes (a claim, a store, a
        release), so on SQLite it takes the write lock itself, without a ``BEGIN IMMEDIATE``
        of its own."""
        return write_transaction(self.engine, self.invalidate, immediate=not writes_first)


@dataclass(slots=True)
class _Unsaved:
    """New tokens the provider issued that are not in the database yet."""

    base_version: int
    values: dict[str, Any]
    stored: StoredIntegration
    before: StoredIntegration | None = None  # the row refreshed, for its RECOVERED event


class TokenStore:
    """Writes of one broker's refreshes, and the tokens still waiting to be stored."""

    def __init__(self, holder: Holder, clock: Clock) -> None:
        self.holder = holder
        self.clock = clock
        self._unsaved: dict[str, _Unsaved] = {}

    def __contains__(self, iid: object) -> bool:
        """Whether tokens of this integration are held in memory, not stored yet."""
        return iid in self._unsaved

    async def release(
        self, iid: str, values: dict[str, Any], event: EventWrite | None = None
    ) -> None:
        """Give the lease back, writing ``values`` (and ``event``) with it."""
        try:
            async with self.holder.transaction(writes_first=True) as conn:
                released = await repository.release_lease(conn, iid, self.holder.owner, values)
                if released and event is not None:
                    await event(conn)
        except StorageUnavailable:
            # The lease lapses by itself; nothing was rotated, so nothing is lost.
            log.warning("could not release the refresh lease of integration %s", iid)

    async def rejected(self, row: StoredIntegration, exc: GrantRejected) -> StoredIntegration:
        """The provider refused the row's grant: it needs reauthorization, unless the row moved
        meanwhile (another writer refreshed first: its token is served)."""
        iid = row.integration.id
        async with self.holder.transaction() as conn:
            current = await repository.get(conn, iid)
            if current is None:
                raise IntegrationNotFound.for_id(iid)
            if current.integration.version != row.integration.version:
                # The row changed under us: another writer refreshed or replaced the tokens,
                # so the provider rejected a refresh token that is no longer ours to use.
                await repository.release_lease(conn, iid, self.holder.owner, {})
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

    async def persist(self, row: StoredIntegration, values: dict[str, Any]) -> StoredIntegration:
        """Store new tokens for the leased ``row``; when the database will not take them, hold
        them in memory and return the row they make."""
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
        pending = _Unsaved(row.integration.version, values, _in_memory(row, values), row)
        self._unsaved[iid] = pending
        return pending.stored

    async def _write(
        self,
        iid: str,
        version: int,
        values: dict[str, Any],
        before: StoredIntegration | None = None,
    ) -> StoredIntegration:
        async with self.holder.transaction(writes_first=True) as conn:
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

    async def retry_unsaved(self, iid: str) -> StoredIntegration:
        """Try once more to store the tokens held for ``iid``; the row they make either way."""
        pending = self._unsaved[iid]
        try:
            return await self._write(iid, pending.base_version, pending.values, pending.before)
        except StorageUnavailable:
            return pending.stored

    async def flush_unsaved(self) -> int:
        """Try to store every token set still held in memory; returns how many remain."""
        for iid in list(self._unsaved):
            with contextlib.suppress(StorageUnavailable):
                await self.retry_unsaved(iid)
        return len(self._unsaved)


def _in_memory(row: StoredIntegration, values: dict[str, Any]) -> StoredIntegration:
    integration = replace(
        row.integration,
        status=Status.CONNECTED,
        token_type=values["token_type"],
        expires_at=values["expires_at"],
        scopes=tuple(values["scopes"]),
        last_refreshed_at=values["last_refreshed_at"],
        has_refresh_token=values.get("refresh_token_ct", row.refresh_token_ct) is not None,
        refresh_token_expires_at=values.get(
            "refresh_token_expires_at", row.integration.refresh_token_expires_at
        ),
    )
    return replace(
        row,
        integration=integration,
        access_token_ct=values["access_token_ct"],
        refresh_token_ct=values.get("refresh_token_ct", row.refresh_token_ct),
    )
