"""Reading an application's own integrations table for ``broker import``: PostgreSQL (asyncpg,
keyset pages), a SQLite file, or JSON Lines; and the operator's decrypt command. Nothing here
knows the broker's schema: rows come out keyed by the broker's field names (``--map``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

# The broker fields a source row can fill, and the seed schema's column for each (None: the
# seed table has no such column; give one with --map).
DEFAULT_MAP: dict[str, str | None] = {
    "id": "id",
    "user_id": "user_id",
    "provider": "provider",
    "account_id": None,
    "status": "status",
    "access_token": "access_token",
    "refresh_token": "refresh_token",
    "token_type": None,
    "expires_at": "expires_at",
    "refresh_token_expires_at": None,
    "scopes": "scopes",
    "metadata": "metadata",
    "created_at": "created_at",
    "updated_at": "updated_at",
    "disconnected_at": "disconnected_at",
    "disconnect_reason": "disconnect_reason",
}


class SourceError(Exception):
    """The source cannot be read or written (the message names it; never a credential)."""


class Source(Protocol):
    # Names the table in the ``imports`` record (host, database, table; never a password).
    name: str
    # Whether ``wipe`` can clear token columns in place.
    writable: bool

    async def count(self) -> int | None: ...

    def batches(self, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        """Rows keyed by broker field, in a stable order, ``size`` at a time."""
        ...

    async def wipe(self, source_ids: list[str]) -> int:
        """Set the token columns of exactly these rows to NULL, in one transaction."""
        ...

    async def close(self) -> None: ...


def parse_map(text: str) -> dict[str, str | None]:
    """``broker_field=source_column,...`` over the defaults (an empty column unmaps a field)."""
    mapping = dict(DEFAULT_MAP)
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        field = field.strip()
        if not sep or field not in DEFAULT_MAP:
            raise ValueError(
                f"--map: {part!r} is not broker_field=source_column with a field of "
                f"{', '.join(DEFAULT_MAP)}"
            )
        mapping[field] = column.strip() or None
    if not mapping["id"]:
        raise ValueError("--map: id must name the source's key column")
    return mapping


def parse_pairs(text: str, flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        old, sep, new = part.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"{flag}: {part!r} is not old=new")
        pairs[old.strip()] = new.strip()
    return pairs


def mapped(row: Mapping[str, Any], mapping: Mapping[str, str | None]) -> dict[str, Any]:
    return {field: row.get(column) for field, column in mapping.items() if column}


def quote(identifier: str) -> str:
    """A possibly schema-qualified SQL name, each part quoted."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in identifier.split("."))


def open_source(url: str, table: str, where: str | None, mapping: dict[str, str | None]) -> Source:
    if url.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
        from broker.sources.postgres import PostgresSource

        return PostgresSource(url, table, where, mapping)
    if url == "-" or url.endswith((".jsonl", ".ndjson", ".json")):
        if where:
            raise ValueError("--where: only SQL sources (PostgreSQL, SQLite) take a slice")
        from broker.sources.jsonl import JsonLinesSource

        return JsonLinesSource(url, mapping)
    from broker.sources.sqlite import SqliteSource

    return SqliteSource(
        url.removeprefix("sqlite:///").removeprefix("sqlite://"), table, where, mapping
    )
