"""Rate limit usage shared between acceptor processes (sans-I/O).

Each acceptor checks the rate limits with its own `RateLimiter`s, so no request
waits for another process. `UsageLedger` adds up the events this acceptor
allowed since its last sync, per key. Every `security.rate_sync_interval`
seconds the security gate sends them to the security monitor as one `usage`
message, the monitor relays the message to every other acceptor, and each of
them charges its limiters with it (`RateLimiter.charge`). So every acceptor
counts the traffic of all acceptors, about one sync interval late.

Counts are weighted by the limit in force: an event allowed under a halved
limit (rate factor 0.5) counts 2, so the receiver charges it against the full
limit and moves the key's TAT as far as the sender did.

A message is `{"event": "usage", "api": {IP: count}, "ws": {USER_ID: count}}`,
with only the keys that had traffic. JSON object keys are strings, so user ids
travel as decimal strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["USAGE_EVENT", "Usage", "UsageLedger", "parse_usage"]

USAGE_EVENT = "usage"


@dataclass
class Usage:
    """Weighted event counts: HTTP requests per IP, WebSocket messages per user."""

    api: dict[str, float] = field(default_factory=dict)
    ws: dict[int, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.api or self.ws)

    def message(self) -> dict[str, Any]:
        """Return the `usage` message for the security monitor."""
        return {
            "event": USAGE_EVENT,
            "api": dict(self.api),
            "ws": {str(user_id): count for user_id, count in self.ws.items()},
        }


class UsageLedger:
    """Events this acceptor allowed since the last `take`, per key.

    At most `max_keys` keys per table are kept. Events of further keys are
    not recorded, so a flood of new keys within one sync interval cannot grow
    memory or message size. The other acceptors never count those events.
    """

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._usage = Usage()

    def add_api(self, ip: str, factor: float = 1.0) -> None:
        """Record one HTTP request of `ip`, allowed under `factor` × the limit."""
        _add(self._usage.api, ip, 1.0 / factor, self.max_keys)

    def add_ws(self, user_id: int, factor: float = 1.0) -> None:
        """Record one WebSocket message of `user_id`, allowed under `factor` × limit."""
        _add(self._usage.ws, user_id, 1.0 / factor, self.max_keys)

    def take(self) -> Usage:
        """Return the recorded usage and start counting from zero."""
        usage, self._usage = self._usage, Usage()
        return usage


def _add(table: dict[Any, float], key: Any, weight: float, max_keys: int) -> None:
    count = table.get(key)
    if count is not None:
        table[key] = count + weight
    elif len(table) < max_keys:
        table[key] = weight


def parse_usage(message: dict[str, Any]) -> Usage:
    """Parse a `usage` message and skip its invalid entries.

    A count must be a finite number above 0, and a WebSocket key a decimal
    user id.
    """
    usage = Usage()
    api = message.get("api")
    if isinstance(api, dict):
        for ip, count in api.items():
            if isinstance(ip, str) and _valid_count(count):
                usage.api[ip] = float(count)
    ws = message.get("ws")
    if isinstance(ws, dict):
        for key, count in ws.items():
            if isinstance(key, str) and key.isdigit() and _valid_count(count):
                usage.ws[int(key)] = float(count)
    return usage


def _valid_count(count: Any) -> bool:
    if isinstance(count, bool) or not isinstance(count, int | float):
        return False
    return math.isfinite(count) and count > 0
