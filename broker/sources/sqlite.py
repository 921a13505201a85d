"""An application's table in a SQLite file, read in keyset pages on the key column."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from broker.sources import SourceError, mapped, quote


class SqliteSource:
    writable = True

    def __init__(
        self, path: str, table: str, where: str | None, mapping: dict[str, str | None]
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"--from: {path} is neither a PostgreSQL URL nor a SQLite file")
        self.name = f"sqlite:{self.path.resolve()}/{table}"
        self.table = quote(table)
        self.where = f"({where})" if where else "1"
        self.mapping = mapping
        self.key = quote(mapping["id"] or "id")
        self.select = ", ".join(quote(c) for c in sorted({c for c in mapping.values() if c}))

    def _connect(self, write: bool = False) -> sqlite3.Connection:
        mode = "rw" if write else "ro"
        conn = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        try:
            conn = self._connect()
            try:
                return [dict(r) for r in conn.execute(sql, params).fetchall()]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise SourceError(f"cannot read {self.name}: {exc}") from None

    async def count(self) -> int | None:
        # Quoted names, and the operator's own --where: nobody else's text reaches the SQL.
        sql = f"SELECT count(*) AS n FROM {self.table} WHERE {self.where}"  # noqa: S608
        rows = await asyncio.to_thread(self._fetch, sql, ())
        return int(rows[0]["n"])

    async def batches(self, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        key_column = self.mapping["id"] or "id"
        last: Any = None
        while True:
            if last is None:
                sql = (
                    f"SELECT {self.select} FROM {self.table} WHERE {self.where} "  # noqa: S608
                    f"ORDER BY {self.key} LIMIT ?"
                )
                params: tuple[Any, ...] = (size,)
            else:
                sql = (
                    f"SELECT {self.select} FROM {self.table} WHERE {self.where} "  # noqa: S608
                    f"AND {self.key} > ? ORDER BY {self.key} LIMIT ?"
                )
                params = (last, size)
            rows = await asyncio.to_thread(self._fetch, sql, params)
            if not rows:
                return
            last = rows[-1][key_column]
            yield [mapped(r, self.mapping) for r in rows]
            if len(rows) < size:
                return

    def _wipe(self, source_ids: list[str]) -> int:
        tokens = [c for c in (self.mapping["access_token"], self.mapping["refresh_token"]) if c]
        if not tokens or not source_ids:
            return 0
        assignments = ", ".join(f"{quote(c)} = NULL" for c in tokens)
        try:
            conn = self._connect(write=True)
            try:
                changed = 0
                with conn:  # one transaction
                    for start in range(0, len(source_ids), 500):
                        chunk = source_ids[start : start + 500]
                        marks = ", ".join("?" * len(chunk))
                        changed += conn.execute(
                            f"UPDATE {self.table} SET {assignments} "  # noqa: S608
                            f"WHERE CAST({self.key} AS TEXT) IN ({marks})",
                            chunk,
                        ).rowcount
                return changed
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise SourceError(f"cannot clear tokens in {self.name}: {exc}") from None

    async def wipe(self, source_ids: list[str]) -> int:
        return await asyncio.to_thread(self._wipe, source_ids)

    async def close(self) -> None:
        return None
