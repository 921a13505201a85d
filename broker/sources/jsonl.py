"""Integrations as JSON Lines (one object per line, keyed by the source's column names), from
a file or standard input. Read only: ``--wipe-source`` cannot clear a file's tokens."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from broker.sources import SourceError, mapped


class JsonLinesSource:
    writable = False

    def __init__(self, path: str, mapping: dict[str, str | None]) -> None:
        self.path = None if path == "-" else Path(path)
        if self.path is not None and not self.path.is_file():
            raise SourceError(f"--from: no such file {path}")
        self.name = "jsonl:-" if self.path is None else f"jsonl:{self.path.resolve()}"
        self.mapping = mapping

    async def count(self) -> int | None:
        if self.path is None:
            return None
        path = self.path

        def lines() -> int:
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())

        return await asyncio.to_thread(lines)

    async def batches(self, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        stream: IO[str] = sys.stdin if self.path is None else self.path.open(encoding="utf-8")
        try:
            number = 0
            while True:
                lines = await asyncio.to_thread(_read, stream, size)
                if not lines:
                    return
                batch = []
                for line in lines:
                    number += 1
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    if not isinstance(row, dict):
                        # Kept as a row without fields: reported as failed, by line number.
                        batch.append({"id": f"line {number}", "_invalid": "not a JSON object"})
                        continue
                    batch.append(mapped(row, self.mapping))
                yield batch
        finally:
            if stream is not sys.stdin:
                stream.close()

    async def wipe(self, source_ids: list[str]) -> int:
        raise SourceError("--wipe-source: a JSON Lines source cannot be cleared in place")

    async def close(self) -> None:
        return None


def _read(stream: IO[str], size: int) -> list[str]:
    lines: list[str] = []
    while len(lines) < size:
        line = stream.readline()
        if not line:
            break
        if line.strip():
            lines.append(line)
    return lines
