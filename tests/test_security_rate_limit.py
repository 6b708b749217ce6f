"""Rate limiter and window counter on an injected monotonic clock (sans-I/O)."""

from __future__ import annotations

import pytest

from deeperhub.security.rate_limit import RateLimiter, WindowCounter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limit_allows_burst_then_rejects() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    results = [limiter.check("a", 60).allowed for _ in range(61)]
    assert results[:60] == [True] * 60
    assert results[60] is False


def test_retry_after_is_one_interval() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    for _ in range(6):
        limiter.check("a", 6)
    decision = limiter.check("a", 6)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(10.0)
    assert decision.retry_after_seconds == 10


def test_limit_refills_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    for _ in range(6):
        assert limiter.check("a", 6).allowed
    assert not limiter.check("a", 6).allowed
    clock.now += 10
    assert limiter.check("a", 6).allowed
    assert not limiter.check("a", 6).allowed


def test_keys_are_independent() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    for _ in range(3):
        limiter.check("a", 3)
    assert not limiter.check("a", 3).allowed
    assert limiter.check("b", 3).allowed


def test_halved_limit_rejects_earlier() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    allowed = sum(limiter.check("a", 10 * 0.5).allowed for _ in range(10))
    assert allowed == 5


def test_wall_clock_jump_has_no_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default clock is monotonic, so a wall-clock jump changes nothing."""
    import time

    limiter = RateLimiter[str](period=60)
    for _ in range(3):
        limiter.check("a", 3)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400)
    assert not limiter.check("a", 3).allowed
    monkeypatch.setattr(time, "time", lambda: real_time() - 86400)
    assert not limiter.check("a", 3).allowed


def test_sweep_forgets_idle_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock, max_keys=10)
    for index in range(5):
        limiter.check(f"k{index}", 60)
    clock.now += 2
    limiter.sweep()
    assert len(limiter) == 0


def test_max_keys_bounds_memory() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock, max_keys=100)
    for index in range(1000):
        limiter.check(f"k{index}", 1)
    assert len(limiter) <= 100


def test_window_counter_counts_within_window() -> None:
    clock = FakeClock()
    counter = WindowCounter[str](10, max_events=100, clock=clock)
    assert counter.add("a") == 1
    clock.now += 5
    assert counter.add("a") == 2
    clock.now += 6
    assert counter.add("a") == 2
    counter.clear("a")
    assert counter.add("a") == 1


def test_window_counter_saturates() -> None:
    clock = FakeClock()
    counter = WindowCounter[str](10, max_events=3, clock=clock)
    counts = [counter.add("a") for _ in range(10)]
    assert counts[-1] == 3
