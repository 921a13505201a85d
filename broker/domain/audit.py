"""The audit trail: one event per RPC that reads, returns, changes or deletes an integration.

Fail closed: the event of a successful call is durable before its response leaves (for
GetAccessToken, before the token leaves); if it cannot be written the call fails with
UNAVAILABLE, as Vault's audit devices do. Events never carry a token.

Group commit: calls that finish while a batch is being written queue up and go to the
database together in the next transaction, so a busy broker writes one transaction per batch
instead of one per call — and each call still waits for its own event to be committed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.domain.context import Call
from broker.domain.service import Clock
from broker.errors import StorageUnavailable
from broker.storage import audit_log

log = logging.getLogger("broker.audit")


class AuditUnavailable(StorageUnavailable):
    reason = "AUDIT_UNAVAILABLE"


_UNAVAILABLE = "the audit trail cannot be written, so the broker refuses to answer; retry shortly"


class Auditor:
    def __init__(
        self, engine: AsyncEngine, clock: Clock, *, group_commit: bool = True, max_batch: int = 512
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.group_commit = group_commit
        self.max_batch = max_batch
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    def event(self, call: Call, outcome: str) -> tuple[Any, ...]:
        """One row, in ``audit_log.COLUMNS`` order."""
        return (
            str(uuid.uuid4()),
            self.clock(),
            call.caller.name,
            call.method,
            call.integration_id,
            call.user_id,
            call.provider,
            outcome,
            call.request_id,
            call.detail,
        )

    async def record(self, call: Call, outcome: str) -> None:
        """Return once the event is committed; AuditUnavailable if it cannot be."""
        event = self.event(call, outcome)
        if not self.group_commit:
            await self._write([event])
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="audit-writer")
        await done

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    await self._write([event for event, _ in batch])
                except Exception as exc:  # every waiter learns it failed, whatever the cause
                    error = (
                        exc if isinstance(exc, AuditUnavailable) else AuditUnavailable(_UNAVAILABLE)
                    )
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(error)
                else:
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            self._writer = None

    async def _write(self, events: list[tuple[Any, ...]]) -> None:
        try:
            await audit_log.insert_events(self.engine, events)
        except Exception as exc:
            # Whatever went wrong (database down, table missing, constraint), no event means
            # no answer. The class name is logged; the message may quote the SQL and values.
            log.error("audit events could not be written (%s)", type(exc).__name__)
            raise AuditUnavailable(_UNAVAILABLE) from None
        metrics.AUDIT_BATCH.observe(len(events))
