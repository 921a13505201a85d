"""Key rotation: how many ciphertexts each key protects, and online re-encryption to the primary.

Re-encryption also upgrades the binding: a ciphertext written before owner binding (format 1,
bound to environment, row and column only) is rewritten owner-bound (format 2, also bound to
the row's user_id, provider, account_id and credential kind) even when it is already under the
primary key. A format-1 ciphertext proves nothing about its owner, so it is bound to the owner
the row has when it is upgraded.

Re-encryption runs while brokers serve. It walks ``integrations`` and ``oauth_flows`` in primary
key order, in batches, and selects only rows whose key id is not the primary one or that still
hold a format-1 ciphertext — so a run that was interrupted simply resumes where the last
committed batch stopped, and a row once done is never selected again. Each row is rewritten
with a compare-and-swap on ``version`` that also requires no live refresh lease:

- a refresh that took the lease first makes our UPDATE match nothing: we leave the row to it and
  come back in a later pass (its tokens get written under the primary key anyway, by a broker
  that already has the new keyring);
- a write that landed between our read and our UPDATE (a refresh, a StoreIntegration, a
  Disconnect) makes the CAS fail: we re-read the row and start again from *its* tokens, so the
  newer tokens are what ends up under the new key — nothing is lost, nothing is resurrected.

Bumping ``version`` in turn makes any writer that read the row before us retry from our state.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    LargeBinary,
    Row,
    Table,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.crypto import OWNER_BOUND, ROW_BOUND, Binding, Keyring, key_id_of, version_of
from broker.errors import CiphertextInvalid, StorageUnavailable
from broker.storage.engine import storage_errors, touch
from broker.storage.tables import integrations, oauth_flows

log = logging.getLogger("broker.rotation")

# Column names bound into the associated data; they must match the writers'
# (broker.domain.integrations ACCESS/REFRESH, broker.domain.credentials CREDENTIAL,
# broker.domain.authorization VERIFIER_COLUMN).
_INTEGRATION_COLUMNS = {
    "access_token_ct": "access_token",
    "refresh_token_ct": "refresh_token",
    "credential_ct": "credential",
}
_FLOW_COLUMNS = {"verifier_ct": "pkce_verifier"}
# The owner bound into a ciphertext (broker.domain.integrations Owner): these columns of the row;
# a flow has no credential_type and stores authorization-code tokens.
_OWNER_COLUMNS = ("user_id", "provider", "account_id")
_FLOW_KIND = "authorization_code"
# A row whose version keeps moving under us is left for a later pass after this many tries.
_CAS_ATTEMPTS = 3


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KeyCount:
    """What one key id protects: integration rows, open PKCE flows, and their ciphertexts."""

    integrations: int = 0
    flows: int = 0
    ciphertexts: int = 0


async def key_status(engine: AsyncEngine) -> dict[str, KeyCount]:
    """Ciphertexts per key id across ``integrations`` and ``oauth_flows``."""
    cases = [case((integrations.c[c].is_not(None), 1), else_=0) for c in _INTEGRATION_COLUMNS]
    present: ColumnElement[Any] = cases[0]
    for more in cases[1:]:
        present = present + more
    async with storage_errors(), engine.connect() as conn:
        rows = (
            await conn.execute(
                select(integrations.c.key_id, func.count(), func.sum(present))
                .where(integrations.c.key_id.is_not(None))
                .group_by(integrations.c.key_id)
            )
        ).all()
        flow_rows = (
            await conn.execute(
                select(oauth_flows.c.key_id, func.count())
                .where(oauth_flows.c.key_id.is_not(None), oauth_flows.c.verifier_ct.is_not(None))
                .group_by(oauth_flows.c.key_id)
            )
        ).all()
    counts: dict[str, KeyCount] = {}
    for kid, n, cts in rows:
        counts[str(kid)] = KeyCount(integrations=int(n), ciphertexts=int(cts or 0))
    for kid, n in flow_rows:
        old = counts.get(str(kid), KeyCount())
        counts[str(kid)] = KeyCount(old.integrations, old.flows + int(n), old.ciphertexts + int(n))
    return counts


@dataclass(frozen=True, slots=True)
class Progress:
    """Handed to the progress callback after every batch."""

    done: int  # rows re-encrypted so far in this run
    total: int  # rows under another key when the run started
    deferred: int  # rows skipped for now: being refreshed, or changing under us
    failed: int  # rows whose ciphertext did not decrypt (see the report)


def row_bound(column: ColumnElement[Any]) -> ColumnElement[bool]:
    """A stored ciphertext written before owner binding (its first byte is format 1)."""
    first = func.substr(column, 1, 1, type_=LargeBinary)
    return and_(column.is_not(None), first == literal(bytes((ROW_BOUND,)), LargeBinary))


@dataclass(frozen=True, slots=True)
class RowBound:
    """What still uses the binding from before owner binding (see ``broker.crypto.aead``)."""

    integrations: int = 0
    flows: int = 0
    ciphertexts: int = 0

    @property
    def rows(self) -> int:
        return self.integrations + self.flows


async def row_bound_status(engine: AsyncEngine) -> RowBound:
    """Rows and ciphertexts still row-bound only: ``broker keys reencrypt`` upgrades them."""
    counts: list[tuple[int, int]] = []
    async with storage_errors(), engine.connect() as conn:
        for target in _TARGETS:
            t = target.table.c
            flags = [case((row_bound(t[c]), 1), else_=0) for c in target.columns]
            present: ColumnElement[Any] = flags[0]
            for more in flags[1:]:
                present = present + more
            n, cts = (
                await conn.execute(
                    select(func.count(), func.sum(present))
                    .select_from(target.table)
                    .where(or_(*(row_bound(t[c]) for c in target.columns)))
                )
            ).one()
            counts.append((int(n or 0), int(cts or 0)))
    (rows, cts), (flows, flow_cts) = counts
    return RowBound(rows, flows, cts + flow_cts)


@dataclass
class ReencryptReport:
    primary: str
    # Ciphertexts moved to the primary key, per key id they were under.
    rewritten: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    # Rows another writer moved to the primary key while we were at it.
    resolved_by_others: int = 0
    # Rows skipped in the last pass: still being refreshed (or contended) when we gave up.
    deferred: int = 0
    # Rows still under another key when the run ended (deferred, failed, or not reached).
    remaining: int = 0
    # Ciphertexts rewritten from the row-bound format to the owner-bound one.
    upgraded: int = 0
    # "table id" → reason, for ciphertexts that failed to decrypt (never the ciphertext).
    failed: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    # True when no row is left under another key or row-bound; else run again (it resumes).
    complete: bool = False


@dataclass(frozen=True)
class _Target:
    """One table to re-encrypt and how to address its rows."""

    table: Table
    pk: str
    columns: dict[str, str]  # ciphertext column → name in the associated data
    leased: bool  # has refresh_lease_until
    kind: str | None  # the credential kind of every row; None: the credential_type column

    @property
    def owner_columns(self) -> tuple[str, ...]:
        return _OWNER_COLUMNS if self.kind is not None else (*_OWNER_COLUMNS, "credential_type")

    def needs_work(self, primary: str) -> ColumnElement[bool]:
        t = self.table.c
        stored = or_(*(t[c].is_not(None) for c in self.columns))
        return and_(
            stored,
            or_(
                t.key_id.is_(None),
                t.key_id != primary,
                *(row_bound(t[c]) for c in self.columns),
            ),
        )

    def binding(self, environment: str, row: Row[Any], column: str) -> Binding:
        m = row._mapping
        return Binding(
            environment,
            str(m[self.pk]),
            self.columns[column],
            m["user_id"],
            m["provider"],
            m["account_id"],
            self.kind if self.kind is not None else m["credential_type"],
        )


_TARGETS = (
    _Target(integrations, "id", _INTEGRATION_COLUMNS, leased=True, kind=None),
    _Target(oauth_flows, "state_hash", _FLOW_COLUMNS, leased=False, kind=_FLOW_KIND),
)


class _Run:
    def __init__(
        self,
        engine: AsyncEngine,
        keyring: Keyring,
        environment: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.keyring = keyring
        self.environment = environment
        self.clock = clock
        self.report = ReencryptReport(primary=keyring.primary_id)

    def _select(self, target: _Target) -> Any:
        t = target.table.c
        cols = [
            t[target.pk],
            t.version,
            t.key_id,
            *(t[c] for c in target.owner_columns),
            *(t[c] for c in target.columns),
        ]
        if target.leased:
            cols.append(t.refresh_lease_until)
        return select(*cols)

    def _live_lease(self, target: _Target, row: Row[Any], now: datetime) -> bool:
        if not target.leased:
            return False
        until = row._mapping["refresh_lease_until"]
        if until is None:
            return False
        if until.tzinfo is None:  # SQLite hands datetimes back naive (they are UTC)
            until = until.replace(tzinfo=UTC)
        return bool(until >= now)

    def _rewrite(self, target: _Target, row: Row[Any]) -> tuple[dict[str, Any], Counter[str], int]:
        """New owner-bound ciphertexts under the primary for the row (raises
        CiphertextInvalid), the old key ids moved, and how many were row-bound."""
        m = row._mapping
        values: dict[str, Any] = {"key_id": self.keyring.primary_id}
        moved: Counter[str] = Counter()
        upgraded = 0
        for column in target.columns:
            blob = m[column]
            if blob is None:
                continue
            binding = target.binding(self.environment, row, column)
            # Always rewritten, even a ciphertext already owner-bound under the primary: the
            # row's key_id then names the one key all of its ciphertexts use.
            plaintext = self.keyring.open(blob, binding)
            if version_of(blob) != OWNER_BOUND:
                upgraded += 1
            moved[key_id_of(blob)] += 1
            values[column] = self.keyring.seal(plaintext, binding)
        return values, moved, upgraded

    async def _cas(
        self,
        conn: AsyncConnection,
        target: _Target,
        row: Row[Any],
        values: dict[str, Any],
        now: datetime,
    ) -> bool:
        t = target.table.c
        m = row._mapping
        conditions = [t[target.pk] == m[target.pk], t.version == m["version"]]
        # The owner the new ciphertexts are bound to must still be the row's: a row changed
        # underneath without a version bump is re-read (``_retry``), never sealed to an owner
        # it no longer has.
        conditions += [t[c] == m[c] for c in target.owner_columns]
        # The ciphertexts we re-encrypted must still be there: a flow whose verifier was
        # forgotten (consumed) meanwhile must not get it back.
        conditions += [t[c].is_not(None) for c in target.columns if m[c] is not None]
        if target.leased:
            # Atomic with the write: a refresh that took the lease after our read wins.
            conditions.append(or_(t.refresh_lease_until.is_(None), t.refresh_lease_until < now))
        result = await conn.execute(
            update(target.table).where(*conditions).values(version=t.version + 1, **values)
        )
        if result.rowcount != 1:
            return False
        if target.leased:
            # Cached rows elsewhere hold the old ciphertext: tell replicas (a key change).
            await touch(conn, str(m[target.pk]))
        return True

    def _fail(self, target: _Target, rid: str, exc: CiphertextInvalid) -> None:
        self.report.failed[f"{target.table.name} {rid}"] = exc.message
        log.error(
            "re-encryption: %s row %s does not decrypt (%s); left as it is",
            target.table.name,
            rid,
            exc.message,
        )

    async def read_batch(self, target: _Target, after: str, size: int) -> list[Row[Any]]:
        """The next rows under another key, in primary key order, after ``after``."""
        t = target.table.c
        async with storage_errors(), self.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        self._select(target)
                        .where(target.needs_work(self.keyring.primary_id), t[target.pk] > after)
                        .order_by(t[target.pk])
                        .limit(size)
                    )
                ).all()
            )

    async def batch(self, target: _Target, after: str, size: int, deferred: set[str]) -> str | None:
        """Re-encrypt one batch after ``after``; returns the last id seen, None at the end."""
        rows = await self.read_batch(target, after, size)
        if not rows:
            return None
        now = self.clock()
        planned: list[tuple[Row[Any], dict[str, Any], Counter[str], int]] = []
        for row in rows:
            rid = str(row._mapping[target.pk])
            if f"{target.table.name} {rid}" in self.report.failed:
                continue
            if self._live_lease(target, row, now):
                deferred.add(rid)
                continue
            try:
                values, moved, upgraded = self._rewrite(target, row)
            except CiphertextInvalid as exc:
                self._fail(target, rid, exc)
                continue
            planned.append((row, values, moved, upgraded))
        # Crypto happens before the transaction, so row locks are held only for the UPDATEs.
        conflicts: list[str] = []
        async with storage_errors(), self.engine.begin() as conn:
            for row, values, moved, upgraded in planned:
                if await self._cas(conn, target, row, values, now):
                    self._count(moved, upgraded)
                else:
                    conflicts.append(str(row._mapping[target.pk]))
        for rid in conflicts:
            await self._retry(target, rid, deferred)
        self.report.batches += 1
        return str(rows[-1]._mapping[target.pk])

    def _count(self, moved: Counter[str], upgraded: int) -> None:
        self.report.rewritten.update(moved)
        self.report.upgraded += upgraded
        self.report.rows += 1

    async def _retry(self, target: _Target, rid: str, deferred: set[str]) -> None:
        """The row changed between our read and our write: start again from what is there."""
        t = target.table.c
        for _ in range(_CAS_ATTEMPTS):
            now = self.clock()
            async with storage_errors(), self.engine.begin() as conn:
                row = (await conn.execute(self._select(target).where(t[target.pk] == rid))).first()
                if row is None:
                    return  # deleted meanwhile: nothing left to protect
                m = row._mapping
                blobs = [m[c] for c in target.columns if m[c] is not None]
                if not blobs or (
                    m["key_id"] == self.keyring.primary_id
                    and all(blob[:1] == bytes((OWNER_BOUND,)) for blob in blobs)
                ):
                    self.report.resolved_by_others += 1
                    return
                if self._live_lease(target, row, now):
                    deferred.add(rid)
                    return
                try:
                    values, moved, upgraded = self._rewrite(target, row)
                except CiphertextInvalid as exc:
                    self._fail(target, rid, exc)
                    return
                if await self._cas(conn, target, row, values, now):
                    self._count(moved, upgraded)
                    return
        deferred.add(rid)


async def report_row_bound(engine: AsyncEngine, *, required: bool) -> None:
    """At start-up: log how many rows are still only row-bound.

    Served as before unless ``required`` (keys.require_owner_binding): then each of them
    answers DATA_LOSS until ``broker keys reencrypt`` upgrades it."""
    try:
        found = await row_bound_status(engine)
    except StorageUnavailable:
        return  # the health watch reports the database; this count is only advice
    if not found.rows:
        return
    if required:
        log.error(
            "%d integration(s) and %d flow(s) are not bound to their owner and are refused "
            "(keys.require_owner_binding); run `broker keys reencrypt`",
            found.integrations,
            found.flows,
        )
    else:
        log.warning(
            "%d integration(s) and %d flow(s) are bound to their row only, not to their owner; "
            "run `broker keys reencrypt`, then set keys.require_owner_binding",
            found.integrations,
            found.flows,
        )


async def pending_rows(engine: AsyncEngine, primary: str) -> int:
    """Rows (integrations and flows) with a ciphertext under a key other than ``primary``, or
    not yet owner-bound."""
    total = 0
    async with storage_errors(), engine.connect() as conn:
        for target in _TARGETS:
            n = await conn.scalar(
                select(func.count()).select_from(target.table).where(target.needs_work(primary))
            )
            total += int(n or 0)
    return total


async def reencrypt(
    engine: AsyncEngine,
    keyring: Keyring,
    environment: str,
    *,
    batch_size: int = 200,
    max_batches: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    lease_wait_seconds: float = 180.0,
    retry_interval_seconds: float = 1.0,
    clock: Callable[[], datetime] = _utcnow,
) -> ReencryptReport:
    """Re-encrypt every ciphertext not under the keyring's primary key, or not owner-bound,
    online, to the primary key and the owner binding.

    Rows being refreshed are retried in later passes for up to ``lease_wait_seconds`` (a
    lease outlives its holder's provider calls; one left by a crashed broker lapses by itself).
    ``max_batches`` stops early — the next run resumes. Rows that do not decrypt are reported
    in ``failed`` and left untouched.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    run = _Run(engine, keyring, environment, clock)
    total = await pending_rows(engine, keyring.primary_id)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + lease_wait_seconds
    report = run.report

    def tell(deferred: int) -> None:
        if progress is not None:
            progress(Progress(report.rows, total, deferred, len(report.failed)))

    async def finish(deferred: int) -> ReencryptReport:
        report.deferred += deferred
        report.remaining = await pending_rows(engine, keyring.primary_id)
        report.complete = report.remaining == 0
        tell(report.deferred)
        return report

    tell(0)
    for target in _TARGETS:
        deferred: set[str] = set()
        after = ""
        while True:
            if max_batches is not None and report.batches >= max_batches:
                return await finish(len(deferred))
            last = await run.batch(target, after, batch_size, deferred)
            if last is not None:
                after = last
                tell(len(deferred))
                continue
            if not deferred:
                break
            # End of a pass with rows skipped: go round again for those (and only those are
            # left, apart from failed ones) once their refreshes have had time to finish.
            if loop.time() >= give_up:
                break
            deferred = set()
            after = ""
            await asyncio.sleep(retry_interval_seconds)
        report.deferred += len(deferred)
    return await finish(0)
