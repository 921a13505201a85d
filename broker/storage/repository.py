"""Queries on ``integrations``, in SQLAlchemy Core. Callers own the connection/transaction.

Every token write is a compare-and-swap on ``version`` so a stale writer (another replica, a
re-encryption batch) can never overwrite newer tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    String,
    and_,
    any_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.errors import CiphertextInvalid
from broker.model import Integration, Kind, Status, StoredIntegration
from broker.storage.engine import (
    CHANNEL,
    bulk_insert,
    notify_payload,
    touch,
    touch_many,
    touched_here,
)
from broker.storage.tables import integrations as t

# The integration columns, in the order ``from_values`` unpacks them: every read selects
# these, and the hot read (``broker.storage.reader``) converts its record by position.
FIELDS = (
    "id",
    "user_id",
    "provider",
    "account_id",
    "status",
    "token_type",
    "scopes",
    "metadata",
    "created_at",
    "updated_at",
    "expires_at",
    "last_refreshed_at",
    "disconnected_at",
    "disconnect_reason",
    "version",
    "access_token_ct",
    "refresh_token_ct",
    "key_id",
    "refresh_failures",
    "revocation",
    "revocation_attempts",
    "credential_type",
    "credential_ct",
    "last_refresh_error",
    "next_refresh_at",
    "issued_lifetime_seconds",
    "refresh_token_expires_at",
    "refresh_token_used_at",
    "expiring_notice_for",
    "last_used_at",
)
_COLUMNS = tuple(t.c[name] for name in FIELDS)
_SELECT = select(*_COLUMNS)


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; everything in the broker is aware UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def to_stored(row: Row[*tuple[Any, ...]]) -> StoredIntegration:
    """Any row holding the integration columns (by name: ``select(t)`` orders them otherwise)."""
    m = row._mapping
    return from_values([m[name] for name in FIELDS])


def from_values(values: Sequence[Any]) -> StoredIntegration:
    """A row's values in ``FIELDS`` order, JSON columns already decoded."""
    (
        id_, user_id, provider, account_id, status, token_type, scopes, metadata, created_at,
        updated_at, expires_at, last_refreshed_at, disconnected_at, disconnect_reason, version,
        access_token_ct, refresh_token_ct, key_id, refresh_failures, revocation,
        revocation_attempts, credential_type, credential_ct, last_refresh_error, next_refresh_at,
        issued_lifetime_seconds, refresh_token_expires_at, refresh_token_used_at,
        expiring_notice_for, last_used_at,
    ) = values  # fmt: skip
    created = utc(created_at)
    updated = utc(updated_at)
    assert created is not None
    assert updated is not None
    try:
        kind, state = Kind(credential_type), Status(status)
    except ValueError:
        # Only a write outside the broker puts another value here: the row is not to be
        # trusted, like a ciphertext that fails to authenticate.
        raise CiphertextInvalid(
            f"integration {id_} has a credential kind or status this broker never writes; "
            "it was changed outside the broker",
            integration_id=id_,
        ) from None
    integration = Integration(
        id=id_,
        user_id=user_id,
        provider=provider,
        account_id=account_id,
        status=state,
        token_type=token_type,
        scopes=tuple(scopes or ()),
        metadata=dict(metadata or {}),
        created_at=created,
        updated_at=updated,
        expires_at=utc(expires_at),
        last_refreshed_at=utc(last_refreshed_at),
        disconnected_at=utc(disconnected_at),
        disconnect_reason=disconnect_reason,
        has_refresh_token=refresh_token_ct is not None,
        version=int(version),
        credential_type=kind,
        refresh_token_expires_at=utc(refresh_token_expires_at),
        last_used_at=utc(last_used_at),
    )
    return StoredIntegration(
        integration=integration,
        access_token_ct=access_token_ct,
        refresh_token_ct=refresh_token_ct,
        key_id=key_id,
        refresh_failures=int(refresh_failures),
        revocation=revocation,
        revocation_attempts=int(revocation_attempts),
        credential_ct=credential_ct,
        last_refresh_error=last_refresh_error,
        next_refresh_at=utc(next_refresh_at),
        issued_lifetime_seconds=issued_lifetime_seconds,
        refresh_token_used_at=utc(refresh_token_used_at),
        expiring_notice_for=utc(expiring_notice_for),
    )


_BY_ID = _SELECT.where(t.c.id == bindparam("id"))
# The one statement of the cold read by id: PostgreSQL's (``broker.storage.reader``), in
# asyncpg's parameter style, and a SQLite file's (``broker.storage.sqlite_reader``), in
# sqlite3's.
GET_BY_ID = str(_BY_ID.compile(dialect=asyncpg_dialect.dialect()))  # type: ignore[no-untyped-call]
SQLITE_GET_BY_ID = str(_BY_ID.compile(dialect=sqlite_dialect.dialect()))

# Several of those reads coalesced into one statement. The array is plain ``varchar[]``, like
# GET_BY_ID's ``$1::VARCHAR``: ``varchar(36)[]`` would silently truncate a longer id to a
# prefix (the reader matches rows to ids exactly anyway).
GET_BY_IDS = str(
    _SELECT.where(t.c.id == any_(bindparam("ids", type_=ARRAY(String())))).compile(
        dialect=asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]
    )
)


async def read(conn: AsyncConnection, integration_id: str) -> StoredIntegration | None:
    """``get`` for the read path where no reader of its own is in use (an in-memory or URI
    SQLite database)."""
    return await get(conn, integration_id)


async def get(
    conn: AsyncConnection, integration_id: str, *, for_update: bool = False
) -> StoredIntegration | None:
    query = _SELECT.where(t.c.id == integration_id)
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    return None if row is None else to_stored(row)


async def find_by_owner(
    conn: AsyncConnection,
    user_id: str,
    provider: str,
    account_id: str | None,
    *,
    limit: int = 2,
    for_update: bool = False,
) -> list[StoredIntegration]:
    query = _SELECT.where(t.c.user_id == user_id, t.c.provider == provider)
    if account_id is not None:
        query = query.where(t.c.account_id == account_id)
    query = query.order_by(t.c.created_at, t.c.id).limit(limit)
    if for_update:
        query = query.with_for_update()
    rows = (await conn.execute(query)).all()
    return [to_stored(r) for r in rows]


async def insert_row(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(t).values(**values))
    # A new row can change what an owner lookup resolves to (a second account).
    await touch(conn, values["id"], values["user_id"], values["provider"])


async def update_row(
    conn: AsyncConnection, integration_id: str, expected_version: int, values: dict[str, Any]
) -> bool:
    """Compare-and-swap: applies only if the row is still at ``expected_version``."""
    result = await conn.execute(
        update(t)
        .where(t.c.id == integration_id, t.c.version == expected_version)
        .values(version=t.c.version + 1, **values)
    )
    if result.rowcount != 1:
        return False
    await touch(conn, integration_id)
    return True


async def list_page(
    conn: AsyncConnection,
    user_id: str | None,
    provider: str | None,
    status: Status | None,
    after: tuple[datetime, str] | None,
    limit: int,
    providers: frozenset[str] | None = None,
    granted: tuple[frozenset[str], frozenset[str]] | None = None,
) -> list[StoredIntegration]:
    """``user_id`` None: every user's. ``granted``: (providers, integration ids) of a grant; a
    row is listed if either covers it."""
    query = _SELECT if user_id is None else _SELECT.where(t.c.user_id == user_id)
    if providers is not None:
        query = query.where(t.c.provider.in_(sorted(providers)))
    if granted is not None:
        query = query.where(
            or_(t.c.provider.in_(sorted(granted[0])), t.c.id.in_(sorted(granted[1])))
        )
    if provider:
        query = query.where(t.c.provider == provider)
    if status is not None:
        query = query.where(t.c.status == status.value)
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(t.c.created_at > created, and_(t.c.created_at == created, t.c.id > last_id))
        )
    rows = (await conn.execute(query.order_by(t.c.created_at, t.c.id).limit(limit))).all()
    return [to_stored(r) for r in rows]


async def ping(conn: AsyncConnection) -> None:
    await conn.execute(select(func.now()) if conn.dialect.name == "postgresql" else select(1))


# -- refresh bookkeeping ---------------------------------------------------------------------


# A lease holder's session lock (broker.storage.liveness) as pg_locks shows it.
_HOLDER_GONE = text(
    "NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((l.classid::bigint << 32) | l.objid::bigint) = integrations.refresh_lease_session)"
)


def _lease_free(conn: AsyncConnection, now: Any) -> ColumnElement[bool]:
    """Nobody may be refreshing this row. On PostgreSQL a lease whose holder's session is gone
    is free at once, and one whose holder is alive is never free (it may have sent the
    refresh token; see broker.storage.liveness); a lease without a session lapses by time.
    ``now``: a datetime, or a bind parameter of a statement built once."""
    return _lease_free_on(conn.dialect.name, now)


def _lease_free_on(dialect: str, now: Any) -> ColumnElement[bool]:
    unleased = t.c.refresh_lease_until.is_(None)
    lapsed = t.c.refresh_lease_until < now
    if dialect != "postgresql":
        return or_(unleased, lapsed)
    return or_(
        unleased,
        and_(t.c.refresh_lease_session.is_(None), lapsed),
        and_(t.c.refresh_lease_session.is_not(None), _HOLDER_GONE),
    )


# The refresh's two statements are built once per dialect (per set of columns for the write):
# building and keying a statement costs more CPU than executing it from SQLAlchemy's cache.
_LEASES: dict[str, Any] = {}
_WRITES: dict[tuple[str, ...], Any] = {}


def _lease_statement(dialect: str) -> Any:
    statement = _LEASES.get(dialect)
    if statement is None:
        owner = bindparam("lease_owner", type_=t.c.refresh_lease_owner.type)
        statement = _LEASES[dialect] = (
            update(t)
            .where(
                t.c.id == bindparam("lease_id", type_=t.c.id.type),
                t.c.version == bindparam("lease_version", type_=t.c.version.type),
                or_(
                    _lease_free_on(
                        dialect, bindparam("lease_now", type_=t.c.refresh_lease_until.type)
                    ),
                    t.c.refresh_lease_owner == owner,
                ),
            )
            .values(
                refresh_lease_owner=owner,
                refresh_lease_until=bindparam("lease_until", type_=t.c.refresh_lease_until.type),
                refresh_lease_session=bindparam(
                    "lease_session", type_=t.c.refresh_lease_session.type
                ),
            )
            .returning(*_COLUMNS)
        )
    return statement


async def take_lease(
    conn: AsyncConnection,
    integration_id: str,
    version: int,
    owner: str,
    now: datetime,
    until: datetime,
    session: int | None = None,
) -> StoredIntegration | None:
    """Claim the right to refresh this row: only if nobody else holds the lease and the row is
    still the version we decided on. One short statement, no lock held during the HTTP call;
    it returns the row it leased (the re-read is the same statement), or None when the version
    moved or someone else holds the lease. A lease this broker holds itself is free to it: the
    in-process single flight guarantees nothing of ours is using it (a leftover of a flight
    whose release did not get through)."""
    result = await conn.execute(
        _lease_statement(conn.dialect.name),
        {
            "lease_id": integration_id,
            "lease_version": version,
            "lease_now": now,
            "lease_owner": owner,
            "lease_until": until,
            "lease_session": session,
        },
    )
    row = result.first()
    return None if row is None else to_stored(row)


async def release_all_leases(conn: AsyncConnection) -> int:
    """SQLite start-up: one process owns the file, so every lease left is a dead one's."""
    result = await conn.execute(
        update(t)
        .where(t.c.refresh_lease_owner.is_not(None))
        .values(refresh_lease_owner=None, refresh_lease_until=None, refresh_lease_session=None)
    )
    return int(result.rowcount or 0)


async def release_lease(
    conn: AsyncConnection, integration_id: str, owner: str, values: dict[str, Any]
) -> bool:
    """Give the lease back (with bookkeeping such as failure counts); tokens unchanged.
    Bookkeeping is announced like any write, so the caches that serve the row (this
    process's and the other replicas') see a back-off it begins."""
    result = await conn.execute(
        update(t)
        .where(t.c.id == integration_id, t.c.refresh_lease_owner == owner)
        .values(
            refresh_lease_owner=None,
            refresh_lease_until=None,
            refresh_lease_session=None,
            **values,
        )
    )
    released = result.rowcount == 1
    if released and values:
        await touch(conn, integration_id)
    return released


def _write_statement(columns: tuple[str, ...]) -> Any:
    statement = _WRITES.get(columns)
    if statement is None:
        statement = _WRITES[columns] = (
            update(t)
            .where(
                t.c.id == bindparam("write_id", type_=t.c.id.type),
                t.c.version == bindparam("write_version", type_=t.c.version.type),
            )
            .values(
                {
                    **{name: bindparam(f"write_{name}", type_=t.c[name].type) for name in columns},
                    "version": t.c.version + 1,
                    "refresh_lease_owner": None,
                    "refresh_lease_until": None,
                    "refresh_lease_session": None,
                }
            )
            .returning(*_COLUMNS)
        )
    return statement


def _announced_write_statement(columns: tuple[str, ...]) -> Any:
    """PostgreSQL: the write and its announcement to the other replicas in one statement (the
    NOTIFY goes out at commit, only when the write matched a row)."""
    statement = _ANNOUNCED_WRITES.get(columns)
    if statement is None:
        written = _write_statement(columns).cte("written")
        notify = func.pg_notify(
            bindparam("write_channel", type_=String()), bindparam("write_payload", type_=String())
        )
        statement = _ANNOUNCED_WRITES[columns] = select(
            *(written.c[name] for name in FIELDS), notify.label("announced")
        )
    return statement


_ANNOUNCED_WRITES: dict[tuple[str, ...], Any] = {}


async def write_refreshed(
    conn: AsyncConnection, integration_id: str, version: int, values: dict[str, Any]
) -> StoredIntegration | None:
    """Store refreshed tokens: compare-and-swap on version, lease released in the same write.
    Returns the row as written (RETURNING: no re-read), or None if the version moved. On
    PostgreSQL the change is announced by the same statement."""
    parameters = {f"write_{name}": value for name, value in values.items()}
    parameters["write_id"] = integration_id
    parameters["write_version"] = version
    columns = tuple(sorted(values))
    if conn.dialect.name == "postgresql":
        parameters["write_channel"] = CHANNEL
        parameters["write_payload"] = notify_payload(integration_id)
        row = (await conn.execute(_announced_write_statement(columns), parameters)).first()
        if row is None:
            return None
        touched_here(conn, integration_id)
        return to_stored(row)
    row = (await conn.execute(_write_statement(columns), parameters)).first()
    if row is None:
        return None
    await touch(conn, integration_id)
    return to_stored(row)


async def claim_due(
    conn: AsyncConnection,
    horizon: datetime,
    now: datetime,
    until: datetime,
    owner: str,
    limit: int,
    session: int | None = None,
    *,
    skip_ids: Collection[str] = (),
    skip_providers: Collection[str] = (),
    idle_cutoffs: Mapping[str, datetime] | None = None,
    lapsing_before: datetime | None = None,
) -> list[tuple[str, str]]:
    """Lease up to ``limit`` connected integrations that expire before ``horizon`` — or whose
    refresh token is due for keep-alive: last used before its provider's ``idle_cutoffs``
    entry, or lapsing before ``lapsing_before`` with no EXPIRING notice written for that
    expiry yet (or with refresh failures: a renewal to try again) — that nobody is refreshing
    and that are not waiting (``next_refresh_at``) after a failure; returns (id, provider)
    pairs. Rows that never failed come first, then by
    expiry, so rows that keep failing cannot crowd out the others; ``skip_ids`` (claimed
    earlier in the same pass) and ``skip_providers`` (whose attempts for the pass are spent)
    are left alone. On PostgreSQL, replicas claiming at once skip each other's rows
    (``FOR UPDATE SKIP LOCKED``) instead of queueing on them, so they share the work."""
    query = (
        select(t.c.id, t.c.provider)
        .where(
            t.c.status == "CONNECTED",
            or_(
                t.c.refresh_token_ct.is_not(None),
                # Minted kinds: renewed from their stored credential ahead of expiry too.
                and_(
                    t.c.credential_ct.is_not(None),
                    t.c.credential_type.in_(sorted(k.value for k in Kind if k.minted)),
                ),
            ),
            or_(
                and_(t.c.expires_at.is_not(None), t.c.expires_at < horizon),
                # A provider whose budget is spent is left out of the keep-alive part too: its
                # index range is not read only to be filtered out.
                *_upkeep_due(
                    {p: c for p, c in (idle_cutoffs or {}).items() if p not in skip_providers},
                    lapsing_before,
                ),
            ),
            or_(t.c.next_refresh_at.is_(None), t.c.next_refresh_at < now),
            _lease_free(conn, now),
        )
        .order_by(t.c.refresh_failures > 0, t.c.expires_at)
        .limit(limit)
    )
    if skip_ids:
        query = query.where(t.c.id.not_in(sorted(skip_ids)))
    if skip_providers:
        query = query.where(t.c.provider.not_in(sorted(skip_providers)))
    if conn.dialect.name == "postgresql":
        # The claim reads a few index ranges (ix_integrations_provider_used per provider with
        # an idle lifetime, the expiry indexes), but its many ORs give it an estimate that
        # turns JIT compilation on: ~300 ms of compiling per pass for well under 1 ms of work
        # (docs/benchmarks.md, "The background pass's claim").
        await conn.exec_driver_sql("SET LOCAL jit = off")
    rows = await _claim_rows(conn, query, owner, until, session)
    return [(row[0], row[1]) for row in rows]


def _upkeep_due(
    idle_cutoffs: Mapping[str, datetime], lapsing_before: datetime | None
) -> list[ColumnElement[bool]]:
    """The keep-alive's part of the claim (broker.domain.refresh_policy.upkeep decides each
    claimed row exactly): refresh tokens of authorization-code grants idle past their
    provider's cutoff, or lapsing soon without a notice for that expiry."""
    grant = and_(
        t.c.refresh_token_ct.is_not(None),
        t.c.credential_type == Kind.AUTHORIZATION_CODE.value,
    )
    due: list[ColumnElement[bool]] = []
    if idle_cutoffs:
        due.append(
            and_(
                grant,
                or_(
                    *(
                        and_(
                            t.c.provider == provider,
                            or_(
                                t.c.refresh_token_used_at.is_(None),
                                t.c.refresh_token_used_at < cutoff,
                            ),
                        )
                        for provider, cutoff in sorted(idle_cutoffs.items())
                    )
                ),
            )
        )
    if lapsing_before is not None:
        due.append(
            and_(
                grant,
                t.c.refresh_token_expires_at < lapsing_before,
                or_(
                    t.c.expiring_notice_for.is_(None),
                    t.c.expiring_notice_for != t.c.refresh_token_expires_at,
                    # Noticed after a failed renewal: renewal goes on (after its back-off).
                    t.c.refresh_failures > 0,
                ),
            )
        )
    return due


async def mark_expiring(
    conn: AsyncConnection,
    integration_id: str,
    lapsing_before: datetime,
    *,
    not_after: datetime | None = None,
    failing: bool = False,
) -> StoredIntegration | None:
    """Record that the EXPIRING notice of the row's refresh-token expiry is being written: only
    once per expiry (the row is returned the one time it applies), only when that expiry is
    before ``lapsing_before`` (and, after a renewal attempt, no later than ``not_after``: not
    renewed; ``failing``: only while the row's refreshes fail). Bookkeeping, like a lease: no
    ``version`` bump, no cache invalidation."""
    lapses = t.c.refresh_token_expires_at
    query = (
        update(t)
        .where(
            t.c.id == integration_id,
            t.c.status == Status.CONNECTED.value,
            t.c.refresh_token_ct.is_not(None),
            lapses.is_not(None),
            lapses < lapsing_before,
            or_(t.c.expiring_notice_for.is_(None), t.c.expiring_notice_for != lapses),
        )
        .values(expiring_notice_for=lapses)
        .returning(*_COLUMNS)
    )
    if not_after is not None:
        query = query.where(lapses <= not_after)
    if failing:
        query = query.where(t.c.refresh_failures > 0)
    row = (await conn.execute(query)).first()
    return None if row is None else to_stored(row)


async def note_last_used(
    conn: AsyncConnection, integration_ids: Collection[str], at: datetime, precision: datetime
) -> int:
    """Set ``last_used_at`` of these rows to ``at`` where it is older than ``precision`` (or
    unset): one statement per batch, no ``version`` bump (a refresh's compare-and-swap must
    not lose to it), no cache invalidation."""
    if not integration_ids:
        return 0
    result = await conn.execute(
        update(t)
        .where(
            t.c.id.in_(sorted(integration_ids)),
            or_(t.c.last_used_at.is_(None), t.c.last_used_at < precision),
        )
        .values(last_used_at=at)
    )
    return int(result.rowcount or 0)


async def _claim(
    conn: AsyncConnection, query: Any, owner: str, until: datetime, session: int | None = None
) -> list[str]:
    """Lease the rows ``query`` selects, in the same transaction as the selection."""
    return [row[0] for row in await _claim_rows(conn, query, owner, until, session)]


async def _claim_rows(
    conn: AsyncConnection, query: Any, owner: str, until: datetime, session: int | None = None
) -> list[Any]:
    """Lease the rows ``query`` selects (their id first), returning the selected rows."""
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = list((await conn.execute(query)).all())
    ids = [row[0] for row in rows]
    if ids:
        await conn.execute(
            update(t)
            .where(t.c.id.in_(ids))
            .values(
                refresh_lease_owner=owner, refresh_lease_until=until, refresh_lease_session=session
            )
        )
    return rows


async def claim_pending_revocations(
    conn: AsyncConnection, now: datetime, until: datetime, owner: str, limit: int
) -> list[str]:
    """Lease disconnected integrations whose provider revocation is due for another try.
    A disconnected row is never refreshed, so the refresh lease columns serve here too."""
    return await _claim(
        conn,
        select(t.c.id)
        .where(
            t.c.status == "DISCONNECTED",
            t.c.revocation == "PENDING",
            or_(t.c.next_revocation_at.is_(None), t.c.next_revocation_at < now),
            or_(t.c.refresh_lease_until.is_(None), t.c.refresh_lease_until < now),
        )
        .order_by(t.c.next_revocation_at)
        .limit(limit),
        owner,
        until,
    )


async def insert_rows(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Many new integrations in one statement (``broker import``); announced together."""
    if not rows:
        return
    await bulk_insert(conn, t, rows)
    await touch_many(conn, [(r["id"], r["user_id"], r["provider"]) for r in rows])


async def get_many(conn: AsyncConnection, integration_ids: list[str]) -> list[StoredIntegration]:
    rows = (await conn.execute(_SELECT.where(t.c.id.in_(integration_ids)))).all()
    return [to_stored(r) for r in rows]


async def owners(
    conn: AsyncConnection, user_ids: list[str]
) -> dict[tuple[str, str, str], StoredIntegration]:
    """The integrations of these users, by (user, provider, account): one query for a batch."""
    found: dict[tuple[str, str, str], StoredIntegration] = {}
    for start in range(0, len(user_ids), 500):
        chunk = user_ids[start : start + 500]
        rows = (
            await conn.execute(
                _SELECT.where(t.c.user_id.in_(chunk)).order_by(t.c.created_at, t.c.id)
            )
        ).all()
        for row in rows:
            stored = to_stored(row)
            i = stored.integration
            found.setdefault((i.user_id, i.provider, i.account_id), stored)
    return found
