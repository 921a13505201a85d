"""Input limits and checks; each failure names the field (INVALID_ARGUMENT) and writes nothing."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from broker import metrics
from broker.errors import InvalidArgument
from broker.model import Selector

MAX_ID = 255
MAX_PROVIDER = 64
MAX_TOKEN = 64 * 1024
MAX_METADATA = 64 * 1024
MAX_SCOPES = 256
MAX_SCOPE = 1024
MAX_TOKEN_TYPE = 64
# A caller's free text (a Disconnect reason) as stored and sent in events and webhooks: it
# fits the event's message column.
MAX_CALLER_TEXT = 255
MAX_PAGE = 500
DEFAULT_PAGE = 50
# One C-level scan instead of a Python generator per character: this runs on every call.
_CONTROL = re.compile(r"[\x00-\x1f]")
# What a caller's free text loses before it reaches an event: C0, DEL and C1 controls (a
# forged line in a log or terminal), and the invisible format characters (bidi overrides,
# zero-width, line and paragraph separators) that make shown text differ from stored text.
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]+"
)


def text(field: str, value: str, limit: int, *, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long; the limit is {limit}")
    if _CONTROL.search(value) is not None:
        raise InvalidArgument(field, "must not contain control characters")
    return value


def caller_text(field: str, value: str, limit: int = MAX_CALLER_TEXT) -> str:
    """A caller's free text made safe to store and pass on: unprintable characters become
    spaces, runs of whitespace one space, and it is cut to ``limit`` characters (ending in
    "…"). Cleaned rather than refused: a Disconnect must not fail over its reason."""
    if _UNPRINTABLE.search(value) is not None:
        metrics.CALLER_TEXT_CLEANED.labels(field, "stripped").inc()
    cleaned = " ".join(_UNPRINTABLE.sub(" ", value).split())
    if len(cleaned) > limit:
        metrics.CALLER_TEXT_CLEANED.labels(field, "truncated").inc()
        cleaned = cleaned[: limit - 1].rstrip() + "…"
    return cleaned


def token(field: str, value: str, *, required: bool) -> str:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value.encode()) > MAX_TOKEN:
        raise InvalidArgument(field, f"is larger than {MAX_TOKEN // 1024} KiB")
    return value


def scopes(
    field: str,
    values: list[str] | tuple[str, ...],
    *,
    max_count: int = MAX_SCOPES,
    max_length: int = MAX_SCOPE,
) -> tuple[str, ...]:
    if len(values) > max_count:
        raise InvalidArgument(field, f"has {len(values)} entries; the limit is {max_count}")
    if not values:
        return ()
    for value in values:
        text(field, value, max_length)
        if " " in value:
            raise InvalidArgument(field, "entries must not contain spaces (one scope per entry)")
    return tuple(dict.fromkeys(values))


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def metadata(value: dict[str, Any], *, max_bytes: int = MAX_METADATA) -> dict[str, Any]:
    if not _finite(value):
        raise InvalidArgument("metadata", "numbers must be finite (no NaN or Infinity)")
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > max_bytes:
        raise InvalidArgument("metadata", f"is {size} bytes as JSON; the limit is {max_bytes}")
    return value


def selector(sel: Selector) -> Selector:
    by_owner = bool(sel.user_id or sel.provider or sel.account_id is not None)
    if sel.integration_id and by_owner:
        raise InvalidArgument(
            "integration_id",
            "give either integration_id or (user_id, provider, account_id), not both",
        )
    if sel.integration_id:
        text("integration_id", sel.integration_id, MAX_ID)
        return sel
    if not by_owner:
        raise InvalidArgument("integration_id", "give integration_id or (user_id, provider)")
    text("user_id", sel.user_id, MAX_ID)
    text("provider", sel.provider, MAX_PROVIDER)
    if sel.account_id is not None:
        text("account_id", sel.account_id, MAX_ID, required=False)
    return sel


def expiry(
    expires_at: datetime | None,
    expires_in_seconds: int | None,
    now: datetime,
    names: tuple[str, str] = ("expires_at", "expires_in_seconds"),
) -> datetime | None:
    """An expiry given as a time or as seconds from now (``names``: the two fields)."""
    at_name, in_name = names
    if expires_at is not None and expires_in_seconds is not None:
        raise InvalidArgument(at_name, f"give {at_name} or {in_name}, not both")
    if expires_in_seconds is not None:
        if expires_in_seconds < 0:
            raise InvalidArgument(in_name, "must not be negative")
        if expires_in_seconds > MAX_EXPIRY.total_seconds():
            raise InvalidArgument(in_name, "must be at most ten years")
        return now + timedelta(seconds=expires_in_seconds)
    if expires_at is not None and not EARLIEST_EXPIRY <= expires_at < LATEST_EXPIRY:
        # The far ends of the Timestamp range would overflow the refresh arithmetic (expiry
        # minus margin) and mean nothing for an access token.
        raise InvalidArgument(at_name, "must be between the years 1970 and 9000")
    return expires_at


EARLIEST_EXPIRY = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EXPIRY = datetime(9000, 1, 1, tzinfo=UTC)
MAX_EXPIRY = timedelta(days=10 * 365)


_ZERO = timedelta(0)
_DAY = timedelta(days=1)


def duration(field: str, value: timedelta) -> timedelta:
    if value < _ZERO:
        raise InvalidArgument(field, "must not be negative")
    if value > _DAY:
        raise InvalidArgument(field, "must be at most 24 hours")
    return value


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)
