"""Queries on ``grants``, in SQLAlchemy Core. Callers own the connection/transaction.

The token is never here: rows are found by the SHA-256 of the token the runner presents.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.grant import Grant
from broker.storage.engine import GRANT_CHANNEL, announce
from broker.storage.repository import utc
from broker.storage.tables import change_log
from broker.storage.tables import grants as t

_SELECT = select(t).with_only_columns(*(c for c in t.c if c.name != "token_sha256"))


def _grant(m: Mapping[Any, Any]) -> Grant:
    created, expires = utc(m["created_at"]), utc(m["expires_at"])
    assert created is not None
    assert expires is not None
    return Grant(
        id=m["id"],
        user_id=m["user_id"],
        providers=frozenset(m["providers"] or ()),
        integration_ids=frozenset(m["integration_ids"] or ()),
        audience=frozenset(m["audience"] or ()),
        methods=frozenset(m["methods"] or ()),
        run_id=m["run_id"],
        issuer=m["issuer"],
        created_at=created,
        expires_at=expires,
        revoked_at=utc(m["revoked_at"]),
    )


async def insert_grant(conn: AsyncConnection, grant: Grant, token_sha256: str) -> None:
    await conn.execute(
        insert(t).values(
            id=grant.id,
            token_sha256=token_sha256,
            user_id=grant.user_id,
            providers=sorted(grant.providers),
            integration_ids=sorted(grant.integration_ids),
            audience=sorted(grant.audience),
            methods=sorted(grant.methods),
            run_id=grant.run_id,
            issuer=grant.issuer,
            created_at=grant.created_at,
            expires_at=grant.expires_at,
        )
    )


async def by_token_hash(conn: AsyncConnection, token_sha256: str) -> Grant | None:
    row = (await conn.execute(_SELECT.where(t.c.token_sha256 == token_sha256))).first()
    return None if row is None else _grant(row._mapping)


async def by_id(conn: AsyncConnection, grant_id: str) -> Grant | None:
    row = (await conn.execute(_SELECT.where(t.c.id == grant_id))).first()
    return None if row is None else _grant(row._mapping)


async def list_grants(
    conn: AsyncConnection,
    *,
    user_id: str = "",
    run_id: str = "",
    issuer: str | None = None,
    users: Collection[str] | None = None,
    active_at: datetime | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Grant]:
    """Newest first; ``issuer``/``users``: only grants of that issuer, for those users;
    ``active_at``: only grants neither revoked nor expired at that time."""
    query = _SELECT
    if user_id:
        query = query.where(t.c.user_id == user_id)
    if run_id:
        query = query.where(t.c.run_id == run_id)
    if issuer is not None:
        query = query.where(t.c.issuer == issuer)
    if users is not None:
        query = query.where(t.c.user_id.in_(sorted(users)))
    if active_at is not None:
        query = query.where(t.c.revoked_at.is_(None), t.c.expires_at > active_at)
    if after is not None:
        created, last_id = after
        query = query.where(
            or_(t.c.created_at < created, and_(t.c.created_at == created, t.c.id < last_id))
        )
    rows = await conn.execute(query.order_by(t.c.created_at.desc(), t.c.id.desc()).limit(limit))
    return [_grant(r._mapping) for r in rows.all()]


async def revoke(conn: AsyncConnection, ids: list[str], now: datetime, revoked_by: str) -> None:
    """Mark revoked (those not revoked yet) and announce each to every replica."""
    if not ids:
        return
    await conn.execute(
        update(t)
        .where(t.c.id.in_(ids), t.c.revoked_at.is_(None))
        .values(revoked_at=now, revoked_by=revoked_by)
    )
    for grant_id in ids:
        await announce(conn, GRANT_CHANNEL, grant_id)


async def purge(conn: AsyncConnection, expired_before: datetime) -> int:
    """Delete grants that expired before the cutoff (revoked or not)."""
    result = await conn.execute(delete(t).where(t.c.expires_at < expired_before))
    return int(result.rowcount or 0)


async def purge_change_log(conn: AsyncConnection, before: datetime) -> int:
    """Old SQLite change-log rows; the newest always stays so its sequence is not reused."""
    newest = select(change_log.c.seq).order_by(change_log.c.seq.desc()).limit(1).scalar_subquery()
    result = await conn.execute(
        delete(change_log).where(change_log.c.occurred_at < before, change_log.c.seq < newest)
    )
    return int(result.rowcount or 0)
