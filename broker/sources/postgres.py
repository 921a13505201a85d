"""An application's table on PostgreSQL (Supabase included), read in keyset pages on the key
column: memory stays flat and no transaction is held open between pages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from broker.sources import SourceError, mapped, quote


class PostgresSource:
    writable = True

    def __init__(
        self, url: str, table: str, where: str | None, mapping: dict[str, str | None]
    ) -> None:
        self.url = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        parts = urlsplit(self.url)
        self.name = f"postgresql://{parts.hostname or ''}:{parts.port or 5432}{parts.path}/{table}"
        self.table = quote(table)
        self.where = f"({where})" if where else "TRUE"
        self.mapping = mapping
        self.key = quote(mapping["id"] or "id")
        columns = sorted({c for c in mapping.values() if c})
        self.columns = columns
        self.select = ", ".join(quote(c) for c in columns)
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(self.url, timeout=10)
            except (OSError, asyncpg.PostgresError) as exc:
                raise SourceError(
                    f"cannot connect to the source {self.name}: {_cause(exc)}"
                ) from None
            # jsonb as Python values, not text.
            await self._conn.set_type_codec(
                "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
            await self._conn.set_type_codec(
                "json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        return self._conn

    async def count(self) -> int | None:
        conn = await self._connection()
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {self.table} WHERE {self.where}"))  # noqa: S608
        except asyncpg.PostgresError as exc:
            raise SourceError(f"cannot read {self.name}: {_cause(exc)}") from None

    async def batches(self, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        first = (
            f"SELECT {self.select} FROM {self.table} WHERE {self.where} "  # noqa: S608
            f"ORDER BY {self.key} LIMIT $1"
        )
        after = (
            f"SELECT {self.select} FROM {self.table} WHERE {self.where} AND {self.key} > $2 "  # noqa: S608
            f"ORDER BY {self.key} LIMIT $1"
        )
        key_column = self.mapping["id"] or "id"
        last: Any = None
        while True:
            conn = await self._connection()
            try:
                if last is None:
                    rows = await conn.fetch(first, size)
                else:
                    rows = await conn.fetch(after, size, last)
            except (OSError, asyncpg.PostgresError) as exc:
                raise SourceError(f"cannot read {self.name}: {_cause(exc)}") from None
            if not rows:
                return
            last = rows[-1][key_column]
            yield [mapped(dict(r), self.mapping) for r in rows]
            if len(rows) < size:
                return

    async def wipe(self, source_ids: list[str]) -> int:
        tokens = [c for c in (self.mapping["access_token"], self.mapping["refresh_token"]) if c]
        if not tokens or not source_ids:
            return 0
        assignments = ", ".join(f"{quote(c)} = NULL" for c in tokens)
        conn = await self._connection()
        try:
            async with conn.transaction():
                status = await conn.execute(
                    f"UPDATE {self.table} SET {assignments} "  # noqa: S608
                    f"WHERE {self.key}::text = ANY($1::text[])",
                    source_ids,
                )
        except (OSError, asyncpg.PostgresError) as exc:
            raise SourceError(f"cannot clear tokens in {self.name}: {_cause(exc)}") from None
        return int(status.split()[-1])

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _cause(exc: BaseException) -> str:
    # asyncpg messages name objects and SQL, never parameter values.
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
