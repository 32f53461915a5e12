"""Reconnect delays: capped exponential backoff with jitter (sisyphus.brokers.backoff)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sisyphus.brokers.backoff import delay


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "rand", "expected"),
    [
        (0, 1.0, 30.0, 0.0, 0.5),
        (0, 1.0, 30.0, 0.5, 0.75),
        (1, 1.0, 30.0, 0.0, 1.0),
        (2, 1.0, 30.0, 0.0, 2.0),
        (3, 1.0, 30.0, 0.0, 4.0),
        (3, 1.0, 30.0, 0.5, 6.0),
        (4, 1.0, 30.0, 0.0, 8.0),
        (5, 1.0, 30.0, 0.0, 15.0),  # 32 s capped at 30
        (5, 1.0, 30.0, 0.5, 22.5),
        (100, 1.0, 30.0, 0.0, 15.0),
        (0, 0.1, 10.0, 0.0, 0.05),
        (2, 0.25, 10.0, 0.0, 0.5),
        (0, 5.0, 2.0, 0.0, 1.0),  # a base above the cap is capped from the start
    ],
)
def test_delay_table(attempt: int, base: float, cap: float, rand: float, expected: float) -> None:
    """The wait doubles per attempt up to the cap; half of it is fixed, half random."""
    assert delay(attempt, base, cap, lambda: rand) == pytest.approx(expected)


def test_first_attempt_never_retries_at_once() -> None:
    """Even with the smallest random draw, the first reconnect waits half the base."""
    assert delay(0, 0.5, 30.0, lambda: 0.0) == 0.25


def test_huge_attempt_numbers_do_not_overflow() -> None:
    """After days of outage the attempt count is huge; the delay is still the cap's range."""
    assert delay(10**9, 1.0, 30.0, lambda: 0.0) == 15.0
    assert delay(10**9, 1.0, 30.0, lambda: 0.999) == pytest.approx(29.985)


def test_randomness_is_drawn_once_per_call() -> None:
    """Each delay consumes exactly one random draw, so an injected sequence is predictable."""
    draws = iter([0.0, 0.5, 0.25])
    delays = [delay(i, 1.0, 30.0, lambda: next(draws)) for i in range(3)]
    assert delays == [0.5, 1.5, 2.5]


_ATTEMPTS = st.integers(min_value=0, max_value=10_000)
_BASES = st.floats(min_value=0.001, max_value=60.0)
_CAPS = st.floats(min_value=0.001, max_value=3600.0)
_RANDS = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(attempt=_ATTEMPTS, base=_BASES, cap=_CAPS, rand=_RANDS)
def test_delay_stays_within_half_and_all_of_the_ceiling(
    attempt: int, base: float, cap: float, rand: float
) -> None:
    """Every wait is between half and all of min(cap, base * 2**attempt), never above the cap."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    wait = delay(attempt, base, cap, lambda: rand)
    assert ceiling / 2 <= wait <= ceiling
    assert 0 < wait <= cap


@given(attempt=_ATTEMPTS, base=_BASES, cap=_CAPS, rand=_RANDS)
def test_delay_never_shrinks_with_more_attempts(
    attempt: int, base: float, cap: float, rand: float
) -> None:
    """For the same random draw, a later attempt never waits less than an earlier one."""
    assert delay(attempt + 1, base, cap, lambda: rand) >= delay(attempt, base, cap, lambda: rand)


@given(attempt=_ATTEMPTS, base=_BASES, cap=_CAPS, low=_RANDS, high=_RANDS)
def test_delay_grows_with_the_random_draw(
    attempt: int, base: float, cap: float, low: float, high: float
) -> None:
    """A larger random draw never gives a shorter wait, so jitter only spreads reconnects."""
    low, high = sorted((low, high))
    assert delay(attempt, base, cap, lambda: low) <= delay(attempt, base, cap, lambda: high)
