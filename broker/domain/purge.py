"""Deleting a user's dead integrations (the operator's ``broker integrations purge``).

Candidates are listed first (for a dry run or a confirmation); the delete then names those ids
*and* repeats the conditions, so a row that was reconnected between the listing and the delete
is kept. Disconnected rows whose provider-side revocation is still PENDING are kept as well:
their ciphertexts are what a later revocation attempt needs.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.domain import ids as new_ids
from broker.model import Integration, Revocation, Status
from broker.storage import repository
from broker.storage.engine import storage_errors
from broker.storage.tables import audit_events
from broker.storage.tables import integrations as t

# Who the audit trail names for operator actions taken through the CLI.
CLI_CALLER = "operator-cli"


class Kind(enum.StrEnum):
    EXPIRED = "expired"
    DISCONNECTED = "disconnected"


def _condition(kind: Kind, now: datetime) -> ColumnElement[bool]:
    if kind is Kind.DISCONNECTED:
        return and_(
            t.c.status == Status.DISCONNECTED.value,
            or_(t.c.revocation.is_(None), t.c.revocation != Revocation.PENDING.value),
        )
    # EXPIRED is set lazily (when someone asks for the token), so also count a connected row
    # whose access token has run out and that has no refresh token to renew it.
    return or_(
        t.c.status == Status.EXPIRED.value,
        and_(
            t.c.status == Status.CONNECTED.value,
            t.c.refresh_token_ct.is_(None),
            t.c.expires_at.is_not(None),
            t.c.expires_at < now,
        ),
    )


async def candidates(
    engine: AsyncEngine, user_id: str, kind: Kind, now: datetime
) -> list[Integration]:
    async with storage_errors(), engine.connect() as conn:
        rows = (
            await conn.execute(
                select(t)
                .where(t.c.user_id == user_id, _condition(kind, now))
                .order_by(t.c.created_at, t.c.id)
            )
        ).all()
    return [repository.to_stored(r).integration for r in rows]


async def pending_revocations(engine: AsyncEngine, user_id: str) -> int:
    """Disconnected rows kept back because their revocation has not gone through yet."""
    async with storage_errors(), engine.connect() as conn:
        found = await conn.scalar(
            select(func.count()).where(
                t.c.user_id == user_id,
                t.c.status == Status.DISCONNECTED.value,
                t.c.revocation == Revocation.PENDING.value,
            )
        )
    return int(found or 0)


async def purge(
    engine: AsyncEngine, user_id: str, kind: Kind, ids: Sequence[str], now: datetime
) -> int:
    """Delete those of ``ids`` that still qualify; one audit event per deleted row."""
    if not ids:
        return 0
    async with storage_errors(), engine.begin() as conn:
        deleted = (
            await conn.execute(
                delete(t)
                .where(t.c.id.in_(list(ids)), t.c.user_id == user_id, _condition(kind, now))
                .returning(t.c.id, t.c.provider)
            )
        ).all()
        if deleted:
            request_id = new_ids.request_id()
            await conn.execute(
                insert(audit_events),
                [
                    {
                        "id": new_ids.event_id(),
                        "occurred_at": now,
                        "caller": CLI_CALLER,
                        "method": "PurgeIntegrations",
                        "integration_id": iid,
                        "user_id": user_id,
                        "provider": provider,
                        "outcome": "DELETED",
                        "request_id": request_id,
                        "detail": f"purge --{kind.value}",
                    }
                    for iid, provider in deleted
                ],
            )
    return len(deleted)
