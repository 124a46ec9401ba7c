"""Token bucket and log gate (drivers.ratelimit), driven by a hand-stepped monotonic clock."""

from __future__ import annotations

import pytest

from drivers.ratelimit import LogGate, TokenBucket


class Steps:
    """A monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refuses() -> None:
    """A full bucket gives `burst` tokens at once, then refuses without taking any."""
    clock = Steps()
    bucket = TokenBucket(rate=2.0, burst=3, now=clock)
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    assert bucket.tokens == pytest.approx(0.0)


def test_bucket_refills_at_rate_up_to_burst() -> None:
    """Tokens come back at `rate` per second and never above `burst`."""
    clock = Steps()
    bucket = TokenBucket(rate=2.0, burst=3, now=clock)
    for _ in range(3):
        bucket.take()
    clock.now += 0.5
    assert bucket.take() and not bucket.take()
    clock.now += 100
    assert bucket.tokens == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("tokens_taken", "wait_s", "max_age"),
    [(3, 0.5, 1), (2, 0.0, 1), (0, 0.0, 1)],
)
def test_bucket_retry_after(tokens_taken: int, wait_s: float, max_age: int) -> None:
    """retry_after says when the next token is there; retry_after_s is at least 1 s."""
    clock = Steps()
    bucket = TokenBucket(rate=2.0, burst=3, now=clock)
    for _ in range(tokens_taken):
        bucket.take()
    assert bucket.retry_after() == pytest.approx(wait_s)
    assert bucket.retry_after_s() == max_age


def test_bucket_slow_rate_max_age() -> None:
    """At 0.1 token/s an empty bucket asks for 10 s."""
    clock = Steps()
    bucket = TokenBucket(rate=0.1, burst=1, now=clock)
    assert bucket.take()
    assert bucket.retry_after_s() == 10


def test_bucket_rejects_nonsense() -> None:
    """A zero rate or a burst below one token is a programming error."""
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0, burst=1, now=Steps())
    with pytest.raises(ValueError, match="burst >= 1"):
        TokenBucket(rate=1, burst=0, now=Steps())


def test_log_gate_once_per_interval_with_held_back_count() -> None:
    """The gate opens once per interval and reports how many it held back meanwhile."""
    clock = Steps()
    gate = LogGate(10.0, clock)
    assert gate.open() == 0
    assert [gate.open() for _ in range(4)] == [None] * 4
    clock.now += 9.9
    assert gate.open() is None
    clock.now += 0.1
    assert gate.open() == 5
    assert gate.open() is None
