"""The refresh engine's pure decisions (broker.domain.refresh_policy): no database, no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.refresh_policy import (
    Backoff,
    FailureKind,
    PassBudget,
    cool_down,
    effective_margin,
    failure,
    is_due,
)

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
