"""The acceptor's copy of the security monitor's decisions.

The monitor pushes one decision per IP whenever it changes (see
`policy.SecurityPolicy`), and a full snapshot when an acceptor subscribes.
Lookups are local, so no request waits for the monitor. A block's remaining
time (`ttl`) becomes a deadline on this process's monotonic clock, so the
block ends on time even if the monitor is unreachable by then.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = ["Decision", "DecisionCache"]


@dataclass(frozen=True)
class Decision:
    """Whether an IP is blocked (until a monotonic deadline) and its rate factor."""

    blocked: bool
    until: float  # monotonic seconds, math.inf for a block without expiry
    reason: str | None
    rate_factor: float


class DecisionCache:
    """Decisions by canonical IP. An IP without one is allowed at full rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._decisions: dict[str, Decision] = {}

    def __len__(self) -> int:
        return len(self._decisions)

    def apply(self, message: Mapping[str, Any]) -> str | None:
        """Store one pushed decision and return its IP if it blocks that IP now.

        A malformed message is ignored.
        """
        ip = message.get("ip")
        if not isinstance(ip, str):
            return None
        blocked = message.get("blocked") is True
        ttl = message.get("ttl")
        factor = message.get("rate_factor", 1.0)
        if not isinstance(factor, int | float) or isinstance(factor, bool):
            factor = 1.0
        factor = min(1.0, max(0.01, float(factor)))
        if not blocked and factor >= 1.0:
            self._decisions.pop(ip, None)
            return None

        until = math.inf
        if blocked and isinstance(ttl, int | float) and not isinstance(ttl, bool):
            until = self.clock() + max(0.0, float(ttl))
        reason = message.get("reason")
        self._decisions[ip] = Decision(
            blocked=blocked,
            until=until if blocked else 0.0,
            reason=reason if isinstance(reason, str) else None,
            rate_factor=factor,
        )
        return ip if blocked else None

    def replace(self, messages: Iterable[Mapping[str, Any]]) -> list[str]:
        """Replace every decision with a snapshot and return the IPs it blocks."""
        self._decisions.clear()
        blocked = [self.apply(message) for message in messages]
        return [ip for ip in blocked if ip is not None]

    def blocked(self, ip: str) -> Decision | None:
        """Return the decision blocking `ip` now, or None."""
        decision = self._decisions.get(ip)
        if decision is None or not decision.blocked:
            return None
        if decision.until <= self.clock():
            return None
        return decision

    def rate_factor(self, ip: str) -> float:
        """Return the factor applied to the rate limits of `ip` (1.0 or less)."""
        decision = self._decisions.get(ip)
        return 1.0 if decision is None else decision.rate_factor
