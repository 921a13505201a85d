"""The refresh engine's pure decisions (broker.domain.refresh_policy): no database, no server."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.config import RefreshSettings
from broker.domain.refresh_policy import (
    DEFAULT_BUDGET,
    Backoff,
    FailureKind,
    PassBudget,
    RefreshPolicy,
    Upkeep,
    caller_wait,
    cool_down,
    effective_margin,
    failure,
    flight_budget,
    idle_due,
    is_due,
    renew_window,
    upkeep,
)
from broker.errors import (
    IntegrationNotFound,
    MinValidityUnattainable,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthorizationRequired,
    Throttled,
)
from broker.model import Integration, Selector, Status, StoredIntegration, TokenRequest
from broker.providers.catalog import ProviderRegistry
from broker.providers.profile import ProviderProfile

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MARGIN = timedelta(seconds=300)


def seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        (None, 300),  # not known: the margin as configured
        (0, 300),  # never expires
        (3600, 300),  # long-lived: the margin
        (600, 300),  # exactly twice the margin
        (120, 60),  # shorter than the margin: half its lifetime
        (1, 0.5),
    ],
)
def test_effective_margin_is_at_most_half_the_lifetime(
    lifetime: int | None, expected: float
) -> None:
    assert effective_margin(MARGIN, lifetime) == seconds(expected)


def test_a_short_token_is_not_due_the_moment_it_is_issued() -> None:
    expires = NOW + seconds(120)
    assert not is_due(expires, NOW, MARGIN, 120, timedelta(0))
    assert not is_due(expires, NOW + seconds(59), MARGIN, 120, timedelta(0))
    assert is_due(expires, NOW + seconds(61), MARGIN, 120, timedelta(0))
    # Its lifetime unknown (a token stored by a caller), the configured margin decides.
    assert is_due(expires, NOW, MARGIN, None, timedelta(0))


def test_min_valid_for_may_ask_for_more_than_the_effective_margin() -> None:
    expires = NOW + seconds(100)
    assert not is_due(expires, NOW, MARGIN, 120, seconds(90))
    assert is_due(expires, NOW, MARGIN, 120, seconds(101))
    assert not is_due(None, NOW, MARGIN, 120, seconds(10_000)), "never expires: never due"


def test_backoff_doubles_is_capped_and_jitter_only_lengthens() -> None:
    backoff = Backoff(first=60, cap=3600)
    assert [backoff.seconds(n, 0.0) for n in range(1, 9)] == [
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
    ]
    assert backoff.seconds(1, 0.999) == pytest.approx(75, abs=0.1)
    assert backoff.seconds(6, 0.999) == pytest.approx(2400, abs=1)
    assert backoff.seconds(30, 0.999) == 3600, "never past the cap"
    assert backoff.seconds(10_000, 0.5) == 3600, "no overflow however long the run"
    assert backoff.seconds(0, 0.0) == 60, "a first failure however it is counted"


def test_a_broken_endpoint_gets_a_handful_of_attempts_per_hour() -> None:
    """Whatever the draw, the default schedule allows 3 attempts in 5 minutes and 7 in the
    first hour, then one an hour."""
    backoff = Backoff(first=60, cap=3600)
    for draw in (0.0, 0.5, 0.999):
        at, attempts, failures = 0.0, [], 0
        while at < 7200:
            attempts.append(at)
            failures += 1
            at += backoff.seconds(failures, draw)
        assert len([a for a in attempts if a < 300]) <= 3
        assert len([a for a in attempts if a < 3600]) <= 7
        assert len([a for a in attempts if 3600 <= a < 7200]) <= 2


def test_failure_counts_the_run_and_sets_the_next_attempt() -> None:
    backoff = Backoff(first=10, cap=100)
    first = failure(FailureKind.CLIENT_REJECTED, 0, NOW, backoff, draw=lambda: 0.0)
    assert first.failures == 1
    assert first.retry_at == NOW + seconds(10)
    assert first.values() == {
        "refresh_failures": 1,
        "last_refresh_error": "client_rejected",
        "next_refresh_at": NOW + seconds(10),
    }
    third = failure(FailureKind.UNAVAILABLE, 2, NOW, backoff, draw=lambda: 0.0)
    assert third.retry_at == NOW + seconds(40)
    # An unknown outcome waits at least its own pause, even when the back-off is shorter.
    unknown = failure(FailureKind.OUTCOME_UNKNOWN, 0, NOW, backoff, at_least=30, draw=lambda: 0)
    assert unknown.retry_at == NOW + seconds(30)
    assert unknown.seconds_from(NOW + seconds(20)) == 10
    assert unknown.seconds_from(NOW + seconds(40)) == 0


def test_cool_down_follows_a_failure_only() -> None:
    later = NOW + seconds(60)
    found = cool_down("client_rejected", later, NOW, failures=2)
    assert found is not None
    assert found.kind is FailureKind.CLIENT_REJECTED
    assert found.kind.misconfigured
    assert found.failures == 2
    assert cool_down("client_rejected", later, later) is None, "over at next_refresh_at"
    assert cool_down("client_rejected", None, NOW) is None
    # A provider's pause (Retry-After) sets next_refresh_at without a failure: no cool-down.
    assert cool_down(None, later, NOW) is None
    # A name this version does not know still backs off, as unavailable.
    legacy = cool_down("something_else", later, NOW)
    assert legacy is not None
    assert legacy.kind is FailureKind.UNAVAILABLE
    assert not legacy.kind.misconfigured


def test_pass_budget_per_provider() -> None:
    budget = PassBudget(2)
    assert budget.take("acme")
    assert budget.exhausted == frozenset()
    assert budget.take("acme")
    assert budget.exhausted == {"acme"}
    assert not budget.take("acme")
    assert budget.spent("acme") == 2
    assert budget.take("other"), "one provider's spent budget is not another's"
    assert budget.spent("other") == 1
    # Taken in claim order; one not made (the row was not due) is given back.
    budget.give_back("acme")
    assert budget.exhausted == frozenset()
    assert budget.take("acme")
    assert not budget.take("acme")
    budget.give_back("nobody")
    assert budget.spent("nobody") == 0


# -- the policy applied to rows (RefreshPolicy): no database, no provider ----------------------


def policy(**settings: Any) -> RefreshPolicy:
    registry = ProviderRegistry(
        {
            "acme": ProviderProfile(name="acme", token_url="https://acme.test/token"),
            "quick": ProviderProfile(
                name="quick", token_url="https://quick.test/token", refresh_margin_seconds=30
            ),
        },
        aliases={},
    )
    return RefreshPolicy(RefreshSettings(**settings), registry, lambda: NOW)


def stored(
    expires_in: float | None = 3600,
    *,
    version: int = 1,
    provider: str = "acme",
    status: Status = Status.CONNECTED,
    refresh_token: bool = True,
    last_refresh_error: str | None = None,
    next_refresh_at: datetime | None = None,
    failures: int = 0,
    lifetime: int | None = None,
) -> StoredIntegration:
    integration = Integration(
        id="i1",
        user_id="u1",
        provider=provider,
        account_id="a1",
        status=status,
        token_type="Bearer",
        scopes=("read",),
        metadata={},
        created_at=NOW,
        updated_at=NOW,
        expires_at=None if expires_in is None else NOW + seconds(expires_in),
        last_refreshed_at=None,
        disconnected_at=None,
        disconnect_reason=None,
        has_refresh_token=refresh_token,
        version=version,
    )
    return StoredIntegration(
        integration=integration,
        access_token_ct=b"a",
        refresh_token_ct=b"r" if refresh_token else None,
        key_id="k1",
        refresh_failures=failures,
        last_refresh_error=last_refresh_error,
        next_refresh_at=next_refresh_at,
        issued_lifetime_seconds=lifetime,
    )


def asking(
    min_valid_for: float = 0, *, force: bool = False, deadline: float | None = None
) -> TokenRequest:
    return TokenRequest(
        Selector(integration_id="i1"),
        min_valid_for=seconds(min_valid_for),
        force_refresh=force,
        deadline_seconds=deadline,
    )


def test_margin_is_the_profiles_when_it_names_one_else_the_setting() -> None:
    rules = policy(margin_seconds=300)
    assert rules.margin("acme") == seconds(300)
    assert rules.margin("quick") == seconds(30)
    assert rules.margin("not-configured") == seconds(300)  # stored without a client
    assert rules.widest_margin() == seconds(300)
    assert rules.due(stored(200), asking())
    assert not rules.due(stored(200, provider="quick"), asking())
    assert not rules.due(stored(None), asking(min_valid_for=10**6))  # never expires


def test_decide_serves_a_row_that_is_not_due_and_says_whether_it_moved() -> None:
    rules = policy()
    fresh = stored(3600, version=2)
    assert rules.decide("i1", fresh, asking(), seen=2, now=NOW) == (fresh, False)
    # Another flight refreshed it since the caller's read: served as refreshed.
    assert rules.decide("i1", fresh, asking(), seen=1, now=NOW) == (fresh, True)
    # Forced, and nobody refreshed it meanwhile: go ahead.
    assert rules.decide("i1", fresh, asking(force=True), seen=2, now=NOW) is None


def test_decide_goes_ahead_for_a_due_row_and_refuses_what_cannot_be_refreshed() -> None:
    rules = policy()
    assert rules.decide("i1", stored(10), asking(), seen=1, now=NOW) is None
    with pytest.raises(IntegrationNotFound):
        rules.decide("i1", None, asking(), seen=1, now=NOW)
    with pytest.raises(ReauthorizationRequired):
        rules.decide("i1", stored(10, refresh_token=False), asking(), seen=1, now=NOW)
    with pytest.raises(ReauthorizationRequired):
        rules.decide(
            "i1", stored(10, status=Status.NEEDS_REAUTHORIZATION), asking(), seen=1, now=NOW
        )


def test_a_cool_down_serves_the_stored_token_while_it_still_does() -> None:
    rules = policy()
    cooling = stored(
        100,
        last_refresh_error=FailureKind.UNAVAILABLE.value,
        next_refresh_at=NOW + seconds(60),
        failures=2,
    )
    assert rules.decide("i1", cooling, asking(), seen=1, now=NOW) == (cooling, False)
    # Once it is over, the refresh goes ahead.
    assert rules.decide("i1", cooling, asking(), seen=1, now=NOW + seconds(61)) is None


def test_a_cool_down_answers_with_the_failure_it_backs_off_from() -> None:
    rules = policy()
    unavailable = stored(
        100, last_refresh_error=FailureKind.UNAVAILABLE.value, next_refresh_at=NOW + seconds(60)
    )
    with pytest.raises(ProviderUnavailable) as caught:
        rules.decide("i1", unavailable, asking(min_valid_for=200), seen=1, now=NOW)
    assert caught.value.retry_after == 60
    rejected = stored(
        0, last_refresh_error=FailureKind.CLIENT_REJECTED.value, next_refresh_at=NOW + seconds(90)
    )
    # This process does not see the client refused (fixed and restarted): try at once.
    assert rules.decide("i1", rejected, asking(), seen=1, now=NOW) is None
    rules.registry.mark_misconfigured("acme", "invalid_client")
    with pytest.raises(ProviderMisconfigured) as misconfigured:
        rules.decide("i1", rejected, asking(), seen=1, now=NOW)
    assert misconfigured.value.metadata["retry_after_seconds"] == "90"
    no_client = stored(
        0,
        provider="gone",
        last_refresh_error=FailureKind.NO_CLIENT.value,
        next_refresh_at=NOW + seconds(90),
    )
    with pytest.raises(ProviderMisconfigured, match="no OAuth client configured"):
        rules.decide("i1", no_client, asking(), seen=1, now=NOW)


def test_a_min_valid_for_the_issued_lifetime_cannot_meet_is_refused_before_any_refresh() -> None:
    rules = policy()
    row = stored(10, lifetime=600)
    rules.check_attainable(row, asking(min_valid_for=599))
    with pytest.raises(MinValidityUnattainable):
        rules.check_attainable(row, asking(min_valid_for=600))
    rules.check_attainable(row, asking(min_valid_for=600, force=True))  # asks the provider
    rules.check_attainable(stored(10), asking(min_valid_for=10**6))  # lifetime not known yet
    # Just refreshed and still too short: refused; served from before: no such check.
    with pytest.raises(MinValidityUnattainable):
        rules.check_fresh(stored(100), asking(min_valid_for=200), refreshed=True)
    rules.check_fresh(stored(100), asking(min_valid_for=200), refreshed=False)


def test_a_throttled_row_waits_at_least_the_pause_and_never_less_than_it_had() -> None:
    rules = policy()
    throttled = Throttled("busy", retry_after=30)
    assert rules.not_before(stored(10), throttled) == NOW + seconds(30)
    later = NOW + seconds(120)
    assert rules.not_before(stored(10, next_refresh_at=later), throttled) == later
    assert rules.not_before(stored(10), Throttled("busy", retry_after=0)) == NOW + seconds(1)


def test_a_request_never_sent_is_retried_after_a_growing_pause_within_the_budget() -> None:
    rules = policy(max_attempts=3, provider_connect_timeout_seconds=2)
    assert rules.retry_wait(1, 0, draw=lambda: 0.5) == pytest.approx(0.2)
    assert rules.retry_wait(3, 0, draw=lambda: 0.5) == pytest.approx(0.8)
    assert rules.retry_wait(20, 0, draw=lambda: 0.99) == pytest.approx(8.0 * 1.49)
    assert rules.retry_wait(1, 120, draw=lambda: 0.5) == 30  # Retry-After, at most 30 s of it
    assert not rules.gives_up(1, draining=False, wait_until=10, end=20)
    assert rules.gives_up(3, draining=False, wait_until=10, end=20)  # out of attempts
    assert rules.gives_up(1, draining=True, wait_until=10, end=20)  # shutting down
    assert rules.gives_up(1, draining=False, wait_until=19, end=20)  # cannot connect in time


def test_a_flight_keeps_time_back_to_answer_its_caller() -> None:
    assert caller_wait(asking()) is None
    assert caller_wait(asking(deadline=10)) == pytest.approx(8)
    assert caller_wait(asking(deadline=0.6)) == pytest.approx(0.3)
    lease = seconds(100)
    assert flight_budget(asking(), lease) == pytest.approx(DEFAULT_BUDGET * 0.8)
    assert flight_budget(asking(deadline=1000), lease) == pytest.approx(90 * 0.8)


# -- keep-alive (upkeep): no database, no provider -------------------------------------------

DAY = timedelta(days=1)
NOTICE = timedelta(days=7)


def kept(
    used: timedelta | None,
    lapses: timedelta | None = None,
    *,
    noticed: bool = False,
    refresh_token: bool = True,
    status: Status = Status.CONNECTED,
) -> StoredIntegration:
    """A row whose refresh token was last used ``used`` ago and lapses ``lapses`` from now."""
    row = stored(refresh_token=refresh_token, status=status)
    at = None if lapses is None else NOW + lapses
    return replace(
        row,
        integration=replace(row.integration, refresh_token_expires_at=at),
        refresh_token_used_at=None if used is None else NOW - used,
        expiring_notice_for=at if noticed else None,
    )


def test_idle_due_at_half_the_idle_lifetime() -> None:
    assert not idle_due(NOW - seconds(1799), 3600, NOW)
    assert idle_due(NOW - seconds(1800), 3600, NOW)
    assert not idle_due(NOW - DAY * 1000, None, NOW), "no idle lifetime: never"
    assert idle_due(None, 3600, NOW), "no recorded use: due"


def test_renewal_comes_at_the_notice_time_or_half_the_refresh_tokens_life() -> None:
    assert renew_window(NOW + 10 * DAY, NOW - 100 * DAY, NOTICE) == NOTICE
    assert renew_window(NOW + 10 * DAY, NOW, NOTICE) == 5 * DAY
    assert renew_window(NOW + 10 * DAY, None, NOTICE) == NOTICE


@pytest.mark.parametrize(
    ("row", "rotates", "expected"),
    [
        (kept(seconds(1000)), True, None),
        (kept(seconds(1800)), True, Upkeep.KEEP_ALIVE),
        (kept(seconds(1800)), False, Upkeep.KEEP_ALIVE),
        # Its own expiry: renewed where the provider rotates, otherwise one notice.
        (kept(seconds(1000), seconds(900)), True, Upkeep.RENEW),
        (kept(seconds(1000), seconds(900)), False, Upkeep.NOTICE),
        # ... a rotating one at half its life at the latest, not on every pass before.
        (kept(seconds(10), 6 * DAY), True, None),
        (kept(seconds(10), 6 * DAY), False, Upkeep.NOTICE),
        (kept(seconds(10), 8 * DAY), False, None),
        (kept(seconds(10), 6 * DAY, noticed=True), False, None),
        (kept(seconds(10), 6 * DAY, noticed=True), True, None),
        (kept(seconds(1800), 6 * DAY, noticed=True), False, Upkeep.KEEP_ALIVE),
        # Only connected grants with a refresh token.
        (kept(seconds(1800), refresh_token=False), True, None),
        (kept(seconds(1800), status=Status.NEEDS_REAUTHORIZATION), True, None),
    ],
)
def test_upkeep(row: StoredIntegration, rotates: bool, expected: Upkeep | None) -> None:
    assert upkeep(row, NOW, idle_lifetime_seconds=3600, rotates=rotates, notice=NOTICE) is (
        expected
    )


def test_idle_cutoffs_name_the_providers_with_an_idle_lifetime() -> None:
    registry = ProviderRegistry(
        {
            "acme": ProviderProfile(name="acme", refresh_token_idle_lifetime_seconds=3600),
            "plain": ProviderProfile(name="plain"),
        },
        aliases={},
    )
    rules = RefreshPolicy(RefreshSettings(), registry, lambda: NOW)
    assert rules.idle_cutoffs(NOW) == {"acme": NOW - seconds(1800)}
    assert rules.upkeep(kept(seconds(1800)), NOW) is Upkeep.KEEP_ALIVE
