"""Per-key rate limits with the generic cell rate algorithm (GCRA).

A limit of N per period lets a fresh key make N requests at once, then one
every period/N seconds. Each key stores one number, its theoretical arrival
time (TAT): the time at which the key would be back to a full allowance.

The clock is monotonic (`time.monotonic` unless a test injects one), so setting
the wall clock forwards or backwards neither resets nor extends a limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

__all__ = ["RateDecision", "RateLimiter", "WindowCounter"]

K = TypeVar("K", bound="Hashable")

# Checks between two sweeps that forget keys back at their full allowance.
_SWEEP_EVERY = 4096


@dataclass(frozen=True)
class RateDecision:
    """Outcome of one check: `allowed`, else seconds until the next allowed request."""

    allowed: bool
    retry_after: float = 0.0

    @property
    def retry_after_seconds(self) -> int:
        """`retry_after` rounded up to whole seconds, for a `Retry-After` header."""
        return max(1, math.ceil(self.retry_after))


class RateLimiter(Generic[K]):
    """Limits of `limit` events per `period` seconds, one per key.

    At most `max_keys` keys are remembered. Past that the least recently
    limited keys are forgotten first, which gives them a full allowance again.
    """

    def __init__(
        self,
        *,
        period: float = 60.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        self._tat: dict[K, float] = {}
        self._checks = 0

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, key: K, limit: float) -> RateDecision:
        """Count one event of `key` if its limit allows it, and return the outcome."""
        now = self.clock()
        self._checks += 1
        if self._checks % _SWEEP_EVERY == 0 or len(self._tat) >= self.max_keys:
            self.sweep(now)

        interval = self.period / max(limit, 1e-9)
        tat = max(self._tat.pop(key, now), now)
        new_tat = tat + interval
        if new_tat - now > self.period + 1e-9:
            self._tat[key] = tat
            return RateDecision(False, new_tat - now - self.period)
        self._tat[key] = new_tat
        return RateDecision(True)

    def charge(self, key: K, count: float, limit: float) -> None:
        """Count `count` events of `key` that were allowed elsewhere, without a check.

        The acceptors use it for the events the other acceptors allowed. The
        TAT may move more than one period ahead, so a key that got more than
        its limit through several processes at once is rejected until the
        excess is paid back, and its long-run rate stays at `limit`.
        """
        now = self.clock()
        self._checks += 1
        if self._checks % _SWEEP_EVERY == 0 or len(self._tat) >= self.max_keys:
            self.sweep(now)

        tat = max(self._tat.pop(key, now), now)
        self._tat[key] = tat + count * self.period / max(limit, 1e-9)

    def sweep(self, now: float | None = None) -> None:
        """Forget keys back at their full allowance, then the oldest over `max_keys`."""
        if now is None:
            now = self.clock()
        for key in [key for key, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        excess = len(self._tat) - self.max_keys + 1
        if excess > 0:
            for key in list(self._tat)[:excess]:
                del self._tat[key]


class WindowCounter(Generic[K]):
    """Counts of events per key within the last `window` seconds.

    Only the newest `max_events` times of a key are kept, so a count saturates
    at `max_events`, which callers set to their threshold. At most `max_keys`
    keys are remembered. Past that the least recently counted are forgotten.
    """

    def __init__(
        self,
        window: float,
        *,
        max_events: int,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_events = max_events
        self.max_keys = max_keys
        self.clock = clock
        self._events: dict[K, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._events)

    def add(self, key: K) -> int:
        """Record one event of `key` and return its count within the window."""
        now = self.clock()
        times = self._events.pop(key, None)
        if times is None:
            if len(self._events) >= self.max_keys:
                self.sweep(now)
            times = deque(maxlen=self.max_events)
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        self._events[key] = times
        return len(times)

    def clear(self, key: K) -> None:
        """Forget the events of `key`."""
        self._events.pop(key, None)

    def sweep(self, now: float | None = None) -> None:
        """Forget keys without events in the window, then the oldest over `max_keys`."""
        if now is None:
            now = self.clock()
        stale = [
            key for key, times in self._events.items() if times[-1] <= now - self.window
        ]
        for key in stale:
            del self._events[key]
        while len(self._events) >= self.max_keys:
            del self._events[next(iter(self._events))]
