"""``broker import``: an application's integrations table into the broker, as a client of the
same store path as StoreIntegration (validation, encryption, the CONNECTED event, the audit
event), a batch of rows per transaction.

Each stored row is recorded in ``imports`` (source, source id → integration) in the
transaction that stores it, so a run that stops anywhere (Ctrl-C, kill -9, the database gone)
resumes where it stopped, and a second run imports nothing new.

Expiry: a row without one is not "never expires". With a refresh token it is stored as due
now, so the first GetAccessToken (or the background pass) refreshes it, once: the refresh
stores the provider's expiry (or the configured default lifetime)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from broker.domain import context, events, ids, validation
from broker.domain.context import Call, Caller
from broker.domain.integrations import IntegrationService, Refresher
from broker.errors import (
    BrokerError,
    InvalidArgument,
    ProviderUnavailable,
    ReauthorizationRequired,
    StorageUnavailable,
    UnknownProvider,
)
from broker.model import (
    Integration,
    Kind,
    NewTokens,
    Selector,
    Status,
    StoreCommand,
    StoredIntegration,
    TokenRequest,
)
from broker.storage import audit_log, imports, repository
from broker.storage.engine import storage_errors, write_transaction

log = logging.getLogger("broker.import")

METHOD = "ImportIntegration"

Decrypt = Callable[[Sequence[str]], Awaitable[list[str | None]]]


class AuditWriter(Protocol):
    """The auditor (``broker.domain.audit``): an event row, or one written in a transaction."""

    def event(self, call: Call, outcome: str) -> tuple[Any, ...]: ...

    async def stage(self, call: Call, conn: AsyncConnection) -> None: ...


# Source statuses (the application's words) and what the broker makes of them.
_STATUSES = {
    "connected": Status.CONNECTED,
    "active": Status.CONNECTED,
    "expired": Status.EXPIRED,
    "needs_reauthorization": Status.NEEDS_REAUTHORIZATION,
    "needs_reauth": Status.NEEDS_REAUTHORIZATION,
    "disconnected": Status.DISCONNECTED,
    "revoked": Status.DISCONNECTED,
}

# Reasons a row is not imported, as the summary and the report name them.
ALREADY_IMPORTED = "already imported"
ALREADY_PRESENT = "already present"
DISCONNECTED = "disconnected"
UNKNOWN_PROVIDER = "unknown provider"
NO_TOKEN = "no token"
UNDECRYPTABLE = "undecryptable"
INVALID_FIELD = "invalid field"


@dataclass(frozen=True, slots=True)
class Options:
    source: str
    on_conflict: str = "skip"  # or "newer"
    include_disconnected: bool = False
    dry_run: bool = False
    provider_map: dict[str, str] = field(default_factory=dict)
    caller: str = "cli"


@dataclass(slots=True)
class Tally:
    total: int | None = None
    done: int = 0
    imported: int = 0
    replaced: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def summary(self, dry_run: bool) -> str:
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
        verb = "would import" if dry_run else "imported"
        text = f"{verb} {self.imported}"
        if self.replaced:
            text += f" ({self.replaced} replacing older integrations)"
        text += f", skipped {skipped}" + (f" ({detail})" if detail else "")
        text += f", failed {self.failed}" + (f" ({why})" if why else "")
        return text


@dataclass(slots=True)
class _Row:
    source_id: str
    fields: dict[str, Any]
    status: Status = Status.CONNECTED
    updated_at: datetime | None = None
    cmd: StoreCommand | None = None
    replace: bool = False


class RowProblem(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


Report = Callable[[dict[str, Any]], None]


class Importer:
    def __init__(
        self,
        service: IntegrationService,
        options: Options,
        *,
        decrypt: Decrypt | None = None,
        auditor: AuditWriter | None = None,
        report: Report | None = None,
    ) -> None:
        self.service = service
        self.options = options
        self.decrypt = decrypt
        self.auditor = auditor
        self.report = report or (lambda _: None)
        self.tally = Tally()
        self.caller = Caller(options.caller, frozenset({METHOD}), None)

    # -- one batch -------------------------------------------------------------------------

    async def run(
        self,
        batches: AsyncIterator[list[dict[str, Any]]],
        progress: Callable[[Tally], None] | None = None,
    ) -> Tally:
        """Batch after batch; the next one is read, decrypted and checked while the previous
        one is being written (writes stay one at a time, in order)."""
        writing: asyncio.Task[None] | None = None
        try:
            async for raw in batches:
                ready = await self._prepare(raw)
                if writing is not None:
                    await writing
                    if progress is not None:
                        progress(self.tally)
                writing = asyncio.create_task(self._finish(ready, len(raw)))
            if writing is not None:
                await writing
                if progress is not None:
                    progress(self.tally)
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                with contextlib.suppress(BaseException):
                    await writing
        return self.tally

    async def batch(self, raw: list[dict[str, Any]]) -> None:
        await self._finish(await self._prepare(raw), len(raw))

    async def _finish(self, ready: list[_Row], size: int) -> None:
        if self.options.dry_run:
            await self._dry(ready)
        elif ready:
            await self._write(ready)
        self.tally.done += size

    async def _prepare(self, raw: list[dict[str, Any]]) -> list[_Row]:
        """The rows of a batch that go on to be stored, decrypted and validated; the others
        reported (failed or skipped)."""
        rows: list[_Row] = []
        ids_here: set[str] = set()
        for fields in raw:
            source_id = _text(fields.get("id"))
            if "_invalid" in fields or not source_id:
                self._failed(source_id or "?", INVALID_FIELD, fields.get("_invalid", "id: missing"))
                continue
            if source_id in ids_here:
                self._failed(source_id, INVALID_FIELD, "id: given twice")
                continue
            ids_here.add(source_id)
            rows.append(_Row(source_id, fields))
        async with storage_errors(), self.service.engine.connect() as conn:
            await imports.plan_each_statement(conn)
            seen = await imports.find(conn, self.options.source, [r.source_id for r in rows])
        planned: list[_Row] = []
        for row in rows:
            try:
                if self._plan(row, seen.get(row.source_id)):
                    planned.append(row)
            except RowProblem as problem:
                self._failed(row.source_id, problem.reason, problem.detail)
        planned = await self._decrypted(planned)
        ready: list[_Row] = []
        for row in planned:
            try:
                ready.append(self._command(row))
            except RowProblem as problem:
                self._failed(row.source_id, problem.reason, problem.detail)
        return ready

    def _failed(self, source_id: str, reason: str, detail: str = "") -> None:
        self.tally.fail(reason)
        self.report(
            {"source_id": source_id, "outcome": "failed", "reason": reason, "detail": detail}
        )

    def _skipped(self, row: _Row, reason: str, integration_id: str | None = None) -> None:
        self.tally.skip(reason)
        self.report(
            {
                "source_id": row.source_id,
                "outcome": "skipped",
                "reason": reason,
                "integration_id": integration_id,
            }
        )

    def _plan(self, row: _Row, seen: imports.Imported | None) -> bool:
        """Whether the row goes on to be stored; raises RowProblem for a failed row."""
        f = row.fields
        row.updated_at = _time("updated_at", f.get("updated_at"))
        if seen is not None:
            newer = (
                self.options.on_conflict == "newer"
                and row.updated_at is not None
                and (seen.source_updated_at is None or row.updated_at > seen.source_updated_at)
            )
            if not newer:
                self._skipped(row, ALREADY_IMPORTED, seen.integration_id)
                return False
            row.replace = True
        status_text = (_text(f.get("status")) or "connected").strip().lower()
        status = _STATUSES.get(status_text)
        if status is None:
            raise RowProblem(INVALID_FIELD, f"status: {status_text[:40]!r} is not a known status")
        if f.get("disconnected_at") is not None and status is not Status.DISCONNECTED:
            status = Status.DISCONNECTED
        row.status = status
        if status is Status.DISCONNECTED and not self.options.include_disconnected:
            self._skipped(row, DISCONNECTED)
            return False
        provider = _text(f.get("provider"))
        provider = self.options.provider_map.get(provider, provider)
        f["provider"] = provider
        if provider not in self.service.providers:
            raise RowProblem(UNKNOWN_PROVIDER, f"provider {provider[:64]!r} is not configured")
        if status is not Status.DISCONNECTED and not f.get("access_token"):
            raise RowProblem(NO_TOKEN, "access_token is empty")
        return True

    async def _decrypted(self, rows: list[_Row]) -> list[_Row]:
        decrypt = self.decrypt
        if decrypt is None:
            return rows
        wanted: list[tuple[_Row, str]] = []
        for row in rows:
            if row.status is Status.DISCONNECTED:
                continue  # never stored: nothing to decrypt
            for name in ("access_token", "refresh_token"):
                if row.fields.get(name):
                    wanted.append((row, name))
        plain = await decrypt([str(r.fields[name]) for r, name in wanted])
        bad: set[str] = set()
        for (row, name), value in zip(wanted, plain, strict=True):
            if value is None:
                bad.add(row.source_id)
            else:
                row.fields[name] = value
        kept = []
        for row in rows:
            if row.source_id in bad:
                self._failed(row.source_id, UNDECRYPTABLE, "the decrypt command refused a token")
            else:
                kept.append(row)
        return kept

    def _command(self, row: _Row) -> _Row:
        f = row.fields
        now = self.service.clock()
        try:
            expires_at = _time("expires_at", f.get("expires_at"))
            refresh = _text(f.get("refresh_token")) or None
            # Checked by the store path as StoreIntegration checks it (range; only with a
            # refresh token): a bad value fails its row.
            refresh_lapses = _time("refresh_token_expires_at", f.get("refresh_token_expires_at"))
            if refresh is not None and (
                expires_at is None or (row.status is Status.EXPIRED and expires_at > now)
            ):
                # Unknown expiry (or expired, whatever the source says): due now, refreshed by
                # the first use or the background pass, once.
                expires_at = now
            metadata = f.get("metadata")
            if isinstance(metadata, str):
                metadata = json.loads(metadata) if metadata.strip() else {}
            if metadata is None:
                metadata = {}
            if not isinstance(metadata, dict):
                raise InvalidArgument("metadata", "must be a JSON object")
            cmd = StoreCommand(
                user_id=_text(f.get("user_id")),
                provider=_text(f.get("provider")),
                account_id=_text(f.get("account_id")),
                tokens=NewTokens(
                    access_token=_text(f.get("access_token")),
                    refresh_token=refresh,
                    token_type=_text(f.get("token_type")) or "Bearer",
                    expires_at=expires_at,
                    refresh_token_expires_at=refresh_lapses,
                    scopes=_scopes(f.get("scopes")),
                ),
                metadata=metadata,
            )
            if row.status is Status.DISCONNECTED:
                validation.text("user_id", cmd.user_id, validation.MAX_ID)
                validation.text("account_id", cmd.account_id, validation.MAX_ID, required=False)
                validation.scopes("scopes", cmd.tokens.scopes)
                validation.metadata(cmd.metadata)
                row.cmd = cmd
            else:
                row.cmd = self.service.prepare(cmd)
        except UnknownProvider as exc:
            raise RowProblem(UNKNOWN_PROVIDER, exc.message) from None
        except InvalidArgument as exc:
            raise RowProblem(INVALID_FIELD, exc.message) from None
        except (ValueError, TypeError, RecursionError) as exc:
            raise RowProblem(INVALID_FIELD, str(exc).splitlines()[0][:200]) from None
        return row

    # -- writing ---------------------------------------------------------------------------

    async def _dry(self, rows: list[_Row]) -> None:
        async with storage_errors(), self.service.engine.connect() as conn:
            await imports.plan_each_statement(conn)
            owners = await repository.owners(conn, sorted({_cmd(r).user_id for r in rows}))
        claimed: set[tuple[str, str, str]] = set()
        for row in rows:
            if self._decide(row, owners, claimed) != "skip":
                self.tally.imported += 1
                self.report({"source_id": row.source_id, "outcome": "would import"})

    def _decide(
        self,
        row: _Row,
        owners: dict[tuple[str, str, str], StoredIntegration],
        claimed: set[tuple[str, str, str]],
    ) -> str:
        """ "new", "replace" (store over the owner's integration) or "skip" (reported)."""
        cmd = _cmd(row)
        key = (cmd.user_id, self.service.canonical(cmd.provider), cmd.account_id)
        if key in claimed:
            # Two source rows of one owner in a batch: the first one wins, as across batches.
            self._skipped(row, ALREADY_PRESENT)
            return "skip"
        claimed.add(key)
        current = owners.get(key)
        if current is None:
            return "new"
        if row.replace:
            return "replace"
        if (
            self.options.on_conflict == "newer"
            and row.updated_at is not None
            and row.updated_at > current.integration.updated_at
        ):
            self.tally.replaced += 1
            return "replace"
        self._skipped(row, ALREADY_PRESENT, current.integration.id)
        return "skip"

    async def _write(self, rows: list[_Row]) -> None:
        """One transaction: new CONNECTED rows inserted together (row, audit event, import
        record, CONNECTED event: all four or none); the rest (replacements, carried-over
        statuses, disconnected records) through the per-row store path; events last."""
        done: list[tuple[_Row, Integration]] = []
        async with write_transaction(self.service.engine, self.service.invalidate) as conn:
            await imports.plan_each_statement(conn)
            seen = await imports.find(conn, self.options.source, [r.source_id for r in rows])
            owners = await repository.owners(conn, sorted({_cmd(r).user_id for r in rows}))
            claimed: set[tuple[str, str, str]] = set()
            fresh: list[_Row] = []
            single: list[_Row] = []
            for row in rows:
                if row.source_id in seen and not row.replace:
                    # Imported since this batch was read (the id came twice in the source).
                    self._skipped(row, ALREADY_IMPORTED, seen[row.source_id].integration_id)
                    continue
                decision = self._decide(row, owners, claimed)
                if decision == "skip":
                    continue
                plain = row.status is Status.CONNECTED or (
                    row.status is Status.EXPIRED and bool(_cmd(row).tokens.refresh_token)
                )
                # A re-import whose integration is gone updates its record: per row.
                if decision == "new" and plain and row.source_id not in seen:
                    fresh.append(row)
                else:
                    single.append(row)
            now = self.service.clock()
            inserted = await self.service.insert_new_in(conn, [_cmd(r) for r in fresh])
            audit_rows = []
            for row, integration in zip(fresh, inserted, strict=True):
                call = self._call(row)
                call.note(integration)
                if self.auditor is not None:
                    audit_rows.append(self.auditor.event(call, "OK"))
                done.append((row, integration))
            await audit_log.insert_events(conn, audit_rows)
            await imports.record_many(
                conn,
                self.options.source,
                [(r.source_id, i.id, r.updated_at) for r, i in zip(fresh, inserted, strict=True)],
                now,
            )
            for row in single:
                integration = await self._store_row(conn, row)
                await imports.record(
                    conn,
                    self.options.source,
                    row.source_id,
                    integration.id,
                    row.updated_at,
                    now,
                    replace=row.source_id in seen,
                )
                done.append((row, integration))
            await events.connected_many(conn, inserted, now, f"tokens stored by {METHOD}")
        for row, integration in done:
            self.tally.imported += 1
            self.report(
                {
                    "source_id": row.source_id,
                    "outcome": "imported",
                    "integration_id": integration.id,
                    "status": integration.status.value,
                }
            )

    def _call(self, row: _Row) -> Call:
        call = Call(
            self.caller, METHOD, ids.request_id(), detail=f"source id {row.source_id}"[:255]
        )
        if self.auditor is not None:
            call.journal = self.auditor.stage
        return call

    async def _store_row(self, conn: AsyncConnection, row: _Row) -> Integration:
        token = context.current_call.set(self._call(row))
        try:
            if row.status is Status.DISCONNECTED:
                return await self._store_disconnected(conn, row)
            cmd = row.cmd
            assert cmd is not None
            integration, _ = await self.service.store_in(conn, cmd)
            if row.status in (Status.NEEDS_REAUTHORIZATION, Status.EXPIRED) and not (
                row.status is Status.EXPIRED and cmd.tokens.refresh_token
            ):
                integration = await self._settle_status(conn, integration, row.status)
            return integration
        finally:
            context.current_call.reset(token)

    async def _settle_status(
        self, conn: AsyncConnection, integration: Integration, status: Status
    ) -> Integration:
        """Carry the source's NEEDS_REAUTHORIZATION (or EXPIRED without a refresh token) over,
        with its event, in the row's transaction."""
        now = self.service.clock()
        await repository.update_row(
            conn, integration.id, integration.version, {"status": status.value, "updated_at": now}
        )
        if status is Status.NEEDS_REAUTHORIZATION:
            await events.needs_reauthorization(conn, integration, now, "imported")
        else:
            await events.record(
                conn,
                events.EventType.EXPIRED,
                integration,
                now,
                reason="TOKEN_EXPIRED",
                message="imported expired, without a refresh token",
            )
        stored = await repository.get(conn, integration.id)
        assert stored is not None
        return stored.integration

    async def _store_disconnected(self, conn: AsyncConnection, row: _Row) -> Integration:
        """``--include-disconnected``: the record of a past integration, with no secret."""
        cmd = row.cmd
        assert cmd is not None
        now = self.service.clock()
        f = row.fields
        iid = str(uuid.uuid4())
        await repository.insert_row(
            conn,
            {
                "id": iid,
                "user_id": cmd.user_id,
                "provider": self.service.canonical(cmd.provider),
                "account_id": cmd.account_id,
                "status": Status.DISCONNECTED.value,
                "access_token_ct": None,
                "refresh_token_ct": None,
                "key_id": None,
                "token_type": cmd.tokens.token_type,
                "scopes": list(cmd.tokens.scopes),
                "metadata": cmd.metadata,
                "created_at": _time("created_at", f.get("created_at")) or now,
                "updated_at": now,
                "expires_at": None,
                "disconnected_at": _time("disconnected_at", f.get("disconnected_at")) or now,
                "disconnect_reason": (_text(f.get("disconnect_reason")) or None),
                "revocation": "SKIPPED",
                "credential_type": Kind.AUTHORIZATION_CODE.value,
                "version": 1,
            },
        )
        stored = await repository.get(conn, iid)
        assert stored is not None
        context.note(stored.integration)
        await context.audit_in(conn)
        await events.record(
            conn,
            events.EventType.DISCONNECTED,
            stored.integration,
            now,
            reason="DISCONNECTED",
            message="imported disconnected",
            revocation="SKIPPED",
        )
        return stored.integration


def _cmd(row: _Row) -> StoreCommand:
    assert row.cmd is not None
    return row.cmd


# -- verification ----------------------------------------------------------------------------

ALIVE = "alive"
DEAD = "dead"
UNREACHABLE = "unreachable"
NOT_RENEWABLE = "no-refresh"
UNVERIFIABLE = "unverifiable"


async def verify(
    service: IntegrationService,
    refresher: Refresher,
    source: str,
    *,
    concurrency: int = 4,
    attempts: int = 3,
) -> list[dict[str, Any]]:
    """Refresh every imported, not yet verified integration with a refresh token, through the
    refresh engine (one refresh per integration, the provider's throttle), and record which
    grants the provider still honours."""
    async with storage_errors(), service.engine.connect() as conn:
        records = [
            r for r in await imports.all_of(conn, source) if r.verified is None and not r.wiped_at
        ]
    gate = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []

    async def one(record: imports.Imported) -> None:
        async with gate:
            verdict, detail = await _verify_one(service, refresher, record.integration_id, attempts)
        async with write_transaction(service.engine) as conn:
            await imports.set_verified(conn, source, record.source_id, verdict, service.clock())
        results.append(
            {
                "source_id": record.source_id,
                "integration_id": record.integration_id,
                "verified": verdict,
                "detail": detail,
            }
        )

    await asyncio.gather(*(one(r) for r in records))
    results.sort(key=lambda r: str(r["source_id"]))
    return results


async def _verify_one(
    service: IntegrationService, refresher: Refresher, iid: str, attempts: int
) -> tuple[str, str]:
    request = TokenRequest(selector=Selector(integration_id=iid), force_refresh=True)
    detail = ""
    for _ in range(attempts):
        async with storage_errors(), service.engine.connect() as conn:
            stored = await repository.get(conn, iid)
        if stored is None:
            return DEAD, "the integration is gone"
        if stored.integration.status is Status.NEEDS_REAUTHORIZATION:
            return DEAD, "needs reauthorization"
        if stored.integration.status is Status.DISCONNECTED or not stored.renewable:
            return NOT_RENEWABLE, "no refresh token"
        try:
            await refresher.refresh(stored, request)
        except ReauthorizationRequired as exc:
            return DEAD, exc.reason
        except (ProviderUnavailable, StorageUnavailable) as exc:
            # Worth another try once the provider (or the database) lets us.
            detail = exc.reason
            await asyncio.sleep(min(float(getattr(exc, "retry_after", 1.0)), 30.0))
            continue
        except BrokerError as exc:
            # No client configured for the provider, or another answer retrying cannot change.
            return UNVERIFIABLE, f"{exc.reason}: {exc.message}"[:300]
        return ALIVE, ""
    return UNREACHABLE, detail


# -- source values ---------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _time(name: str, value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        parsed = datetime.fromtimestamp(value, UTC)
    else:
        text = str(value).strip().replace(" ", "T", 1)
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidArgument(name, "is not an ISO 8601 time") from None
    if parsed.tzinfo is None:  # timestamp without time zone: taken as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _scopes(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        elif text.startswith("{") and text.endswith("}"):  # a PostgreSQL array as text
            value = [s.strip().strip('"') for s in text[1:-1].split(",") if s.strip()]
        else:
            value = text.replace(",", " ").split()
    if not isinstance(value, list | tuple):
        raise InvalidArgument("scopes", "must be a list of strings")
    return tuple(str(s) for s in value)
