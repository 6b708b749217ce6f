"""Security alerts: records, grouping of repeats, retry delays and webhook signatures.

Grouping: the first alert of a type and IP is recorded at once. Repeats of the
same type and IP within `security_alerts.group_window` seconds are only
counted, and when the window ends one follow-up alert carries their `count`. A
repeat with a higher severity than the alert that opened the window is
recorded at once and opens a new window, so a critical alert is never held
back behind a warning.

Webhook signature: `X-DeeperHub-Signature: sha256=HEX`, where HEX is the
HMAC-SHA256 under `security_alerts.webhook_secret` of the bytes
`TIMESTAMP.BODY`, TIMESTAMP being the value of `X-DeeperHub-Timestamp` (Unix
seconds) and BODY the raw request body.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "SEVERITIES",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AlertDraft",
    "AlertGrouper",
    "retry_delay",
    "severity_rank",
    "sign_webhook",
    "verify_webhook",
]

SEVERITIES = ("info", "warning", "critical")
SIGNATURE_HEADER = "X-DeeperHub-Signature"
TIMESTAMP_HEADER = "X-DeeperHub-Timestamp"
# Seconds a receiver should accept between TIMESTAMP and its own clock.
SIGNATURE_TOLERANCE = 300


def severity_rank(severity: str) -> int:
    """Return 0, 1 or 2 for info, warning and critical, or raise ValueError."""
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(
            f"invalid severity {severity!r}: expected one of {', '.join(SEVERITIES)}"
        ) from None


@dataclass(frozen=True)
class AlertDraft:
    """An alert before it is stored: what happened, to which IP and user."""

    type: str
    severity: str
    ip: str | None
    details: dict[str, Any] = field(default_factory=dict)
    user_id: int | None = None
    count: int = 1

    def __post_init__(self) -> None:
        severity_rank(self.severity)


@dataclass
class _Group:
    opened_at: float
    severity: str
    repeats: int = 0
    last: AlertDraft | None = None


class AlertGrouper:
    """Grouping of a stream of alerts into one alert per type and IP per window."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._groups: dict[tuple[str, str | None], _Group] = {}
        # Groups whose window ended before `flush` ran, still to be reported.
        self._ended: list[_Group] = []

    def __len__(self) -> int:
        return len(self._groups)

    def offer(self, draft: AlertDraft, now: float) -> AlertDraft | None:
        """Return `draft` if it is to be recorded now, or None if it was counted."""
        if self.window <= 0:
            return draft
        key = (draft.type, draft.ip)
        group = self._groups.get(key)
        if group is not None and now - group.opened_at >= self.window:
            # The window ended before `flush` ran: a new one opens below, and
            # the next `flush` still reports the old one's repeats.
            self._ended.append(group)
            group = None
        if group is None or severity_rank(draft.severity) > severity_rank(
            group.severity
        ):
            self._groups[key] = _Group(opened_at=now, severity=draft.severity)
            return draft
        group.repeats += draft.count
        group.last = draft
        return None

    def flush(self, now: float) -> list[AlertDraft]:
        """Close the windows that ended and return a follow-up for each with repeats."""
        ended, self._ended = self._ended, []
        for key, group in list(self._groups.items()):
            if now - group.opened_at >= self.window:
                del self._groups[key]
                ended.append(group)
        follow_ups: list[AlertDraft] = []
        for group in ended:
            if group.repeats and group.last is not None:
                details = {**group.last.details, "grouped_window": self.window}
                follow_ups.append(
                    replace(group.last, count=group.repeats, details=details)
                )
        return follow_ups


def retry_delay(
    attempts: int, base: float, maximum: float, *, jitter: float = 0.1
) -> float:
    """Return the seconds before retry number `attempts` (1 after the first failure).

    The delay doubles per attempt from `base` up to `maximum`, then varies by
    up to `jitter` (a fraction) so that many retries do not fire together.
    """
    exponent = min(max(0, attempts - 1), 62)
    delay = min(maximum, base * 2.0**exponent)
    if jitter > 0:
        delay *= 1.0 + random.uniform(-jitter, jitter)
    return max(0.0, delay)


def sign_webhook(secret: str, timestamp: int, body: bytes) -> str:
    """Return the `X-DeeperHub-Signature` value of a webhook body."""
    message = str(timestamp).encode("ascii") + b"." + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_webhook(
    secret: str,
    timestamp: str,
    signature: str,
    body: bytes,
    now: float,
    tolerance: float = SIGNATURE_TOLERANCE,
) -> bool:
    """Return whether a received webhook is authentic and recent.

    This is what a receiver runs: it recomputes the signature in constant time
    and rejects timestamps more than `tolerance` seconds from `now`.
    """
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent_at) > tolerance:
        return False
    expected = sign_webhook(secret, sent_at, body)
    return hmac.compare_digest(expected, signature)
