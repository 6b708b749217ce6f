"""Security ops of the DB writer and their read queries, on a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from deeperhub.security.decisions import DecisionCache
from deeperhub.storage.database import open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.security_reads import (
    due_deliveries,
    load_blocks,
    load_scores,
    next_delivery_time,
    security_events,
)
from deeperhub.storage.writes import WriteExecutor, WriteOutcome

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import apsw

NOW = datetime(2026, 12, 4, 15, 40, 0, 123456, tzinfo=UTC)
T = 1_800_000_000.0


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[apsw.Connection]:
    connection = open_write_connection(tmp_path / "hub.db")
    apply_migrations(connection)
    yield connection
    connection.close()


@pytest.fixture
def executor(conn: apsw.Connection) -> WriteExecutor:
    return WriteExecutor(conn, clock=lambda: NOW)


def run(executor: WriteExecutor, op: str, **args: Any) -> WriteOutcome:
    (outcome,) = executor.execute_batch([(op, args)])
    return outcome


def ok(executor: WriteExecutor, op: str, **args: Any) -> dict[str, Any]:
    outcome = run(executor, op, **args)
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    return outcome.result


def record(executor: WriteExecutor, severity: str = "warning", **extra: Any) -> int:
    args = {
        "type": "login_failures",
        "severity": severity,
        "ip": "203.0.113.9",
        "user_id": None,
        "details": {"count": 5},
        "count": 1,
        "channels": ["log", "webhook"],
        "now": T,
        "deadline": T + 3600,
        **extra,
    }
    return int(ok(executor, "security_record_alert", **args)["event"]["id"])


def block_args(**extra: Any) -> dict[str, Any]:
    return {
        "ip": "203.0.113.9",
        "reason": "login_failures",
        "source": "anomaly",
        "created_at": T,
        "expires_at": T + 900,
        "offences": 1,
        **extra,
    }


def test_block_upsert_and_load(executor: WriteExecutor, conn: apsw.Connection) -> None:
    ok(executor, "security_block", **block_args())
    ok(executor, "security_block", **block_args(offences=2, expires_at=None))
    (row,) = load_blocks(conn)
    assert row["offences"] == 2
    assert row["expires_at"] is None
    assert row["source"] == "anomaly"


def test_unblock_deletes_block_and_score(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    ok(executor, "security_block", **block_args())
    ok(
        executor,
        "security_save_scores",
        scores=[{"ip": "203.0.113.9", "score": 55.0, "updated_at": T}],
        removed=[],
    )
    assert ok(executor, "security_unblock", ip="203.0.113.9") == {"removed": True}
    assert load_blocks(conn) == []
    assert load_scores(conn) == []
    assert ok(executor, "security_unblock", ip="203.0.113.9") == {"removed": False}


def test_scores_saved_and_removed(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    scores = [
        {"ip": "203.0.113.9", "score": 55.5, "updated_at": T},
        {"ip": "2001:db8::1", "score": 10.0, "updated_at": T + 1},
    ]
    ok(executor, "security_save_scores", scores=scores, removed=[])
    ok(executor, "security_save_scores", scores=[], removed=["203.0.113.9"])
    assert load_scores(conn) == [
        {"ip": "2001:db8::1", "score": 10.0, "updated_at": T + 1}
    ]


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("security_block", block_args(source="robot"), "source"),
        ("security_block", block_args(offences=0), "offences"),
        ("security_block", block_args(expires_at="soon"), "expires_at"),
        (
            "security_save_scores",
            {"scores": [{"ip": "x", "score": 100, "updated_at": T}], "removed": []},
            "invalid score 100",
        ),
        (
            "security_record_alert",
            {"type": "x", "severity": "loud", "count": 1, "channels": [],
             "now": T, "deadline": T},
            "severity",
        ),
        ("alert_failed", {"outbox_id": 1, "now": T}, "missing argument error"),
    ],
)  # fmt: skip
def test_invalid_args_rejected(
    executor: WriteExecutor, op: str, args: dict[str, Any], message: str
) -> None:
    outcome = run(executor, op, **args)
    assert outcome.error is not None
    assert outcome.error[0] == "invalid"
    assert message in outcome.error[1]


def test_alert_stored_with_outbox(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    event_id = record(executor)
    (event,) = security_events(conn)
    assert event == {
        "id": event_id,
        "type": "login_failures",
        "severity": "warning",
        "ip": "203.0.113.9",
        "user_id": None,
        "details": {"count": 5},
        "count": 1,
        "inserted_at": "2026-12-04T15:40:00.123456Z",
    }
    for channel in ("log", "webhook"):
        (due,) = due_deliveries(conn, channel, T, 10)
        assert due["event"] == event
        assert due["attempts"] == 0
        assert due["deadline"] == T + 3600
    assert due_deliveries(conn, "email", T, 10) == []


def test_failed_delivery_retried_then_given_up(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    record(executor)
    (due,) = due_deliveries(conn, "webhook", T, 10)
    outbox_id = due["outbox_id"]
    ok(executor, "alert_failed", outbox_id=outbox_id, now=T, error="HTTP 500",
       next_attempt_at=T + 2)  # fmt: skip
    assert due_deliveries(conn, "webhook", T + 1, 10) == []
    assert next_delivery_time(conn, "webhook") == T + 2
    (due,) = due_deliveries(conn, "webhook", T + 2, 10)
    assert due["attempts"] == 1

    ok(executor, "alert_failed", outbox_id=outbox_id, now=T + 2, error="HTTP 500",
       next_attempt_at=None)  # fmt: skip
    assert due_deliveries(conn, "webhook", T + 100, 10) == []
    assert next_delivery_time(conn, "webhook") is None
    rows = conn.execute(
        "SELECT status, attempts, last_error FROM alert_outbox WHERE id = ?",
        (outbox_id,),
    ).fetchall()
    assert rows == [("failed", 2, "HTTP 500")]


def test_delivered_stays_delivered(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    record(executor)
    (due,) = due_deliveries(conn, "log", T, 10)
    ok(executor, "alert_delivered", outbox_id=due["outbox_id"], now=T)
    ok(executor, "alert_delivered", outbox_id=due["outbox_id"], now=T + 1)
    ok(executor, "alert_failed", outbox_id=due["outbox_id"], now=T + 2, error="late",
       next_attempt_at=T + 3)  # fmt: skip
    assert due_deliveries(conn, "log", T + 10, 10) == []
    outcome = run(executor, "alert_delivered", outbox_id=999, now=T)
    assert outcome.error is not None
    assert outcome.error[0] == "not_found"


def test_events_filtered_by_time_and_severity(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    info = record(executor, severity="info")
    warning = record(executor, severity="warning")
    critical = record(executor, severity="critical")
    ids = [e["id"] for e in security_events(conn)]
    assert ids == [critical, warning, info]
    at_least_warning = [e["id"] for e in security_events(conn, min_severity="warning")]
    assert at_least_warning == [critical, warning]
    assert security_events(conn, since="2026-12-04T15:41:00.000000Z") == []
    assert len(security_events(conn, limit=2)) == 2


def test_prune_removes_old_rows(executor: WriteExecutor, conn: apsw.Connection) -> None:
    record(executor)
    ok(executor, "security_block", **block_args(expires_at=T - 10))
    ok(executor, "security_block", **block_args(ip="203.0.113.10", expires_at=None))
    result = ok(
        executor,
        "security_prune",
        events_before="2026-12-05T00:00:00.000000Z",
        blocks_before=T,
    )
    assert result == {"events": 1, "blocks": 1}
    assert conn.execute("SELECT count(*) FROM alert_outbox").fetchall() == [(0,)]
    assert [row["ip"] for row in load_blocks(conn)] == ["203.0.113.10"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_decision_cache_expires_blocks() -> None:
    clock = FakeClock()
    cache = DecisionCache(clock)
    blocked = cache.apply(
        {"ip": "203.0.113.9", "blocked": True, "ttl": 10, "rate_factor": 0.5}
    )
    assert blocked == "203.0.113.9"
    assert cache.blocked("203.0.113.9") is not None
    assert cache.rate_factor("203.0.113.9") == 0.5
    clock.now += 10
    assert cache.blocked("203.0.113.9") is None
    assert cache.rate_factor("203.0.113.9") == 0.5


def test_decision_cache_snapshot_replaces() -> None:
    cache = DecisionCache(FakeClock())
    cache.apply({"ip": "198.51.100.1", "blocked": True, "ttl": None})
    newly = cache.replace(
        [
            {"ip": "198.51.100.2", "blocked": True, "ttl": None},
            {"ip": "198.51.100.3", "blocked": False, "rate_factor": 0.5},
        ]
    )
    assert newly == ["198.51.100.2"]
    assert cache.blocked("198.51.100.1") is None
    assert cache.blocked("198.51.100.2") is not None
    assert cache.rate_factor("198.51.100.3") == 0.5
    cache.apply({"ip": "198.51.100.3", "blocked": False, "rate_factor": 1.0})
    assert len(cache) == 1
    assert cache.apply({"ip": 5, "blocked": True}) is None
