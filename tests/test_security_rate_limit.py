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


def test_charge_spends_allowance() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    limiter.charge("a", 4, 6)
    assert limiter.check("a", 6).allowed
    assert limiter.check("a", 6).allowed
    assert not limiter.check("a", 6).allowed


def test_charge_beyond_period_is_paid_back() -> None:
    """A key charged two periods' worth waits until the excess is paid back."""
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    limiter.charge("a", 12, 6)
    decision = limiter.check("a", 6)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(70.0)
    clock.now += 69
    assert not limiter.check("a", 6).allowed
    clock.now += 1
    assert limiter.check("a", 6).allowed


def test_charge_after_idle_starts_from_now() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock)
    limiter.check("a", 6)
    clock.now += 600
    limiter.charge("a", 6, 6)
    assert not limiter.check("a", 6).allowed
    clock.now += 10
    assert limiter.check("a", 6).allowed


def test_charge_weighted_matches_halved_check() -> None:
    """Charging 2 per event at the full limit equals checking at half the limit."""
    clock = FakeClock()
    checked = RateLimiter[str](period=60, clock=clock)
    charged = RateLimiter[str](period=60, clock=clock)
    for _ in range(4):
        assert checked.check("a", 10 * 0.5).allowed
        charged.charge("a", 1 / 0.5, 10)
    assert checked.check("a", 10 * 0.5).allowed
    assert charged.check("a", 10 * 0.5).allowed
    assert not checked.check("a", 10 * 0.5).allowed
    assert not charged.check("a", 10 * 0.5).allowed


def test_charge_bounds_memory() -> None:
    clock = FakeClock()
    limiter = RateLimiter[str](period=60, clock=clock, max_keys=100)
    for index in range(1000):
        limiter.charge(f"k{index}", 1, 1)
    assert len(limiter) <= 100


def simulate_synced_limiters(
    acceptors: int,
    limit: int,
    sync_interval: float,
    seconds: float,
    burst: int,
    *,
    step: float = 0.01,
) -> int:
    """Return how many events synced limiters allow to one flooding key.

    Every `step` seconds the key sends up to `burst` events to each acceptor.
    Each limiter charges the others' allowed events once per sync interval, as
    the acceptors do through the security monitor.
    """
    clock = FakeClock()
    limiters = [RateLimiter[str](period=60, clock=clock) for _ in range(acceptors)]
    pending = [0] * acceptors
    allowed = 0
    start = clock.now
    next_sync = start + sync_interval
    while clock.now < start + seconds:
        for index, limiter in enumerate(limiters):
            # A rejection changes nothing, so the rest of the burst would fail too.
            for _ in range(burst):
                if not limiter.check("k", limit).allowed:
                    break
                pending[index] += 1
                allowed += 1
        clock.now += step
        if clock.now >= next_sync:
            next_sync += sync_interval
            for index, limiter in enumerate(limiters):
                others = sum(pending) - pending[index]
                if others:
                    limiter.charge("k", others, limit)
            pending = [0] * acceptors
    return allowed


@pytest.mark.parametrize("acceptors", [2, 4])
@pytest.mark.parametrize("burst", [1, 100])
@pytest.mark.parametrize("seconds", [30, 120, 600])
def test_synced_limiters_bound_excess(acceptors: int, burst: int, seconds: int) -> None:
    """Synced limiters allow one process's count plus the others' unreported events.

    Without the charges they would allow `acceptors` times the limit.
    """
    limit, sync_interval = 60, 0.1
    allowed = simulate_synced_limiters(acceptors, limit, sync_interval, seconds, burst)
    single = limit * (1 + seconds / 60)
    unreported = (acceptors - 1) * limit * (1 + sync_interval / 60)
    assert allowed <= single + unreported
    assert allowed >= limit * seconds / 60


def test_synced_limiters_keep_long_run_rate() -> None:
    """After a burst on 4 acceptors, 10 minutes allow what one process would."""
    allowed = simulate_synced_limiters(4, 60, 0.1, 600, burst=100)
    assert allowed <= 60 * (1 + 600 / 60)
