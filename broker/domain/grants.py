"""Run-scoped grants: create, present, revoke, list, purge.

Presenting a grant is on the GetAccessToken hot path, so grants are cached per process by
token hash. The cache follows the integration cache's rules: every revocation this process
commits drops the entry; other replicas' revocations arrive as PostgreSQL notifications
(``broker.storage.notify``) and other processes' as SQLite change-log rows
(``broker.storage.changes``); while those cannot be heard the cache is bypassed. An expired
grant is refused from its cached ``expires_at``, with no database trip.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.domain import context, periodic, validation
from broker.domain.context import Caller
from broker.domain.integrations import IntegrationService
from broker.domain.paging import decode_page_token, encode_page_token
from broker.errors import (
    GrantAudience,
    GrantExpired,
    GrantInvalid,
    GrantNotFound,
    GrantRequired,
    GrantRevoked,
    GrantScope,
    InvalidArgument,
    PermissionDenied,
    TokenExposureDenied,
    UnknownProvider,
)
from broker.grant import (
    PROXY_METHOD,
    READ_METHODS,
    TOKEN_METHOD,
    TOKEN_PREFIX,
    Grant,
    new_token,
    token_hash,
)
from broker.model import Clock, Selector
from broker.storage import grants as store
from broker.storage.engine import storage_errors

log = logging.getLogger("broker.grants")

DEFAULT_TTL = timedelta(minutes=15)
# Expired grants stay this long before the purge deletes them, so a late runner is told
# "expired" rather than "unknown grant".
PURGE_GRACE = timedelta(hours=1)
# SQLite change-log rows older than this are gone; a broker polls it on every read.
CHANGE_LOG_KEEP = timedelta(minutes=10)
MAX_ENTRIES = 256  # providers or integration ids per grant, audience names
# cbg_ + 43 base64url characters; anything far longer is not one of ours.
MAX_TOKEN = 128


@dataclass(frozen=True, slots=True)
class CreatedGrant:
    grant: Grant
    # Returned to the issuer once; never stored, logged or shown again.
    token: str

    def __repr__(self) -> str:
        return f"CreatedGrant(grant={self.grant!r}, token=<hidden>)"


@dataclass(frozen=True, slots=True)
class GrantPage:
    grants: list[Grant]
    next_page_token: str


class GrantCache:
    """Grants by token hash. ``put`` takes the invalidation count seen before the database
    read and refuses if any revocation was heard since: the row read may predate it."""

    def __init__(self, max_entries: int, *, enabled: bool = True, available: bool = True) -> None:
        self.max_entries = max_entries
        self.enabled = enabled
        self.available = available
        self._by_hash: OrderedDict[str, Grant] = OrderedDict()
        self._hash_by_id: dict[str, str] = {}
        self.seq = 0
        # Set on SQLite: hears other processes' commits before each lookup.
        self.before_read: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.available

    def __len__(self) -> int:
        return len(self._by_hash)

    def get(self, digest: str) -> Grant | None:
        if not self.active:
            return None
        if self.before_read is not None:
            self.before_read()
        return self._by_hash.get(digest)

    def put(self, digest: str, grant: Grant, seen_seq: int) -> None:
        if not self.active or self.seq != seen_seq:
            return
        self._by_hash[digest] = grant
        self._hash_by_id[grant.id] = digest
        while len(self._by_hash) > self.max_entries:
            _, old = self._by_hash.popitem(last=False)
            self._hash_by_id.pop(old.id, None)

    def invalidate(self, grant_id: str, *_ignored: str) -> None:
        self.seq += 1
        digest = self._hash_by_id.pop(grant_id, None)
        if digest is not None:
            self._by_hash.pop(digest, None)

    def flush(self) -> None:
        self.seq += 1
        self._by_hash.clear()
        self._hash_by_id.clear()


class GrantService:
    def __init__(
        self,
        engine: AsyncEngine,
        integrations: IntegrationService,
        cache: GrantCache,
        clock: Clock,
        *,
        callers: Callable[[], Container[str]] | None = None,
    ) -> None:
        """``callers``: the names of the callers in force, for audience checks (the server's,
        following SIGHUP reloads); None: audience names are not checked (tests, CLI)."""
        self.engine = engine
        self.integrations = integrations
        self.cache = cache
        self.clock = clock
        self.callers = callers

    # -- presenting ------------------------------------------------------------------------

    async def admit(self, caller: Caller, method: str, token: str | None) -> Grant:
        """The grant that narrows this call; raises the error saying why it cannot be used."""
        if token is None:
            raise GrantRequired(
                f"caller {caller.name!r} must present a grant (metadata 'x-broker-grant') "
                "created for the run it serves"
            )
        if method not in READ_METHODS:
            raise GrantScope(f"a grant never authorises {method}; grants allow only reads")
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN:
            raise GrantInvalid("the x-broker-grant value is not a grant token of this broker")
        digest = token_hash(token)
        grant = self.cache.get(digest)
        if grant is None:
            seen = self.cache.seq
            async with storage_errors(), self.engine.connect() as conn:
                grant = await store.by_token_hash(conn, digest)
            if grant is None:
                raise GrantInvalid(
                    "the x-broker-grant token is unknown to this broker (never issued here, "
                    "or purged after it expired)"
                )
            self.cache.put(digest, grant, seen)
        # Which grant and run a refusal was about, for the audit event (not secret).
        about = {"grant_id": grant.id, "run_id": grant.run_id}
        if grant.revoked_at is not None:
            raise GrantRevoked(f"grant {grant.id} was revoked", **about)
        if grant.expired(self.clock()):
            raise GrantExpired(
                f"grant {grant.id} expired at {grant.expires_at.isoformat(timespec='seconds')}",
                **about,
            )
        if not grant.admits(caller.name, caller.requires_grant):
            raise GrantAudience(
                f"caller {caller.name!r} is not in the audience of grant {grant.id}", **about
            )
        if method == TOKEN_METHOD and grant.proxy_only:
            raise TokenExposureDenied(
                f"grant {grant.id} is proxy-only: call the provider through Proxy, the token "
                "is not handed out",
                **about,
            )
        if not grant.allows(method):
            raise GrantScope(f"grant {grant.id} does not authorise {method}", **about)
        return grant

    # -- create ----------------------------------------------------------------------------

    async def create(
        self,
        user_id: str,
        providers: tuple[str, ...],
        integration_ids: tuple[str, ...],
        ttl: timedelta | None,
        run_id: str,
        audience: tuple[str, ...],
        proxy_only: bool = False,
    ) -> CreatedGrant:
        validation.text("user_id", user_id, validation.MAX_ID)
        validation.text("run_id", run_id, validation.MAX_ID, required=False)
        for field, values, limit in (
            ("providers", providers, validation.MAX_PROVIDER),
            ("integration_ids", integration_ids, validation.MAX_ID),
            ("audience", audience, 128),
        ):
            if len(values) > MAX_ENTRIES:
                raise InvalidArgument(field, f"has {len(values)} entries; the limit is 256")
            for value in values:
                validation.text(field, value, limit)
        if not providers and not integration_ids:
            raise InvalidArgument(
                "providers", "give at least one provider or integration id for the grant"
            )
        for provider in providers:
            if provider not in self.integrations.providers:
                raise UnknownProvider(provider)
        known = self.callers() if self.callers is not None else None
        for name in audience:
            if known is not None and name not in known:
                raise InvalidArgument("audience", f"{name!r} is not a configured caller")
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidArgument("ttl", "must be positive (or unset for the 15 minute default)")
        canonical = frozenset(self.integrations.canonical(p) for p in providers)
        call = context.current_call.get()
        issuer = call.caller if call is not None else None
        methods = READ_METHODS
        lifetime = ttl or DEFAULT_TTL
        context.note_owner(user_id)
        if issuer is not None:
            # No escalation: a grant carries at most what its issuer may itself read.
            methods = READ_METHODS & issuer.methods
            if not methods:
                raise PermissionDenied(
                    f"caller {issuer.name!r} may read nothing, so it cannot grant reads"
                )
            context.check_owner(user_id)
            for provider in sorted(canonical):
                context.check_provider(provider)
            lifetime = min(lifetime, issuer.max_grant_ttl)
            # An issuer that may not read tokens cannot grant reading them.
            proxy_only = proxy_only or issuer.proxy_only
        if proxy_only:
            if PROXY_METHOD not in methods:
                raise PermissionDenied(
                    "a proxy-only grant authorises Proxy, which the issuing caller may not call"
                )
            methods = methods - {TOKEN_METHOD}
        await self._check_integrations(user_id, integration_ids)
        now = self.clock()
        grant = Grant(
            id=str(uuid.uuid4()),
            user_id=user_id,
            providers=canonical,
            integration_ids=frozenset(integration_ids),
            audience=frozenset(audience),
            methods=frozenset(methods),
            run_id=run_id,
            issuer=issuer.name if issuer is not None else "broker",
            created_at=now,
            expires_at=now + lifetime,
        )
        token = new_token()
        context.note_grant(grant.id, run_id)
        async with storage_errors(), self.engine.begin() as conn:
            await store.insert_grant(conn, grant, token_hash(token))
            await context.audit_in(conn)  # no grant without its event, nor the reverse
        return CreatedGrant(grant, token)

    async def _check_integrations(self, user_id: str, integration_ids: tuple[str, ...]) -> None:
        """Each id must be one of the user's integrations that the issuer may read."""
        for iid in integration_ids:
            stored = await self.integrations.read(Selector(integration_id=iid))
            if stored.integration.user_id != user_id:
                raise InvalidArgument(
                    "integration_ids", f"integration {iid} does not belong to user {user_id!r}"
                )
        # read() noted the last integration on the call; the audit event is about the grant.
        context.note_request("", user_id, "")

    # -- revoke, read ----------------------------------------------------------------------

    async def revoke(self, grant_id: str, run_id: str) -> list[Grant]:
        validation.text("grant_id", grant_id, validation.MAX_ID, required=False)
        validation.text("run_id", run_id, validation.MAX_ID, required=False)
        if bool(grant_id) == bool(run_id):
            raise InvalidArgument("grant_id", "give grant_id or run_id (exactly one)")
        if grant_id:
            found = [await self.get(grant_id)]
        else:
            issuer, users = _scope()
            async with storage_errors(), self.engine.connect() as conn:
                found = await store.list_grants(
                    conn, run_id=run_id, issuer=issuer, users=users, limit=100_000
                )
            found = [g for g in found if _visible(g)]
            context.note_grant("", run_id)
        now = self.clock()
        call = context.current_call.get()
        by = call.caller.name if call is not None else "cli"
        ids = [g.id for g in found]
        async with storage_errors(), self.engine.begin() as conn:
            await store.revoke(conn, ids, now, by)
            revoked = [await store.by_id(conn, gid) for gid in ids]
            await context.audit_in(conn)
        for gid in ids:
            self.cache.invalidate(gid)
        if ids:
            log.info("revoked %d grant(s)", len(ids))
        return [g for g in revoked if g is not None]

    async def get(self, grant_id: str) -> Grant:
        validation.text("grant_id", grant_id, validation.MAX_ID)
        async with storage_errors(), self.engine.connect() as conn:
            grant = await store.by_id(conn, grant_id)
        if grant is None or not _visible(grant):
            raise GrantNotFound(f"no grant with id {grant_id!r}", grant_id=grant_id)
        context.note_grant(grant.id, grant.run_id)
        context.note_owner(grant.user_id)
        return grant

    async def list(
        self, user_id: str, run_id: str, include_inactive: bool, page_size: int, page_token: str
    ) -> GrantPage:
        validation.text("user_id", user_id, validation.MAX_ID, required=False)
        validation.text("run_id", run_id, validation.MAX_ID, required=False)
        if not user_id and not run_id:
            raise InvalidArgument("user_id", "give user_id or run_id (or both)")
        size = validation.page_size(page_size)
        after = decode_page_token(page_token) if page_token else None
        if user_id:
            context.check_owner(user_id)
            context.note_owner(user_id)
        issuer, users = _scope()
        async with storage_errors(), self.engine.connect() as conn:
            rows = await store.list_grants(
                conn,
                user_id=user_id,
                run_id=run_id,
                issuer=issuer,
                users=None if user_id else users,
                active_at=None if include_inactive else self.clock(),
                after=after,
                limit=size + 1,
            )
        items = [g for g in rows[:size] if _visible(g)]
        more = len(rows) > size
        return GrantPage(items, encode_page_token(rows[size - 1]) if more else "")

    # -- purge -----------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        now = self.clock()
        async with storage_errors(), self.engine.begin() as conn:
            purged = await store.purge(conn, now - PURGE_GRACE)
            await store.purge_change_log(conn, now - CHANGE_LOG_KEEP)
        return purged

    async def run_purger(self, interval_seconds: float = 300.0) -> None:
        await periodic.every(interval_seconds, self.purge_expired, "grant purge", "%d purged")


def _scope() -> tuple[str | None, frozenset[str] | None]:
    """What the database can filter on for the current caller: the issuer (None: any) and
    the users (None: any). ``_visible`` decides the rest."""
    call = context.current_call.get()
    if call is None:
        return None, None
    caller = call.caller
    return (None if caller.manage_all_grants else caller.name), caller.users


def _visible(grant: Grant) -> bool:
    """Whether the caller may manage this grant: one it issued (any, with manage_all_grants),
    for a user and providers of its own policy. Anything else is answered exactly as an
    unknown grant is, so a grant id or run id says nothing about other callers' runs."""
    call = context.current_call.get()
    if call is None:
        return True
    caller = call.caller
    if grant.issuer != caller.name and not caller.manage_all_grants:
        return False
    if not caller.may_touch(grant.user_id):
        return False
    if caller.providers is None:
        return True
    # Integration ids were checked against the issuer's policy when the grant was made, not
    # against this caller's: a caller limited to some providers manages only its own such.
    if grant.integration_ids and grant.issuer != caller.name:
        return False
    return grant.providers <= caller.providers
