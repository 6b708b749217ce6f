"""Threshold detection per IP: N events of one kind within a sliding window.

The kinds are failed logins, 404 responses and malicious payloads, each with
its own threshold and window (`anomaly_detection.*`). Crossing a threshold
resets that IP's count for that kind, so the next detection needs a full new
set of events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .rate_limit import WindowCounter

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "LOGIN_FAILED",
    "MALICIOUS_PAYLOAD",
    "NOT_FOUND",
    "AnomalyDetector",
    "Threshold",
]

LOGIN_FAILED = "login_failed"
NOT_FOUND = "not_found"
MALICIOUS_PAYLOAD = "malicious_payload"


@dataclass(frozen=True)
class Threshold:
    """`count` events within `window` seconds."""

    count: int
    window: float


class AnomalyDetector:
    """Sliding-window counters per event kind and IP.

    NOTE: the counts live in the security monitor's memory only, so a restart
    of the monitor forgets events that had not reached a threshold yet.
    """

    def __init__(
        self,
        thresholds: Mapping[str, Threshold],
        clock: Callable[[], float],
        *,
        max_keys: int = 100_000,
    ) -> None:
        self.thresholds = dict(thresholds)
        self._counters = {
            kind: WindowCounter[str](
                threshold.window,
                max_events=threshold.count,
                max_keys=max_keys,
                clock=clock,
            )
            for kind, threshold in self.thresholds.items()
        }

    def record(self, kind: str, ip: str) -> int | None:
        """Count one event and return the count if it reached the threshold, else None.

        Kinds without a threshold are ignored.
        """
        counter = self._counters.get(kind)
        if counter is None:
            return None
        count = counter.add(ip)
        if count < self.thresholds[kind].count:
            return None
        counter.clear(ip)
        return count

    def forget(self, ip: str) -> None:
        """Reset every count of `ip`."""
        for counter in self._counters.values():
            counter.clear(ip)

    def sweep(self) -> None:
        """Forget IPs without events in their windows."""
        for counter in self._counters.values():
            counter.sweep()
