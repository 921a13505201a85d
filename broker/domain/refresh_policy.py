"""What the refresh engine decides without a database or a provider: when a token is due, how
long an integration stays away from its provider after a failure, what a caller meets while it
does, and how many attempts one background pass may spend on one provider.

These rules are what keep one integration (or one caller allowed to store integrations) from
pressing a provider, or the broker, without limit:

* **The effective margin** never exceeds half the lifetime the provider issued. A provider that
  issues 120 s tokens under a 300 s margin would otherwise make every token due the moment it
  is issued: refreshed on every call and every background pass. With half the lifetime it is
  refreshed about once per half-lifetime. A caller's ``min_valid_for`` may still ask for more
  (and one beyond the lifetime is MIN_VALIDITY_UNATTAINABLE).
* **Every failed attempt backs off**, whatever the provider answered: a 400, a rejected client,
  a 5xx, a 429, a timeout, an unreadable 200. One schedule for all: exponential in the failures
  in a row, capped, lengthened (never shortened) at random so integrations that failed
  together do not come back together. A broken endpoint sees a handful of requests per
  integration per hour, not one per pass or per call.
* **A background pass spends a bounded budget per provider**, so one provider's backlog (or a
  heap of failing rows) cannot take a pass from the others.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any


def effective_margin(margin: timedelta, lifetime_seconds: int | None) -> timedelta:
    """The refresh margin for a token the provider issued for ``lifetime_seconds`` (None or 0:
    not known, the configured margin as is)."""
    if not lifetime_seconds or lifetime_seconds <= 0:
        return margin
    half = timedelta(seconds=lifetime_seconds / 2)
    return half if half < margin else margin


def is_due(
    expires_at: datetime | None,
    now: datetime,
    margin: timedelta,
    lifetime_seconds: int | None,
    min_valid_for: timedelta,
) -> bool:
    """Refresh when ``expires_at - now < max(effective margin, min_valid_for)``; a token that
    never expires is never due."""
    if expires_at is None:
        return False
    needed = effective_margin(margin, lifetime_seconds)
    if min_valid_for > needed:
        needed = min_valid_for
    return expires_at - now < needed


@dataclass(frozen=True, slots=True)
class Backoff:
    """The one back-off schedule: ``first`` after one failure, doubling with each failure in a
    row, at most ``cap``; jitter adds up to a quarter, never below the schedule (so a bound on
    requests per window holds whatever the random draw)."""

    first: float
    cap: float
    jitter: float = 0.25

    def seconds(self, failures: int, draw: float) -> float:
        """The wait after ``failures`` failures in a row (1 = the first), for a ``draw`` in
        [0, 1)."""
        steps = min(max(failures, 1) - 1, 40)  # 2**40 times any first wait is past any cap
        scheduled = min(self.cap, self.first * 2.0**steps)
        return min(self.cap, scheduled * (1.0 + self.jitter * draw))


class FailureKind(enum.StrEnum):
    """A failed attempt, as recorded in ``last_refresh_error``."""

    UNAVAILABLE = "provider_unavailable"  # 5xx, 429, timeout, connection error, bad 200
    OUTCOME_UNKNOWN = "outcome_unknown"  # sent, no usable answer: may have rotated
    CLIENT_REJECTED = "client_rejected"  # invalid_client, unauthorized_client, other 4xx
    NO_CLIENT = "no_client"  # no OAuth client configured for the provider

    @property
    def misconfigured(self) -> bool:
        """Whether a caller meets PROVIDER_MISCONFIGURED (rather than UNAVAILABLE) for it."""
        return self in (FailureKind.CLIENT_REJECTED, FailureKind.NO_CLIENT)

    @classmethod
    def of(cls, recorded: str | None) -> FailureKind | None:
        """The kind a row's ``last_refresh_error`` names; anything else recorded there (a
        version that knew other names) counts as unavailable."""
        if recorded is None:
            return None
        try:
            return cls(recorded)
        except ValueError:
            return cls.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt and the wait it sets: the row's bookkeeping after it."""

    kind: FailureKind
    failures: int  # in a row, this one included
    retry_at: datetime

    def seconds_from(self, now: datetime) -> float:
        return max(0.0, (self.retry_at - now).total_seconds())

    def values(self) -> dict[str, Any]:
        """The columns to write with the lease's release."""
        return {
            "refresh_failures": self.failures,
            "last_refresh_error": self.kind.value,
            "next_refresh_at": self.retry_at,
        }


def failure(
    kind: FailureKind,
    previous_failures: int,
    now: datetime,
    backoff: Backoff,
    *,
    at_least: float = 0.0,
    draw: Callable[[], float] = random.random,
) -> Failure:
    """Record one more failure: the next attempt waits the back-off (and at least
    ``at_least`` seconds, e.g. the pause after an unknown outcome or a provider's
    Retry-After)."""
    failures = max(previous_failures, 0) + 1
    wait = max(backoff.seconds(failures, draw()), at_least)
    return Failure(kind, failures, now + timedelta(seconds=wait))


def cool_down(
    last_refresh_error: str | None,
    next_refresh_at: datetime | None,
    now: datetime,
    failures: int = 0,
) -> Failure | None:
    """The failure an integration is still backing off from at ``now``, or None. A wait that
    follows no failure (a provider's pause for everyone) is the throttle's, not a cool-down."""
    kind = FailureKind.of(last_refresh_error)
    if kind is None or next_refresh_at is None or next_refresh_at <= now:
        return None
    return Failure(kind, failures, next_refresh_at)


class PassBudget:
    """Attempts one background pass may still make, per provider."""

    def __init__(self, per_provider: int) -> None:
        self.per_provider = per_provider
        self._spent: dict[str, int] = {}
        self._exhausted: set[str] = set()

    def take(self, provider: str) -> bool:
        """Spend one attempt on ``provider``; False when its budget is already spent."""
        spent = self._spent.get(provider, 0)
        if spent >= self.per_provider:
            return False
        spent += 1
        self._spent[provider] = spent
        if spent >= self.per_provider:
            self._exhausted.add(provider)
        return True

    def give_back(self, provider: str) -> None:
        """An attempt taken but not made (the row turned out not to be due)."""
        spent = self._spent.get(provider, 0)
        if spent > 0:
            self._spent[provider] = spent - 1
            self._exhausted.discard(provider)

    @property
    def exhausted(self) -> frozenset[str]:
        """Providers with nothing left this pass: no point claiming their rows."""
        return frozenset(self._exhausted)

    def spent(self, provider: str) -> int:
        return self._spent.get(provider, 0)
