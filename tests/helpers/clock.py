"""A clock the test moves, handed to the broker in place of the wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """The broker's clock, moved by the test (the flow TTL and the purge depend on it)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta
