"""Queries on ``oauth_flows``, in SQLAlchemy Core. Callers own the connection/transaction.

A flow is found by the SHA-256 of its state, never by the state itself, and it is consumed by
one conditional UPDATE: whichever completion's UPDATE matches the still-open row wins, every
other one (a replay, a concurrent completion on any replica) matches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.storage.repository import utc
from broker.storage.tables import oauth_flows as t


@dataclass(frozen=True, slots=True)
class StoredFlow:
    """A flow as read from storage; the verifier stays ciphertext until the exchange."""

    state_hash: str
    user_id: str
    provider: str
    account_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    metadata: dict[str, Any]
    verifier_ct: bytes | None = field(repr=False)
    key_id: str | None
    created_at: datetime
    expires_at: datetime
    consumed_at: datetime | None


_SELECT = select(
    t.c.state_hash,
    t.c.user_id,
    t.c.provider,
    t.c.account_id,
    t.c.redirect_uri,
    t.c.scopes,
    t.c.metadata,
    t.c.verifier_ct,
    t.c.key_id,
    t.c.created_at,
    t.c.expires_at,
    t.c.consumed_at,
)


# pg_advisory_xact_lock namespace (first key) of the per-caller flow count; the second key
# is the caller name's hash.
_CALLER_LOCK = 0x62_666C_6F

# What a closed flow keeps: enough to answer a replay "already used" or "expired". Its
# payload (metadata, scopes, verifier) has no further use and would only take space.
_STRIPPED: dict[str, Any] = {
    "redirect_uri": "",
    "metadata": {},
    "scopes": [],
    "verifier_ct": None,
    "key_id": None,
}


async def insert_flow(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(t).values(**values))


async def lock_caller(conn: AsyncConnection, caller: str) -> None:
    """Serialise one caller's flow inserts until the transaction ends, so that counting its
    pending flows and inserting one cannot interleave with another replica's. SQLite needs
    nothing: its single writer already serialises the insert and the count after it."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_advisory_xact_lock(_CALLER_LOCK, func.hashtext(caller))))


async def pending(conn: AsyncConnection, caller: str, now: datetime) -> int:
    """The caller's flows neither completed nor expired."""
    query = select(func.count()).where(
        t.c.caller == caller, t.c.consumed_at.is_(None), t.c.expires_at > now
    )
    return int((await conn.execute(query)).scalar_one())


async def get(conn: AsyncConnection, state_hash: str) -> StoredFlow | None:
    row = (await conn.execute(_SELECT.where(t.c.state_hash == state_hash))).first()
    if row is None:
        return None
    m = row._mapping
    created, expires = utc(m["created_at"]), utc(m["expires_at"])
    assert created is not None
    assert expires is not None
    return StoredFlow(
        state_hash=m["state_hash"],
        user_id=m["user_id"],
        provider=m["provider"],
        account_id=m["account_id"],
        redirect_uri=m["redirect_uri"],
        scopes=tuple(m["scopes"] or ()),
        metadata=dict(m["metadata"] or {}),
        verifier_ct=m["verifier_ct"],
        key_id=m["key_id"],
        created_at=created,
        expires_at=expires,
        consumed_at=utc(m["consumed_at"]),
    )


async def consume(conn: AsyncConnection, state_hash: str, now: datetime) -> bool:
    """Close an open, unexpired flow; True for exactly one caller per flow.

    On PostgreSQL a concurrent UPDATE of the same row waits for the first one's transaction
    and then re-checks ``consumed_at IS NULL`` against the committed row, so it matches
    nothing; SQLite has a single writer, so the second UPDATE runs after the first commits.
    """
    result = await conn.execute(
        update(t)
        .where(t.c.state_hash == state_hash, t.c.consumed_at.is_(None), t.c.expires_at > now)
        .values(consumed_at=now, version=t.c.version + 1)
    )
    return result.rowcount == 1


async def strip(conn: AsyncConnection, state_hash: str) -> None:
    """Drop a consumed flow's payload, its verifier above all: it has no further use, so it
    should not sit in the database (or its backups) until the purge."""
    await conn.execute(update(t).where(t.c.state_hash == state_hash).values(**_STRIPPED))


async def strip_expired(conn: AsyncConnection, now: datetime) -> int:
    """Drop the payload of flows that expired unfinished (kept a while for the message);
    returns how many. Stripped rows have no redirect URI, so each is updated once."""
    result = await conn.execute(
        update(t)
        .where(t.c.expires_at <= now, t.c.consumed_at.is_(None), t.c.redirect_uri != "")
        .values(**_STRIPPED)
    )
    return int(result.rowcount)


async def purge(conn: AsyncConnection, expired_before: datetime, consumed_before: datetime) -> int:
    """Delete flows that expired before ``expired_before`` or were consumed before
    ``consumed_before``; returns how many."""
    result = await conn.execute(
        delete(t).where(
            or_(t.c.expires_at < expired_before, t.c.consumed_at < consumed_before),
        )
    )
    return int(result.rowcount)
