"""IP reputation: a score from 0 (worst) to 100 (no record) per IP.

Events subtract penalties (`ip_reputation.*_penalty`) and the score recovers
linearly by `recovery_per_hour` points per hour up to 100. Only IPs below 100
are stored. Recovery is computed from the stored score and the time it was
stored, so it continues across restarts without rewriting every score.

Levels: below `high_risk_threshold` an IP is high risk (blocked), below
`medium_risk_threshold` medium risk (rate limits halved), else low risk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "HIGH_RISK",
    "LOW_RISK",
    "MAX_SCORE",
    "MEDIUM_RISK",
    "ReputationBook",
    "Score",
]

MAX_SCORE = 100.0
HIGH_RISK = "high_risk"
MEDIUM_RISK = "medium_risk"
LOW_RISK = "low_risk"


@dataclass(frozen=True)
class Score:
    """A stored score and the time it was stored (Unix seconds)."""

    value: float
    updated_at: float


class ReputationBook:
    """Scores of the IPs that lost points, with lazy recovery."""

    def __init__(
        self,
        *,
        recovery_per_hour: float,
        high_risk_threshold: float,
        medium_risk_threshold: float,
        max_entries: int = 100_000,
    ) -> None:
        self.recovery_per_second = recovery_per_hour / 3600.0
        self.high_risk_threshold = high_risk_threshold
        self.medium_risk_threshold = medium_risk_threshold
        self.max_entries = max_entries
        self._scores: dict[str, Score] = {}

    def __len__(self) -> int:
        return len(self._scores)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._scores))

    def stored(self, ip: str) -> Score | None:
        """Return the stored score of `ip` (before recovery), or None."""
        return self._scores.get(ip)

    def score(self, ip: str, now: float) -> float:
        """Return the current score of `ip`, with recovery up to `now`."""
        stored = self._scores.get(ip)
        if stored is None:
            return MAX_SCORE
        elapsed = max(0.0, now - stored.updated_at)
        return min(MAX_SCORE, stored.value + elapsed * self.recovery_per_second)

    def level(self, score: float) -> str:
        """Return the risk level of a score."""
        if score < self.high_risk_threshold:
            return HIGH_RISK
        if score < self.medium_risk_threshold:
            return MEDIUM_RISK
        return LOW_RISK

    def penalize(self, ip: str, points: float, now: float) -> Score:
        """Subtract `points` from the current score (at least 0) and store it."""
        value = max(0.0, self.score(ip, now) - points)
        stored = Score(value, now)
        self._scores[ip] = stored
        return stored

    def load(self, ip: str, value: float, updated_at: float) -> None:
        """Set a score read from storage."""
        if value < MAX_SCORE:
            self._scores[ip] = Score(max(0.0, value), updated_at)

    def reset(self, ip: str) -> bool:
        """Forget the score of `ip` (back to 100). Returns whether it had one."""
        return self._scores.pop(ip, None) is not None

    def seconds_until(self, ip: str, target: float, now: float) -> float | None:
        """Return seconds until the score of `ip` reaches `target`.

        Returns 0 when it already has, and None when it never will because
        recovery is off.
        """
        missing = target - self.score(ip, now)
        if missing <= 0:
            return 0.0
        if self.recovery_per_second <= 0:
            return None
        return missing / self.recovery_per_second

    def forget_recovered(self, now: float) -> list[str]:
        """Drop and return the IPs back at 100, then the best over `max_entries`."""
        removed = [ip for ip in self._scores if self.score(ip, now) >= MAX_SCORE]
        excess = len(self._scores) - len(removed) - self.max_entries
        if excess > 0:
            recovered = set(removed)
            kept = sorted(
                (ip for ip in self._scores if ip not in recovered),
                key=lambda ip: self.score(ip, now),
                reverse=True,
            )
            removed.extend(kept[:excess])
        for ip in removed:
            del self._scores[ip]
        return removed

    def buckets(self, now: float) -> dict[str, int]:
        """Return how many stored IPs are at each risk level."""
        counts = {HIGH_RISK: 0, MEDIUM_RISK: 0, LOW_RISK: 0}
        for ip in self._scores:
            counts[self.level(self.score(ip, now))] += 1
        return counts
