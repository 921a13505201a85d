"""The integration service: store, read, serve, list and disconnect integrations. Owns
transactions; talks to crypto, storage and (via the refresh engine and revoker) providers.
Knows nothing about gRPC."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Container, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.domain import context, credentials, events, validation
from broker.domain.cache import IntegrationCache
from broker.domain.paging import decode_page_token, encode_page_token
from broker.domain.tokens import REFRESH, TokenCipher, check_servable, remaining
from broker.domain.usage import UsageNotes
from broker.errors import (
    AmbiguousIntegration,
    IntegrationNotFound,
    InvalidArgument,
    ReauthorizationRequired,
    StorageUnavailable,
    TokenExposureDenied,
    UnknownProvider,
)
from broker.model import (
    AccessToken,
    Clock,
    Integration,
    Kind,
    Owner,
    Page,
    Revocation,
    Selector,
    Status,
    StoreCommand,
    StoredIntegration,
    TokenRequest,
    utcnow,
)
from broker.providers.catalog import BUILTINS
from broker.providers.profile import AUTHORIZATION_CODE, ProviderProfile
from broker.storage import repository
from broker.storage.changes import Invalidate
from broker.storage.engine import storage_errors, write_transaction

log = logging.getLogger("broker.service")


class Refresher(Protocol):
    """The refresh engine (``broker.domain.refresh``): one refresh per integration at a time."""

    def due(
        self, stored: StoredIntegration, request: TokenRequest, now: datetime | None = None
    ) -> bool:
        """True when the token should be refreshed before it is served (at ``now``, read
        from the clock when not given)."""
        ...

    async def refresh(self, stored: StoredIntegration, request: TokenRequest) -> AccessToken: ...


class RowReader(Protocol):
    """Reads one integration by id outside the engine's pool (``broker.storage.reader``)."""

    async def read(self, integration_id: str) -> StoredIntegration | None: ...


class ProfileLookup(Protocol):
    """What StoreIntegration needs to know of a provider profile (the provider registry)."""

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> ProviderProfile: ...


class Revoker(Protocol):
    """Provider-side revocation (``broker.domain.revocation``)."""

    async def revoke(self, stored: StoredIntegration) -> Revocation: ...

    async def settle(self, integration_id: str, outcome: Revocation, attempts: int) -> None:
        """Record the outcome; wipe the ciphertexts unless it is PENDING."""
        ...


class IntegrationService:
    def __init__(
        self,
        engine: AsyncEngine,
        cipher: TokenCipher,
        providers: Container[str],
        clock: Clock = utcnow,
        refresher: Refresher | None = None,
        revoker: Revoker | None = None,
        aliases: Mapping[str, str] | None = None,
        profiles: ProfileLookup | None = None,
        *,
        cache: IntegrationCache | None = None,
        reader: RowReader | None = None,
        usage: UsageNotes | None = None,
    ) -> None:
        """``cache``: the hot-path cache; its invalidation is called for every committed
        write. ``reader``: the read by id of a cache miss outside the engine's pool (its own
        pool on PostgreSQL, sqlite3 on a SQLite file). ``usage``: where serving an access token
        is noted (``last_used_at``, written in batches)."""
        self.usage = usage
        # Credential kinds and endpoints per provider; None: every kind is accepted.
        self.profiles = profiles
        self.aliases = dict(aliases or {})
        self.cache = cache
        self.invalidate: Invalidate | None = None if cache is None else cache.invalidate
        self.reader = reader
        self.engine = engine
        self.cipher = cipher
        self.providers = providers
        self.clock = clock
        self.refresher = refresher
        self.revoker = revoker

    def canonical(self, provider: str) -> str:
        """Aliases ("x" for twitter) are stored under the provider's one name."""
        return self.aliases.get(provider, provider)

    # -- lookups ---------------------------------------------------------------------------

    async def _resolve(self, conn: AsyncConnection, sel: Selector) -> StoredIntegration:
        if sel.integration_id:
            stored = await repository.read(conn, sel.integration_id)
            if stored is None:
                raise IntegrationNotFound.for_id(sel.integration_id)
            return stored
        provider = self.canonical(sel.provider)
        found = await repository.find_by_owner(conn, sel.user_id, provider, sel.account_id)
        if not found:
            account = "" if sel.account_id is None else f", account {sel.account_id!r}"
            raise IntegrationNotFound(
                f"user {sel.user_id!r} has no {sel.provider!r} integration{account}",
                provider=sel.provider,
            )
        if len(found) > 1:
            raise AmbiguousIntegration(
                f"user {sel.user_id!r} has several {sel.provider!r} accounts; give account_id "
                "or integration_id",
                provider=sel.provider,
            )
        return found[0]

    async def read(self, sel: Selector, *, cached: bool = True) -> StoredIntegration:
        """``cached`` False: from the database even when the cache holds the row (metadata
        the cache is not kept fresh for, such as ``last_used_at``)."""
        validation.selector(sel)
        provider = self.canonical(sel.provider) if sel.provider else ""
        context.note_request(sel.integration_id, sel.user_id, provider)
        context.check_owner(sel.user_id, provider)
        cache = self.cache
        stored = cache.get(sel, provider) if cache is not None and cached else None
        if stored is None:
            seen = cache.seq if cache is not None else 0
            reader = self.reader
            if reader is not None and sel.integration_id:
                async with storage_errors():
                    stored = await reader.read(sel.integration_id)
                if stored is None:
                    raise IntegrationNotFound.for_id(sel.integration_id)
            else:
                async with storage_errors(), self.engine.connect() as conn:
                    stored = await self._resolve(conn, sel)
            if cache is not None:
                cache.put(sel, stored, seen)
        context.note(stored.integration)
        if sel.integration_id and not context.may_see(stored.integration):
            # Another user's or provider's id is answered as a missing one, word for word:
            # PERMISSION_DENIED here would confirm that the id exists and whose it is.
            raise IntegrationNotFound.for_id(sel.integration_id)
        context.check_integration(stored.integration)
        return stored

    async def get(self, sel: Selector) -> Integration:
        return self.with_pending_use((await self.read(sel, cached=False)).integration)

    def with_pending_use(self, integration: Integration) -> Integration:
        """``last_used_at`` including a use this process noted and has not written yet."""
        pending = None if self.usage is None else self.usage.pending(integration.id)
        if pending is None or (
            integration.last_used_at is not None and integration.last_used_at >= pending
        ):
            return integration
        return replace(integration, last_used_at=pending)

    async def list(
        self,
        user_id: str,
        provider: str,
        status: Status | None,
        page_size: int,
        page_token: str,
    ) -> Page:
        validation.text("user_id", user_id, validation.MAX_ID)
        validation.text("provider", provider, validation.MAX_PROVIDER, required=False)
        size = validation.page_size(page_size)
        after = decode_page_token(page_token) if page_token else None
        provider = self.canonical(provider) if provider else ""
        context.note_owner(user_id, provider or None)
        context.check_owner(user_id, provider)
        grant = context.current_grant()
        async with storage_errors(), self.engine.connect() as conn:
            rows = await repository.list_page(
                conn,
                user_id,
                provider,
                status,
                after,
                size + 1,
                context.allowed_providers(),
                (grant.providers, grant.integration_ids) if grant is not None else None,
            )
        items = [self.with_pending_use(r.integration) for r in rows[:size]]
        more = len(rows) > size
        return Page(items, encode_page_token(items[-1]) if more and items else "")

    async def list_across_users(
        self, provider: str, status: Status | None, page_size: int, page_token: str
    ) -> Page:
        """Every user's integrations (the operator's ``broker integrations list``; no RPC
        lists across users)."""
        validation.text("provider", provider, validation.MAX_PROVIDER, required=False)
        size = validation.page_size(page_size)
        after = decode_page_token(page_token) if page_token else None
        provider = self.canonical(provider) if provider else ""
        async with storage_errors(), self.engine.connect() as conn:
            rows = await repository.list_page(conn, None, provider, status, after, size + 1)
        items = [r.integration for r in rows[:size]]
        more = len(rows) > size
        return Page(items, encode_page_token(items[-1]) if more and items else "")

    # -- store -----------------------------------------------------------------------------

    async def store(self, cmd: StoreCommand) -> tuple[Integration, bool]:
        if cmd.credential is not None:
            validation.text("user_id", cmd.user_id, validation.MAX_ID)
            validation.text("provider", cmd.provider, validation.MAX_PROVIDER)
            validation.text("account_id", cmd.account_id, validation.MAX_ID, required=False)
            return await self._store_credential(cmd)
        return await self._upsert(self.prepare(cmd))

    def prepare(self, cmd: StoreCommand) -> StoreCommand:
        """StoreIntegration's checks of OAuth tokens (each failure names its field), and the
        command as it is stored: canonical provider, expiry resolved."""
        validation.text("user_id", cmd.user_id, validation.MAX_ID)
        validation.text("provider", cmd.provider, validation.MAX_PROVIDER)
        validation.text("account_id", cmd.account_id, validation.MAX_ID, required=False)
        validation.token("access_token", cmd.tokens.access_token, required=True)
        validation.token("refresh_token", cmd.tokens.refresh_token or "", required=False)
        validation.text(
            "token_type", cmd.tokens.token_type, validation.MAX_TOKEN_TYPE, required=False
        )
        validation.scopes("scopes", cmd.tokens.scopes)
        validation.metadata(cmd.metadata)
        cmd = self._owner(cmd, Kind.AUTHORIZATION_CODE)
        now = self.clock()
        expires_at = validation.expiry(cmd.tokens.expires_at, cmd.expires_in_seconds, now)
        lapses = validation.expiry(
            cmd.tokens.refresh_token_expires_at,
            cmd.refresh_token_expires_in_seconds,
            now,
            ("refresh_token_expires_at", "refresh_token_expires_in_seconds"),
        )
        if lapses is not None and not cmd.tokens.refresh_token:
            field = (
                "refresh_token_expires_at"
                if cmd.tokens.refresh_token_expires_at is not None
                else "refresh_token_expires_in_seconds"
            )
            raise InvalidArgument(field, "give it only with refresh_token")
        tokens = replace(cmd.tokens, expires_at=expires_at, refresh_token_expires_at=lapses)
        return replace(cmd, tokens=tokens, refresh_token_expires_in_seconds=None)

    async def insert_new_in(
        self, conn: AsyncConnection, cmds: Sequence[StoreCommand]
    ) -> Sequence[Integration]:
        """StoreIntegration's insert of ``prepare``d commands whose owners have no integration
        yet, many in one statement (``broker import``). The caller writes their CONNECTED and
        audit events in the same transaction."""
        now = self.clock()
        rows = []
        for cmd in cmds:
            iid = str(uuid.uuid4())
            owner = Owner(iid, cmd.user_id, cmd.provider, cmd.account_id, _kind(cmd).value)
            rows.append(
                {
                    # One statement for every row: each names every column.
                    "refresh_token_ct": None,
                    "refresh_token_expires_at": None,
                    "refresh_token_used_at": None,
                    **self._connected_values(now, cmd),
                    **self._secret_values(owner, cmd, now),
                    "id": iid,
                    "user_id": cmd.user_id,
                    "provider": cmd.provider,
                    "account_id": cmd.account_id,
                    "created_at": now,
                    "version": 1,
                }
            )
        await repository.insert_rows(conn, rows)
        return [
            Integration(
                id=r["id"],
                user_id=r["user_id"],
                provider=r["provider"],
                account_id=r["account_id"],
                status=Status.CONNECTED,
                token_type=r["token_type"],
                scopes=tuple(r["scopes"]),
                metadata=r["metadata"],
                created_at=now,
                updated_at=now,
                expires_at=r["expires_at"],
                refresh_token_expires_at=r["refresh_token_expires_at"],
                last_refreshed_at=None,
                disconnected_at=None,
                disconnect_reason=None,
                has_refresh_token=r["refresh_token_ct"] is not None,
                version=1,
                credential_type=Kind(r["credential_type"]),
            )
            for r in rows
        ]

    def _connected_values(self, now: datetime, cmd: StoreCommand) -> dict[str, Any]:
        return {
            "status": Status.CONNECTED.value,
            "metadata": cmd.metadata,
            "updated_at": now,
            "disconnected_at": None,
            "disconnect_reason": None,
            "revocation": None,
            "refresh_failures": 0,
            "last_refresh_error": None,
            # New tokens or a new credential end any back-off from the old ones' failures.
            "next_refresh_at": None,
        }

    async def store_in(self, conn: AsyncConnection, cmd: StoreCommand) -> tuple[Integration, bool]:
        """StoreIntegration's write of a ``prepare``d command (row, event, audit) in a
        transaction the caller owns: ``broker import`` commits a batch of rows in one."""
        return await self._store(conn, cmd)

    async def _store_credential(self, cmd: StoreCommand) -> tuple[Integration, bool]:
        tokens = cmd.tokens
        given = [
            name
            for name, value in (
                ("access_token", tokens.access_token),
                ("refresh_token", tokens.refresh_token),
                ("token_type", tokens.token_type),
                ("expires_at", tokens.expires_at),
                ("expires_in_seconds", cmd.expires_in_seconds),
                ("refresh_token_expires_at", tokens.refresh_token_expires_at),
                ("refresh_token_expires_in_seconds", cmd.refresh_token_expires_in_seconds),
            )
            if value
        ]
        if given:
            raise InvalidArgument(
                "credential",
                f"give credential or the OAuth token fields, not both (also given: "
                f"{', '.join(given)})",
            )
        given_credential = cmd.credential
        assert given_credential is not None
        # The provider first: a kind it does not take is refused before its fields are read.
        cmd = self._owner(cmd, given_credential.kind)
        profiles = self.profiles
        profile = (
            profiles.get(cmd.provider)
            if profiles is not None and cmd.provider in profiles
            else None
        )
        credential = credentials.validate(given_credential, profile)
        validation.scopes("scopes", tokens.scopes)
        validation.metadata(cmd.metadata)
        return await self._upsert(replace(cmd, credential=credential))

    def _owner(self, cmd: StoreCommand, kind: Kind) -> StoreCommand:
        """Check the provider (known, allowed to the caller, serves this kind); canonical name."""
        if cmd.provider not in self.providers:
            raise UnknownProvider(cmd.provider)
        cmd = replace(cmd, provider=self.canonical(cmd.provider))
        context.note_owner(cmd.user_id, cmd.provider)
        context.check_owner(cmd.user_id, cmd.provider)
        profiles = self.profiles
        if profiles is None:
            return cmd
        found: ProviderProfile | None
        if cmd.provider in profiles:
            found = profiles.get(cmd.provider)
            kinds = found.kinds
        else:
            # A built-in without a configured client still stores authorization-code tokens.
            found = BUILTINS.get(cmd.provider)
            kinds = frozenset({AUTHORIZATION_CODE})
        if found is not None:
            # Endpoints templated per integration ({subdomain}, {shop}) take the value from
            # its metadata: refused now, not at its first refresh.
            problem = found.template_problem(cmd.metadata)
            if problem is not None:
                raise InvalidArgument(*problem)
        if kind.value not in kinds:
            field = "credential" if cmd.credential is not None else "access_token"
            raise InvalidArgument(
                field,
                f"provider {cmd.provider!r} does not take {kind.value} credentials (it takes "
                f"{', '.join(sorted(kinds))}; see providers.{cmd.provider}.kinds)",
            )
        return cmd

    async def _upsert(self, cmd: StoreCommand) -> tuple[Integration, bool]:
        await self._revoke_before_reconnect(cmd)
        # Two stores of one new owner can race to INSERT; the loser retries as an UPDATE.
        for _attempt in range(3):
            try:
                async with write_transaction(self.engine, self.invalidate) as conn:
                    return await self._store(conn, cmd)
            except IntegrityError:
                continue
        raise StorageUnavailable(  # pragma: no cover - three lost races in a row
            "concurrent writes to this integration kept conflicting; retry"
        )

    async def _revoke_before_reconnect(self, cmd: StoreCommand) -> None:
        """A reconnect replaces the tokens of a disconnected integration. If that one's
        revocation is still PENDING, try it now: once overwritten, the old grant could never
        be revoked by the broker again."""
        if self.revoker is None:
            return
        async with storage_errors(), self.engine.connect() as conn:
            found = await repository.find_by_owner(
                conn, cmd.user_id, cmd.provider, cmd.account_id, limit=1
            )
        if not found or found[0].revocation != Revocation.PENDING.value:
            return
        old = found[0]
        outcome = await self.revoker.revoke(old)
        await self.revoker.settle(old.integration.id, outcome, old.revocation_attempts + 1)
        if outcome is Revocation.PENDING:
            log.error(
                "integration %s reconnected while the revocation of its previous grant was "
                "still pending; that grant could not be revoked and must be revoked at %s",
                old.integration.id,
                old.integration.provider,
            )

    async def _store(self, conn: AsyncConnection, cmd: StoreCommand) -> tuple[Integration, bool]:
        now = self.clock()
        common = self._connected_values(now, cmd)
        tokens = cmd.tokens
        # Locked until commit, so concurrent stores of one owner take turns (the last one
        # wins) instead of failing each other's version check; only two that both find no
        # row yet race, to the INSERT, and ``_upsert`` retries the loser as an update.
        existing = await repository.find_by_owner(
            conn, cmd.user_id, cmd.provider, cmd.account_id, limit=1, for_update=True
        )
        if existing:
            current = existing[0]
            iid = current.integration.id
            owner = Owner.of(current.integration, _kind(cmd))
            values = {**common, **self._secret_values(owner, cmd, now)}
            if (
                cmd.credential is None
                and not tokens.refresh_token
                and current.refresh_token_ct is not None
            ):
                # Keep the refresh token the broker already has (as on a refresh without one),
                # re-encrypted so the whole row uses the primary key and the owner binding.
                old = self.cipher.decrypt(
                    Owner.of(current.integration), REFRESH, current.refresh_token_ct
                )
                values["refresh_token_ct"] = self.cipher.encrypt(owner, REFRESH, old)
            if not await repository.update_row(conn, iid, current.integration.version, values):
                raise IntegrityError("concurrent update", None, Exception("version changed"))
            created = False
        else:
            iid = str(uuid.uuid4())
            owner = Owner(iid, cmd.user_id, cmd.provider, cmd.account_id, _kind(cmd).value)
            values = {
                **common,
                **self._secret_values(owner, cmd, now),
                "id": iid,
                "user_id": cmd.user_id,
                "provider": cmd.provider,
                "account_id": cmd.account_id,
                "created_at": now,
                "version": 1,
            }
            await repository.insert_row(conn, values)
            created = True
        stored = await repository.get(conn, iid)
        assert stored is not None
        context.note(stored.integration)
        await context.audit_in(conn)
        await events.connected(conn, stored.integration, now, created)
        return stored.integration, created

    def _secret_values(self, owner: Owner, cmd: StoreCommand, now: datetime) -> dict[str, Any]:
        credential = cmd.credential
        if credential is None:
            values = {
                **self.cipher.token_values(owner, cmd.tokens),
                "credential_type": Kind.AUTHORIZATION_CODE.value,
                "credential_ct": None,
            }
            if cmd.tokens.refresh_token:
                # A new refresh token: its own expiry, and the keep-alive's idle clock starts.
                values["refresh_token_expires_at"] = cmd.tokens.refresh_token_expires_at
                values["refresh_token_used_at"] = now
            return values
        kind = credential.kind
        return {
            **self.cipher.credential_values(owner, credential),
            "access_token_ct": None,
            "refresh_token_ct": None,
            "refresh_token_expires_at": None,
            "refresh_token_used_at": None,
            "key_id": self.cipher.keyring.primary_id,
            "token_type": credentials.token_type(kind),
            # A minted kind has no token yet: due at once, minted by the first caller (or the
            # background refresher). Static kinds do not expire.
            "expires_at": now if kind.minted else None,
            "scopes": list(cmd.tokens.scopes or credentials.requested_scopes(credential)),
            "next_refresh_at": None,
        }

    # -- access tokens ---------------------------------------------------------------------

    async def get_access_token(self, req: TokenRequest) -> AccessToken:
        call = context.current_call.get()
        if call is not None and call.caller.proxy_only:
            raise TokenExposureDenied(
                f"caller {call.caller.name!r} is proxy-only: call the provider through Proxy, "
                "the token is not handed out"
            )
        validation.duration("min_valid_for", req.min_valid_for)
        validation.scopes("required_scopes", req.required_scopes)
        stored = await self.read(req.selector)
        return await self.serve(stored, req)

    async def serve(self, stored: StoredIntegration, req: TokenRequest) -> AccessToken:
        check_servable(stored, req.required_scopes)
        now = self.clock()
        left = remaining(stored.integration.expires_at, now)
        valid = left is None or left >= req.min_valid_for
        refresher = self.refresher
        if (
            refresher is not None
            and stored.renewable
            and (req.force_refresh or refresher.due(stored, req, now))
        ):
            token = await refresher.refresh(stored, req)
            if self.usage is not None:
                self.usage.note(stored.integration.id, now)
            return token
        if not valid:
            await self._mark_expired(stored)
            raise ReauthorizationRequired(
                f"the access token of integration {stored.integration.id} is not valid for the "
                f"requested {int(req.min_valid_for.total_seconds())}s and there is no way to "
                "refresh it; the user must authorize again",
                integration_id=stored.integration.id,
            )
        token = self.cipher.access_token(stored)
        if self.usage is not None:
            self.usage.note(stored.integration.id, now)
        return token

    async def _mark_expired(self, stored: StoredIntegration) -> None:
        left = remaining(stored.integration.expires_at, self.clock())
        if stored.integration.status is not Status.CONNECTED or left is None or left > timedelta(0):
            return
        now = self.clock()
        async with write_transaction(self.engine, self.invalidate) as conn:
            if await repository.update_row(
                conn,
                stored.integration.id,
                stored.integration.version,
                {"status": Status.EXPIRED.value, "updated_at": now},
            ):
                await events.record(
                    conn,
                    events.EventType.EXPIRED,
                    stored.integration,
                    now,
                    reason="TOKEN_EXPIRED",
                    message="the access token expired and there is no refresh token",
                )

    # -- disconnect ------------------------------------------------------------------------

    async def disconnect(
        self, sel: Selector, reason: str, skip_revocation: bool
    ) -> tuple[Integration, Revocation]:
        """Stop serving first, then revoke at the provider, then wipe the ciphertexts.

        The integration is DISCONNECTED (and never served again) from the first commit on;
        the ciphertexts stay only while a revocation is PENDING, for its retries.
        """
        reason = validation.caller_text("reason", reason)
        stored = await self.read(sel)
        if stored.integration.status is Status.DISCONNECTED:
            return stored.integration, Revocation(stored.revocation or Revocation.SKIPPED.value)
        revoke = not skip_revocation and self.revoker is not None
        now = self.clock()
        values: dict[str, Any] = {
            "status": Status.DISCONNECTED.value,
            "disconnected_at": now,
            "disconnect_reason": reason or None,
            "updated_at": now,
            "revocation": (Revocation.PENDING if revoke else Revocation.SKIPPED).value,
            "revocation_attempts": 0,
            "next_revocation_at": None,
        }
        if not revoke:
            values.update(_WIPE)
        iid = stored.integration.id
        async with write_transaction(self.engine, self.invalidate) as conn:
            # FOR UPDATE: a refresh writing at this moment lands first or loses its CAS.
            current = await repository.get(conn, iid, for_update=True)
            if current is None:
                raise IntegrationNotFound.for_id(iid)
            await repository.update_row(conn, iid, current.integration.version, values)
            await context.audit_in(conn)
            await events.record(
                conn,
                events.EventType.DISCONNECTED,
                current.integration,
                now,
                reason="DISCONNECTED",
                message=reason,
                revocation=Revocation.SKIPPED.value if skip_revocation else None,
            )
        if not revoke:
            outcome = Revocation.SKIPPED if skip_revocation else Revocation.NOT_SUPPORTED
            if outcome is Revocation.NOT_SUPPORTED:
                await self._set_revocation(iid, outcome)
        else:
            assert self.revoker is not None
            outcome = await self.revoker.revoke(current)
            await self.revoker.settle(iid, outcome, attempts=1)
        async with storage_errors(), self.engine.connect() as conn:
            updated = await repository.get(conn, iid)
        assert updated is not None
        return updated.integration, outcome

    async def _set_revocation(self, iid: str, outcome: Revocation) -> None:
        async with write_transaction(self.engine, self.invalidate) as conn:
            current = await repository.get(conn, iid)
            if current is not None:
                await repository.update_row(
                    conn, iid, current.integration.version, {"revocation": outcome.value}
                )
                await events.revocation_settled(conn, current.integration, self.clock(), outcome)


def _kind(cmd: StoreCommand) -> Kind:
    return Kind.AUTHORIZATION_CODE if cmd.credential is None else cmd.credential.kind


# Ciphertexts are wiped once nothing more will be done with them.
_WIPE: dict[str, Any] = {
    "access_token_ct": None,
    "refresh_token_ct": None,
    "credential_ct": None,
    "key_id": None,
}
