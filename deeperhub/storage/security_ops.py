"""DB writer ops of the security layer: blocks, scores, alerts and the alert outbox.

Each op is `fn(conn, args, inserted_at) -> result` and runs inside the DB
writer's transaction and savepoint (see `writes.WriteExecutor`). An op raises
StorageError("invalid", ...) naming a bad argument, or ("not_found", ...).
Times are Unix seconds except `inserted_at`, ISO 8601 UTC from the writer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import apsw

__all__ = ["SECURITY_WRITE_OPS", "SecurityOp"]

SecurityOp = Callable[["apsw.Connection", "Mapping[str, Any]", str], dict[str, Any]]

_SEVERITIES = ("info", "warning", "critical")
_BLOCK_SOURCES = ("anomaly", "manual")
# Longest error text kept per outbox row.
_MAX_ERROR_CHARS = 500


def security_block(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Insert or replace the block record of an IP."""
    ip = _text(args, "ip")
    source = _text(args, "source")
    if source not in _BLOCK_SOURCES:
        raise StorageError("invalid", f"invalid argument source: {source!r}")
    conn.execute(
        "INSERT INTO ip_blocks (ip, reason, source, created_at, expires_at, offences) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ip) DO UPDATE SET "
        "reason = excluded.reason, source = excluded.source, "
        "created_at = excluded.created_at, expires_at = excluded.expires_at, "
        "offences = excluded.offences",
        (
            ip,
            _text(args, "reason"),
            source,
            _number(args, "created_at"),
            _number(args, "expires_at", optional=True),
            _integer(args, "offences", minimum=1),
        ),
    ).fetchall()
    return {}


def security_unblock(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Delete the block record and score of an IP, and return whether it had a block."""
    ip = _text(args, "ip")
    rows = conn.execute("DELETE FROM ip_blocks WHERE ip = ? RETURNING 1", (ip,))
    removed = bool(rows.fetchall())
    conn.execute("DELETE FROM ip_reputation WHERE ip = ?", (ip,)).fetchall()
    return {"removed": removed}


def security_save_scores(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Store `scores` ([{ip, score, updated_at}]) and delete the `removed` IPs."""
    scores = _list(args, "scores")
    removed = _list(args, "removed")
    for entry in scores:
        if not isinstance(entry, dict):
            raise StorageError("invalid", "invalid argument scores: expected objects")
        score = _number(entry, "score")
        if not 0 <= score < 100:
            raise StorageError("invalid", f"invalid score {score}: expected 0 to 99.99")
        conn.execute(
            "INSERT INTO ip_reputation (ip, score, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (ip) DO UPDATE SET score = excluded.score, "
            "updated_at = excluded.updated_at",
            (_text(entry, "ip"), score, _number(entry, "updated_at")),
        ).fetchall()
    for ip in removed:
        if not isinstance(ip, str):
            raise StorageError("invalid", "invalid argument removed: expected strings")
        conn.execute("DELETE FROM ip_reputation WHERE ip = ?", (ip,)).fetchall()
    return {}


def security_record_alert(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Store an alert in `security_events` with one outbox row per channel."""
    alert_type = _text(args, "type")
    severity = _text(args, "severity")
    if severity not in _SEVERITIES:
        raise StorageError("invalid", f"invalid argument severity: {severity!r}")
    ip = args.get("ip")
    if ip is not None and not isinstance(ip, str):
        raise StorageError("invalid", "invalid argument ip: expected a string or null")
    user_id = args.get("user_id")
    if user_id is not None:
        user_id = _integer(args, "user_id")
    details = args.get("details", {})
    if not isinstance(details, dict):
        raise StorageError("invalid", "invalid argument details: expected an object")
    count = _integer(args, "count", minimum=1)
    channels = _list(args, "channels")
    now = _number(args, "now")
    deadline = _number(args, "deadline")

    rows = conn.execute(
        "INSERT INTO security_events "
        "(type, severity, ip, user_id, details, count, inserted_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (alert_type, severity, ip, user_id, json.dumps(details), count, inserted_at),
    ).fetchall()
    event_id = rows[0][0]
    assert isinstance(event_id, int)
    for channel in channels:
        if not isinstance(channel, str) or not channel:
            raise StorageError("invalid", "invalid argument channels: expected names")
        conn.execute(
            "INSERT INTO alert_outbox "
            "(event_id, channel, next_attempt_at, deadline, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (event_id, channel, now, deadline, now),
        ).fetchall()
    event = {
        "id": event_id,
        "type": alert_type,
        "severity": severity,
        "ip": ip,
        "user_id": user_id,
        "details": details,
        "count": count,
        "inserted_at": inserted_at,
    }
    return {"event": event}


def alert_delivered(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Mark an outbox row delivered. A row already delivered stays as it is."""
    outbox_id = _integer(args, "outbox_id")
    now = _number(args, "now")
    rows = conn.execute(
        "UPDATE alert_outbox SET status = 'delivered', attempts = attempts + 1, "
        "last_error = NULL, updated_at = ? WHERE id = ? AND status != 'delivered' "
        "RETURNING 1",
        (now, outbox_id),
    ).fetchall()
    if not rows and not _outbox_exists(conn, outbox_id):
        raise StorageError("not_found", f"outbox row {outbox_id} not found")
    return {}


def alert_failed(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Record a failed attempt: retry at `next_attempt_at`, or give up when null."""
    outbox_id = _integer(args, "outbox_id")
    now = _number(args, "now")
    error = _text(args, "error", allow_empty=True)[:_MAX_ERROR_CHARS]
    next_attempt_at = _number(args, "next_attempt_at", optional=True)
    status = "pending" if next_attempt_at is not None else "failed"
    rows = conn.execute(
        "UPDATE alert_outbox SET status = ?, attempts = attempts + 1, "
        "last_error = ?, next_attempt_at = coalesce(?, next_attempt_at), "
        "updated_at = ? WHERE id = ? AND status = 'pending' RETURNING 1",
        (status, error, next_attempt_at, now, outbox_id),
    ).fetchall()
    if not rows and not _outbox_exists(conn, outbox_id):
        raise StorageError("not_found", f"outbox row {outbox_id} not found")
    return {}


def security_prune(
    conn: apsw.Connection, args: Mapping[str, Any], inserted_at: str
) -> dict[str, Any]:
    """Delete alerts (with their outbox rows) and ended blocks older than the cutoffs.

    `events_before` is an ISO 8601 UTC time, `blocks_before` Unix seconds.
    """
    events_before = _text(args, "events_before")
    blocks_before = _number(args, "blocks_before")
    events = conn.execute(
        "DELETE FROM security_events WHERE inserted_at < ? RETURNING 1",
        (events_before,),
    ).fetchall()
    blocks = conn.execute(
        "DELETE FROM ip_blocks WHERE expires_at IS NOT NULL AND expires_at < ? "
        "RETURNING 1",
        (blocks_before,),
    ).fetchall()
    return {"events": len(events), "blocks": len(blocks)}


SECURITY_WRITE_OPS: dict[str, SecurityOp] = {
    "security_block": security_block,
    "security_unblock": security_unblock,
    "security_save_scores": security_save_scores,
    "security_record_alert": security_record_alert,
    "alert_delivered": alert_delivered,
    "alert_failed": alert_failed,
    "security_prune": security_prune,
}


def _outbox_exists(conn: apsw.Connection, outbox_id: int) -> bool:
    rows = conn.execute("SELECT 1 FROM alert_outbox WHERE id = ?", (outbox_id,))
    return bool(rows.fetchall())


# Argument checks. Each raises StorageError("invalid", ...) naming the argument.


def _value(args: Mapping[str, Any], name: str) -> Any:
    if name not in args:
        raise StorageError("invalid", f"missing argument {name}")
    return args[name]


def _text(args: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = _value(args, name)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise StorageError(
            "invalid", f"invalid argument {name}: expected a non-empty string"
        )
    return value


def _number(args: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    value = args.get(name) if optional else _value(args, name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StorageError("invalid", f"invalid argument {name}: expected a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise StorageError("invalid", f"invalid argument {name}: must be finite")
    return value


def _integer(args: Mapping[str, Any], name: str, *, minimum: int = 0) -> int:
    value = _value(args, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StorageError("invalid", f"invalid argument {name}: expected an integer")
    if not minimum <= value < 2**63:
        raise StorageError(
            "invalid", f"invalid argument {name}: {value} is below {minimum} or too big"
        )
    return value


def _list(args: Mapping[str, Any], name: str) -> list[Any]:
    value = _value(args, name)
    if not isinstance(value, list):
        raise StorageError("invalid", f"invalid argument {name}: expected a list")
    return value
