"""Times an operator types: ``--since 1h``, ``30m``, ``2d``, ``yesterday``, ``today``, or ISO
8601 (``2026-11-26``, ``2026-11-26T09:00:00+00:00``; without an offset it is UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from broker.cli.exits import UsageError

_AGO = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since(flag: str, text: str, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    word = text.strip().lower()
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if word == "today":
        return midnight
    if word == "yesterday":
        return midnight - timedelta(days=1)
    ago = _AGO.fullmatch(word)
    if ago:
        return now - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{flag}: {text!r} is not a time; use e.g. 1h, 30m, 2d, yesterday, today, "
            "2026-11-26 or 2026-11-26T09:00:00+00:00"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
