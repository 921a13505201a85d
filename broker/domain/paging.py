"""Keyset page tokens: what the last row of a page was, opaque to callers and checked when
it comes back (ListIntegrations, ListGrants, the operator CLI)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Protocol

from broker.domain import validation
from broker.errors import InvalidArgument

# A token is base64 of a short JSON list; anything much longer was not issued here.
_MAX_PAGE_TOKEN = 1024
_OLDEST = datetime(1970, 1, 1, tzinfo=UTC)
_NEWEST = datetime(9000, 1, 1, tzinfo=UTC)


class Paged(Protocol):
    """What a keyset page token remembers of the last row: integrations and grants."""

    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> str: ...


def encode_page_token(last: Paged) -> str:
    raw = json.dumps([last.created_at.isoformat(), last.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str]:
    problem = "is not a token this broker issued"
    if len(token) > _MAX_PAGE_TOKEN:
        raise InvalidArgument("page_token", problem)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_text, last_id = json.loads(raw)
        if not isinstance(created_text, str) or not isinstance(last_id, str):
            raise ValueError("wrong types")
        parsed = datetime.fromisoformat(created_text)
        if parsed.tzinfo is None:
            raise ValueError("naive date")
        created = parsed.astimezone(UTC)
    # RecursionError: a forged token of deeply nested JSON; OverflowError: a date whose
    # conversion to UTC leaves datetime's range.
    except (binascii.Error, ValueError, TypeError, RecursionError, OverflowError):
        raise InvalidArgument("page_token", problem) from None
    # Tokens hold created_at of a stored row; a date at the ends of datetime's range cannot
    # be one, and PostgreSQL could not take it as a parameter anyway.
    if not _OLDEST <= created <= _NEWEST:
        raise InvalidArgument("page_token", problem)
    validation.text("page_token", last_id, validation.MAX_ID, required=False)
    return created, last_id
