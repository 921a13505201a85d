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
* **Keep-alive** (``upkeep``): a refresh token unused for half its provider's idle lifetime is
  refreshed by the background pass, whether or not anyone asks for the access token; a refresh
  token with its own expiry is refreshed (renewed) before it lapses on a provider that rotates
  refresh tokens; one that cannot be renewed gets one INTEGRATION_EXPIRING notice, and so
  does one whose renewal fails (it is tried again under the back-off until it succeeds or the
  token lapses).

``RefreshPolicy`` applies these rules to a row as read (or as leased): whether to refresh it,
serve it as it is, or answer with the failure it backs off from. It reads the clock it is given
and nothing else, so every rule here is tested without a database, a server or a provider.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from broker import metrics
from broker.config import RefreshSettings
from broker.domain.tokens import check_servable, remaining
from broker.errors import (
    IntegrationNotFound,
    MinValidityUnattainable,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthorizationRequired,
    Throttled,
)
from broker.model import Clock, Kind, Status, StoredIntegration, TokenRequest
from broker.providers.catalog import ProviderRegistry

# How long a caller without a gRPC deadline may wait for a refresh, provider retries included.
DEFAULT_BUDGET = 20.0


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


class Upkeep(enum.StrEnum):
    """Why the background pass refreshes a refresh token nobody needed an access token from
    (or writes its INTEGRATION_EXPIRING notice)."""

    # Unused for half the provider's idle lifetime: refreshed so it does not lapse.
    KEEP_ALIVE = "keep_alive"
    # Its own expiry is near and the provider rotates refresh tokens: a refresh renews it.
    RENEW = "renew"
    # Its own expiry is near and nothing renews it: one INTEGRATION_EXPIRING event.
    NOTICE = "notice"


def idle_due(used_at: datetime | None, idle_lifetime_seconds: int | None, at: datetime) -> bool:
    """Whether a refresh token last issued or used at ``used_at`` has been idle, at ``at``, for
    half the provider's idle lifetime (None: no idle lapse, never due; a refresh token with no
    recorded use is due)."""
    if not idle_lifetime_seconds:
        return False
    if used_at is None:
        return True
    return at - used_at >= timedelta(seconds=idle_lifetime_seconds / 2)


def renew_window(lapses_at: datetime, used_at: datetime | None, notice: timedelta) -> timedelta:
    """How long before it lapses a renewable refresh token is refreshed: the notice time, or
    half its lifetime (from when it was issued) if that is shorter, so a refresh token that
    lives less than the notice time is not refreshed on every pass."""
    if used_at is not None and used_at < lapses_at:
        half = (lapses_at - used_at) / 2
        if half < notice:
            return half
    return notice


def upkeep(
    stored: StoredIntegration,
    at: datetime,
    *,
    idle_lifetime_seconds: int | None,
    rotates: bool,
    notice: timedelta,
) -> Upkeep | None:
    """What the background pass does, at ``at``, for a row's refresh token when its access
    token is not due: refresh it to keep it alive or to renew it, write its EXPIRING notice, or
    nothing. Only connected authorization-code grants with a refresh token are kept alive."""
    integration = stored.integration
    if (
        integration.status is not Status.CONNECTED
        or integration.credential_type is not Kind.AUTHORIZATION_CODE
        or stored.refresh_token_ct is None
    ):
        return None
    lapses = integration.refresh_token_expires_at
    used = stored.refresh_token_used_at
    unnoticed = lapses is not None and stored.expiring_notice_for != lapses
    # A renewal that failed goes on (under the back-off) after the notice its failure wrote;
    # one that succeeded without extending the expiry is not tried again.
    if (
        (unnoticed or stored.refresh_failures > 0)
        and lapses is not None
        and rotates
        and lapses - at < renew_window(lapses, used, notice)
    ):
        return Upkeep.RENEW
    if idle_due(used, idle_lifetime_seconds, at):
        return Upkeep.KEEP_ALIVE
    if unnoticed and lapses is not None and not rotates and lapses - at < notice:
        return Upkeep.NOTICE
    return None


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


# -- applied to rows ---------------------------------------------------------------------------

# What a row says before a refresh when no refresh is needed: the row to serve, and whether it
# was refreshed since the caller's read.
Answer = tuple[StoredIntegration, bool]


class RefreshPolicy:
    """The rules above for one broker's settings, provider profiles and clock."""

    def __init__(
        self,
        settings: RefreshSettings,
        registry: ProviderRegistry,
        clock: Clock,
        *,
        failure_threshold: int = 3,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock
        # Consecutive transient failures after which a REFRESH_FAILED event is written.
        self.failure_threshold = failure_threshold
        self.backoff = Backoff(
            settings.failure_backoff_seconds, settings.failure_backoff_max_seconds
        )
        self._margins: dict[str, timedelta] = {}

    def margin(self, provider: str) -> timedelta:
        # On the hot path (every due() check): remembered per provider name. The registry and
        # settings are fixed for the life of this policy (a reload builds a new runtime).
        margin = self._margins.get(provider)
        if margin is None:
            seconds = self.settings.margin_seconds
            # A membership test, not a raised UnknownProvider, for built-ins stored without
            # a configured client.
            if provider in self.registry:
                profile_margin = self.registry.get(provider).refresh_margin_seconds
                if profile_margin is not None:
                    seconds = profile_margin
            margin = self._margins[provider] = timedelta(seconds=seconds)
        return margin

    @property
    def notice(self) -> timedelta:
        """How long before a refresh token that cannot be renewed lapses its EXPIRING event
        is written (and when a renewable one is renewed, at the latest)."""
        return timedelta(seconds=self.settings.expiring_notice_seconds)

    def idle_cutoffs(self, at: datetime) -> dict[str, datetime]:
        """Per provider with an idle lifetime: a refresh token last used before this time is
        due for keep-alive at ``at`` (the background pass's claim)."""
        return {
            profile.name: at - timedelta(seconds=profile.refresh_token_idle_lifetime_seconds / 2)
            for profile in self.registry
            if profile.refresh_token_idle_lifetime_seconds
        }

    def upkeep(self, stored: StoredIntegration, at: datetime) -> Upkeep | None:
        """``upkeep`` for a row, with its provider's profile."""
        provider = stored.integration.provider
        profile = self.registry.get(provider) if provider in self.registry else None
        return upkeep(
            stored,
            at,
            idle_lifetime_seconds=None
            if profile is None
            else profile.refresh_token_idle_lifetime_seconds,
            rotates=profile is not None and profile.rotates_refresh_tokens,
            notice=self.notice,
        )

    def widest_margin(self) -> timedelta:
        """The largest margin of any provider: how far ahead a background pass looks."""
        return max(
            [timedelta(seconds=self.settings.margin_seconds)]
            + [self.margin(p.name) for p in self.registry]
        )

    def due(
        self, stored: StoredIntegration, request: TokenRequest, now: datetime | None = None
    ) -> bool:
        """Refresh when ``expires_at - now < max(effective margin, min_valid_for)``; the
        effective margin is at most half the lifetime of the token the provider last issued."""
        integration = stored.integration
        if integration.expires_at is None:
            return False
        return is_due(
            integration.expires_at,
            self.clock() if now is None else now,
            self.margin(integration.provider),
            stored.issued_lifetime_seconds,
            request.min_valid_for,
        )

    def serves_ahead(self, stored: StoredIntegration, request: TokenRequest) -> bool:
        """Whether a due token is served as it is while its refresh runs in the background:
        the caller did not force a refresh, and the token has the caller's ``min_valid_for``
        and the ahead floor left."""
        if request.force_refresh:
            return False
        left = remaining(stored.integration.expires_at, self.clock())
        return (
            left is not None
            and left > timedelta(0)
            and left >= request.min_valid_for
            and left.total_seconds() >= self.settings.ahead_floor_seconds
        )

    def still_satisfies(self, stored: StoredIntegration, request: TokenRequest) -> bool:
        """Whether the stored token does for this caller as it is (when a refresh cannot be
        had)."""
        left = remaining(stored.integration.expires_at, self.clock())
        return left is not None and left >= request.min_valid_for and left > timedelta(0)

    def check_attainable(self, stored: StoredIntegration, request: TokenRequest) -> None:
        """Refuse, before any refresh, a ``min_valid_for`` the lifetime the provider last
        issued cannot meet (asking again would only bring another token of that lifetime)."""
        lifetime = stored.issued_lifetime_seconds
        if lifetime is None or request.force_refresh:
            return
        # Equal cannot be met either: the token starts losing time the moment it is issued.
        if request.min_valid_for >= timedelta(seconds=lifetime):
            raise unattainable(stored, request, lifetime)

    def check_fresh(self, fresh: StoredIntegration, request: TokenRequest, refreshed: bool) -> None:
        """After a refresh: the token must be servable and, if it was just issued, long
        enough for the caller."""
        check_servable(fresh, request.required_scopes)
        left = remaining(fresh.integration.expires_at, self.clock())
        if refreshed and left is not None and left < request.min_valid_for:
            lifetime = fresh.issued_lifetime_seconds
            raise unattainable(
                fresh, request, int(left.total_seconds()) if lifetime is None else lifetime
            )

    def decide(
        self,
        iid: str,
        row: StoredIntegration | None,
        request: TokenRequest,
        seen: int,
        now: datetime,
    ) -> Answer | None:
        """What the row says before a refresh: an answer without one (the row, whether it was
        refreshed since ``seen``), an error, or None: go ahead."""
        if row is None:
            raise IntegrationNotFound.for_id(iid)
        check_servable(row)
        moved = row.integration.version != seen
        if moved and not self.due(row, request):
            return row, True
        if not moved and not request.force_refresh and not self.due(row, request):
            return row, False
        if self.cooling_down(row, request, now):
            return row, moved
        if not row.renewable:
            raise ReauthorizationRequired(
                f"integration {row.integration.id} has no refresh token and its access token is "
                "expiring; the user must authorize again",
                integration_id=row.integration.id,
            )
        return None

    def cooling_down(self, row: StoredIntegration, request: TokenRequest, now: datetime) -> bool:
        """After a failed refresh of any kind the integration backs off: no request is sent
        before its ``next_refresh_at`` (after an unknown outcome that is also what keeps a
        maybe-rotated refresh token from being presented again at once: docs/providers.md, "Refresh
        safety"). True: serve the stored token, it still does for this caller; otherwise the
        caller meets the failure the integration backs off from."""
        failed = cool_down(row.last_refresh_error, row.next_refresh_at, now)
        if failed is None or self._outlived(row, failed):
            return False
        iid = row.integration.id
        provider = row.integration.provider
        metrics.REFRESH_SKIPPED.labels(provider, "cool_down").inc()
        if self.still_satisfies(row, request):
            return True
        wait = max(1.0, failed.seconds_from(now))
        if failed.kind.misconfigured:
            cause = (
                "has no OAuth client configured on this broker"
                if failed.kind is FailureKind.NO_CLIENT
                else "refused the last refresh"
            )
            raise ProviderMisconfigured(
                f"provider {provider!r} {cause} of integration {iid}; the broker tries again "
                f"in {wait:.0f}s, or at once after the integration is stored again",
                integration_id=iid,
                provider=provider,
                retry_after_seconds=f"{wait:.0f}",
            )
        if failed.kind is FailureKind.OUTCOME_UNKNOWN:
            message = (
                f"the last refresh of integration {iid} was sent but got no usable answer; "
                "the broker waits before trying again"
            )
        else:
            message = (
                f"the last refresh of integration {iid} failed (provider {provider!r} "
                "unavailable); the broker waits before trying again"
            )
        raise ProviderUnavailable(message, retry_after=wait, integration_id=iid, provider=provider)

    def _outlived(self, row: StoredIntegration, failed: Failure) -> bool:
        """A refusal of the broker's own configuration that this process's configuration no
        longer bears out: the operator fixed it and restarted. Callers try at once rather than
        wait out the back-off (a refusal seen again flags the provider, and they wait again).
        A minted integration's refusal is of its own credential: storing it again ends that."""
        provider = row.integration.provider
        if failed.kind is FailureKind.NO_CLIENT:
            return provider in self.registry
        if failed.kind is FailureKind.CLIENT_REJECTED:
            minted = row.integration.credential_type.minted
            return not minted and not self.registry.is_misconfigured(provider)
        return False

    def failed(self, row: StoredIntegration, kind: FailureKind, at_least: float = 0.0) -> Failure:
        """One more failure in the row's run, and how long it backs off (the one schedule for
        every kind of failure, so a broken endpoint is not pressed on every pass or call)."""
        failed = failure(kind, row.refresh_failures, self.clock(), self.backoff, at_least=at_least)
        metrics.REFRESH_BACKOFF.labels(row.integration.provider).observe(
            failed.seconds_from(self.clock())
        )
        return failed

    def not_before(self, row: StoredIntegration, exc: Throttled) -> datetime:
        """When the background pass may try a throttled integration again (never earlier
        than a wait it already had)."""
        until = self.clock() + timedelta(seconds=max(1.0, exc.retry_after))
        earlier = row.next_refresh_at
        return until if earlier is None or earlier < until else earlier

    def retry_wait(
        self, attempt: int, retry_after: float, draw: Callable[[], float] = random.random
    ) -> float:
        """The pause before trying a request that was never sent again (``attempt`` tries
        made so far): a short exponential back-off, at least the provider's Retry-After (at
        most 30 s of it)."""
        backoff = min(8.0, 0.2 * 2.0 ** (attempt - 1)) * (0.5 + draw())
        return max(backoff, min(retry_after, 30.0) if attempt > 0 else 0.0)

    def gives_up(self, attempt: int, draining: bool, wait_until: float, end: float) -> bool:
        """Whether a retry would be one too many: out of attempts, shutting down, or unable
        to connect (``wait_until`` is when it would start) before the caller's budget ends.
        A retry needs time to connect, not to be answered (the answer may outlive the
        caller)."""
        connect = self.settings.provider_connect_timeout_seconds
        return attempt >= self.settings.max_attempts or draining or wait_until + connect > end


def unattainable(
    stored: StoredIntegration, request: TokenRequest, lifetime: int
) -> MinValidityUnattainable:
    asked = request.min_valid_for.total_seconds()
    return MinValidityUnattainable(
        f"min_valid_for {asked:g}s cannot be met: provider {stored.integration.provider!r} "
        f"issues tokens valid for {lifetime}s; ask for less than that",
        integration_id=stored.integration.id,
        provider=stored.integration.provider,
        token_lifetime_seconds=str(lifetime),
        min_valid_for_seconds=f"{asked:g}",
    )


def caller_wait(request: TokenRequest) -> float | None:
    """How long a caller waits on a flight: its deadline, less enough to deliver the answer."""
    if request.deadline_seconds is None:
        return None
    left = request.deadline_seconds
    return max(0.0, left - answer_time(left))


def flight_budget(request: TokenRequest, lease: timedelta) -> float:
    """Seconds a flight may spend on the provider, retries included: the caller's deadline (or
    the default) less the time to answer, and always well inside the lease."""
    budget = DEFAULT_BUDGET if request.deadline_seconds is None else request.deadline_seconds
    budget = min(budget, lease.total_seconds() - 10)
    return max(0.0, budget - answer_time(budget))


def answer_time(budget: float) -> float:
    # Time kept back from a caller's deadline to deliver the answer (the audit write included)
    # on a busy host: a fifth, at least half a second, at most half the deadline.
    return min(max(0.5, budget * 0.2), budget / 2)
