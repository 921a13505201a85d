"""What commands print: one table layout, and one JSON shape (``--json``): timestamps in
ISO 8601 with their UTC offset, absent values as ``null``. Tables show absent values as ``-``.
Nothing printed ever carries a token, a secret or a key."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TextIO


def when(value: datetime | None) -> str | None:
    """ISO 8601 in UTC to the second (``2026-12-07T19:50:00+00:00``); None stays None."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="seconds")


def plain(value: Any) -> Any:
    """A value as JSON shows it: datetimes as ``when``, enums by value, sets sorted."""
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def cell(value: Any) -> str:
    value = plain(value)
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def table(rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def records(
    items: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    as_json: bool,
    empty: str,
) -> None:
    """A list: JSON (every field of every item) or a table of ``columns`` (header, field);
    ``empty`` goes to stderr when a table would have no rows."""
    if as_json:
        print(json.dumps([plain(i) for i in items], indent=2))
        return
    if not items:
        print(empty, file=sys.stderr)
        return
    header = [name for name, _ in columns]
    table([header, *[[cell(i.get(field)) for _, field in columns] for i in items]])


def record(item: Mapping[str, Any], *, as_json: bool) -> None:
    """One item: JSON, or one ``name: value`` line per field."""
    if as_json:
        print(json.dumps(plain(item), indent=2))
        return
    width = max(len(k) for k in item) + 2
    for name, value in item.items():
        print(f"{name + ':':<{width}} {cell(value)}")


class ProgressBar:
    """A one-line bar on stderr when it is a terminal; otherwise a line per tenth."""

    def __init__(self, what: str, out: TextIO, width: int = 30) -> None:
        self.what = what
        self.out = out
        self.width = width
        self.tty = out.isatty()
        self._last_tenth = -1

    def __call__(self, progress: Any) -> None:
        if not progress.total:
            return
        done, total = progress.done, progress.total
        share = min(done / total, 1.0)
        extra = ""
        if getattr(progress, "deferred", 0):
            extra += f", {progress.deferred} busy (retrying)"
        if getattr(progress, "failed", 0):
            extra += f", {progress.failed} failed"
        if self.tty:
            filled = int(share * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            print(
                f"\r{self.what} [{bar}] {done}/{total} rows{extra}\x1b[K",
                end="",
                file=self.out,
                flush=True,
            )
        elif int(share * 10) != self._last_tenth:
            self._last_tenth = int(share * 10)
            print(f"{self.what}: {done}/{total} rows{extra}", file=self.out, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)
