"""The audit trail: one event per RPC that reads, returns, changes or deletes an integration.

Fail closed: the event of a successful call is durable before its response leaves (for
GetAccessToken, before the token leaves); if it cannot be written the call fails with
UNAVAILABLE, as Vault's audit devices do. Events never carry a token.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.domain.context import Call
from broker.domain.service import Clock
from broker.errors import StorageUnavailable
from broker.storage.engine import storage_errors
from broker.storage.tables import audit_events


class AuditUnavailable(StorageUnavailable):
    reason = "AUDIT_UNAVAILABLE"


class Auditor:
    def __init__(self, engine: AsyncEngine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def event(self, call: Call, outcome: str) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "occurred_at": self.clock(),
            "caller": call.caller.name,
            "method": call.method,
            "integration_id": call.integration_id,
            "user_id": call.user_id,
            "provider": call.provider,
            "outcome": outcome,
            "request_id": call.request_id,
            "detail": call.detail,
        }

    async def record(self, call: Call, outcome: str) -> None:
        """Write the event durably; AuditUnavailable if it cannot be written."""
        try:
            async with storage_errors(), self.engine.begin() as conn:
                await conn.execute(insert(audit_events).values(**self.event(call, outcome)))
        except StorageUnavailable:
            raise AuditUnavailable(
                "the audit trail cannot be written, so the broker refuses to answer; retry shortly"
            ) from None
