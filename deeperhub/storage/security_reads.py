"""Read queries of the security layer, for `ReadPool.run` (see `reads.py`).

The security monitor loads blocks and scores at start and reads alerts for
`bin/deeperhub security events`, and the alert dispatcher reads its outbox.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import apsw

__all__ = [
    "SEVERITY_AT_LEAST",
    "due_deliveries",
    "load_blocks",
    "load_scores",
    "next_delivery_time",
    "security_events",
]

# Severities at or above each severity, for `security_events(min_severity=...)`.
SEVERITY_AT_LEAST = {
    "info": ("info", "warning", "critical"),
    "warning": ("warning", "critical"),
    "critical": ("critical",),
}

_EVENT_COLUMNS = (
    "e.id, e.type, e.severity, e.ip, e.user_id, e.details, e.count, e.inserted_at"
)


def load_blocks(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Return every block record, active or ended, by IP."""
    rows = conn.execute(
        "SELECT ip, reason, source, created_at, expires_at, offences FROM ip_blocks "
        "ORDER BY ip"
    ).fetchall()
    keys = ("ip", "reason", "source", "created_at", "expires_at", "offences")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def load_scores(conn: apsw.Connection) -> list[dict[str, Any]]:
    """Return every stored reputation score `{ip, score, updated_at}`."""
    rows = conn.execute(
        "SELECT ip, score, updated_at FROM ip_reputation ORDER BY ip"
    ).fetchall()
    return [{"ip": ip, "score": score, "updated_at": at} for ip, score, at in rows]


def _event(row: tuple[Any, ...]) -> dict[str, Any]:
    event_id, kind, severity, ip, user_id, details, count, inserted_at = row
    try:
        parsed = json.loads(details)
    except ValueError:
        parsed = {}
    return {
        "id": event_id,
        "type": kind,
        "severity": severity,
        "ip": ip,
        "user_id": user_id,
        "details": parsed if isinstance(parsed, dict) else {},
        "count": count,
        "inserted_at": inserted_at,
    }


def security_events(
    conn: apsw.Connection,
    since: str | None = None,
    min_severity: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Return up to `limit` alerts, newest first.

    `since` is an ISO 8601 UTC time in the stored format, and `min_severity` keeps
    that severity and the ones above it.
    """
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("e.inserted_at >= ?")
        params.append(since)
    if min_severity is not None:
        allowed = SEVERITY_AT_LEAST[min_severity]
        clauses.append(f"e.severity IN ({', '.join('?' for _ in allowed)})")
        params.extend(allowed)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM security_events AS e {where}"
        "ORDER BY e.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [_event(row) for row in rows]


def due_deliveries(
    conn: apsw.Connection, channel: str, now: float, limit: int
) -> list[dict[str, Any]]:
    """Return pending outbox rows of `channel` due at `now`, oldest due first.

    Each is `{outbox_id, attempts, deadline, event}` with the alert as `event`.
    """
    rows = conn.execute(
        f"SELECT o.id, o.attempts, o.deadline, {_EVENT_COLUMNS} "
        "FROM alert_outbox AS o JOIN security_events AS e ON e.id = o.event_id "
        "WHERE o.status = 'pending' AND o.channel = ? AND o.next_attempt_at <= ? "
        "ORDER BY o.next_attempt_at, o.id LIMIT ?",
        (channel, now, limit),
    ).fetchall()
    return [
        {
            "outbox_id": row[0],
            "attempts": row[1],
            "deadline": row[2],
            "event": _event(row[3:]),
        }
        for row in rows
    ]


def next_delivery_time(conn: apsw.Connection, channel: str) -> float | None:
    """Return when the next pending delivery of `channel` is due, or None."""
    rows = conn.execute(
        "SELECT min(next_attempt_at) FROM alert_outbox "
        "WHERE status = 'pending' AND channel = ?",
        (channel,),
    ).fetchall()
    value = rows[0][0] if rows else None
    return None if value is None else float(value)
