"""Prometheus series shared by all worker processes.

Each worker process writes its samples to files under `$PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode). The supervisor creates that folder
empty at start, and `/metrics` on any acceptor sums the files of every process,
including those of processes that exited, so counters keep counting across
worker restarts. Gauges use a `live*` mode where a dead process's value must
disappear. The supervisor folds the files of exited processes into archive
files (`sweep_dead_processes`), so scrapes do not slow down with restarts. Without
the variable (unit tests), the series live in the default in-process registry.

prometheus-client picks its storage when it is first imported, so a process
must set `PROMETHEUS_MULTIPROC_DIR` before it imports this module.

No label may carry a user, an IP, a topic or a raw path: label values come from
small fixed sets (method, route template, status, close code, worker id).
Series computed at scrape time (process, host and database file sizes) are in
`deeperhub.process_metrics`. docs/metrics.md lists every series.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from deeperhub import metrics_archive

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE_LATEST",
    "DB_BATCH_SIZE",
    "DB_POOL_CONNECTIONS",
    "DB_POOL_IN_USE",
    "DB_QUERY_DURATION",
    "DB_WRITER_QUEUE_DEPTH",
    "DB_WRITES",
    "ERRORS",
    "EXPECTED_SECURITY_SERIES",
    "HTTP_DURATION",
    "HTTP_REQUESTS",
    "MESSAGES_BROADCAST",
    "MESSAGES_DELIVERED",
    "MESSAGES_RECEIVED",
    "MESSAGE_DELIVERY_SECONDS",
    "SECURITY_ALERTS",
    "SECURITY_ALERTS_DELIVERED",
    "SECURITY_ALERT_DELIVERY_FAILURES",
    "SECURITY_BLOCKED_REQUESTS",
    "SECURITY_BLOCKS",
    "SECURITY_BLOCKS_ACTIVE",
    "SECURITY_EVENTS",
    "SECURITY_EVENTS_DROPPED",
    "SECURITY_LOGIN_FAILURES",
    "SECURITY_PAYLOADS_REJECTED",
    "SECURITY_RATE_LIMITED",
    "SECURITY_REPUTATION_IPS",
    "SEND_QUEUE_DROPS",
    "WORKER_RESTARTS",
    "WORKER_UP",
    "WS_CONNECTIONS_ACTIVE",
    "WS_CONNECTIONS_CLOSED",
    "WS_CONNECTIONS_OPENED",
    "WS_PROTOCOL_ERRORS",
    "WS_UPGRADES_REJECTED",
    "close_code_label",
    "message_origin",
    "observe_delivery",
    "render_metrics",
    "sweep_dead_processes",
    "update_supervisor_series",
]

# Counters the security monitor is expected to export. The alert rules in
# etc/prometheus/alerts.yml use them. Until they exist, those alerts stay silent.
EXPECTED_SECURITY_SERIES = (
    "deeperhub_security_login_failures_total",
    "deeperhub_security_blocks_total",
)

# Close codes used as label values as they are. Any other code a client sends
# (3000-4999 are free for applications) is counted as "other".
_KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013}
)

WS_CONNECTIONS_ACTIVE = Gauge(
    "deeperhub_ws_connections_active",
    "Open WebSocket connections.",
    multiprocess_mode="livesum",
)
WS_CONNECTIONS_OPENED = Counter(
    "deeperhub_ws_connections_opened",
    "WebSocket connections accepted (after a successful upgrade).",
)
WS_CONNECTIONS_CLOSED = Counter(
    "deeperhub_ws_connections_closed",
    "WebSocket connections closed, by the close code the server sent or received "
    '(codes outside 1000-1013 are "other").',
    ["code"],
)
WS_PROTOCOL_ERRORS = Counter(
    "deeperhub_ws_protocol_errors",
    "WebSocket protocol violations by clients, by the close code sent in answer.",
    ["code"],
)
WS_UPGRADES_REJECTED = Counter(
    "deeperhub_ws_upgrades_rejected",
    "WebSocket upgrade requests answered with an HTTP error instead of 101, by status.",
    ["status"],
)
MESSAGES_RECEIVED = Counter(
    "deeperhub_messages_received",
    "Chat messages accepted from clients (WebSocket push or HTTP post).",
)
MESSAGES_BROADCAST = Counter(
    "deeperhub_messages_broadcast",
    "Broadcasts fanned out to the subscribers of a topic in one acceptor.",
)
MESSAGES_DELIVERED = Counter(
    "deeperhub_messages_delivered",
    "Frames queued to individual WebSocket connections by broadcasts.",
)
MESSAGE_DELIVERY_SECONDS = Histogram(
    "deeperhub_message_delivery_seconds",
    "Age of the oldest chat message in a socket write, from the DB writer "
    "stamping it (inserted_at) to the end of the write.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SEND_QUEUE_DROPS = Counter(
    "deeperhub_send_queue_drops",
    "Connections closed because their outgoing queue was full (slow consumers).",
)
HTTP_REQUESTS = Counter(
    "deeperhub_http_requests",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "deeperhub_http_request_duration_seconds",
    "HTTP request duration by method and route template.",
    ["method", "route"],
)
DB_WRITES = Counter(
    "deeperhub_db_writes",
    "Write operations handled by the DB writer, by operation and outcome.",
    ["op", "outcome"],
)
DB_BATCH_SIZE = Histogram(
    "deeperhub_db_batch_size",
    "Writes committed per transaction by the DB writer (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
DB_QUERY_DURATION = Histogram(
    "deeperhub_db_query_duration_seconds",
    "Duration of database work: `write_batch` in the DB writer, `read` in acceptors.",
    ["kind"],
)
DB_WRITER_QUEUE_DEPTH = Gauge(
    "deeperhub_db_writer_queue_depth",
    "Write requests waiting behind the batch the DB writer is committing.",
    multiprocess_mode="livesum",
)
DB_POOL_CONNECTIONS = Gauge(
    "deeperhub_db_pool_connections",
    "Read-only SQLite connections in the acceptors' read pools.",
    multiprocess_mode="livesum",
)
DB_POOL_IN_USE = Gauge(
    "deeperhub_db_pool_connections_in_use",
    "Read pool connections lent to a running query.",
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter(
    "deeperhub_worker_restarts",
    "Worker processes restarted by the supervisor.",
    ["worker"],
)
WORKER_UP = Gauge(
    "deeperhub_worker_up",
    "1 while the worker process is running and ready, else 0.",
    ["worker"],
    multiprocess_mode="max",
)
ERRORS = Counter(
    "deeperhub_errors",
    "Log records at level ERROR or above, by the process that wrote them.",
    ["worker"],
)


def close_code_label(code: int) -> str:
    """Return the `code` label value for a WebSocket close code."""
    return str(code) if code in _KNOWN_CLOSE_CODES else "other"


def message_origin(message: Mapping[str, Any]) -> float | None:
    """Return a stored message's `inserted_at` as Unix seconds, or None."""
    stamp = message.get("inserted_at")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def observe_delivery(origin: float) -> None:
    """Record that a frame with a message stamped at `origin` was written now."""
    # Wall clocks of the DB writer and the acceptor are the same host clock, but
    # a clock step can make the difference negative.
    MESSAGE_DELIVERY_SECONDS.observe(max(0.0, time.time() - origin))


def update_supervisor_series(worker_ids: Iterable[str]) -> None:
    """Run the supervisor's periodic metric upkeep for the workers it runs.

    Creates the per-worker error and restart counters at 0, so that they are
    scraped before the first event and `increase()` counts that event, and
    removes the live gauges of exited processes.
    """
    ERRORS.labels(worker="supervisor")
    for worker_id in worker_ids:
        ERRORS.labels(worker=worker_id)
        WORKER_RESTARTS.labels(worker=worker_id)
    sweep_dead_processes()


def sweep_dead_processes(directory: str | None = None) -> list[int]:
    """Fold the metric files of processes that no longer exist; return their pids.

    A dead process's `live*` gauges (open connections, pool usage) disappear
    and its counters, histograms and other gauges move into the archive files,
    so scrapes keep the same totals while reading fewer files. The supervisor
    calls this periodically. See `deeperhub.metrics_archive`.
    """
    path = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return []
    dead = metrics_archive.dead_pids(path, _process_exists)
    for pid in dead:
        metrics_archive.fold_dead_process(path, pid)
    return dead


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render_metrics(extra: Collector | None = None) -> bytes:
    """Return the text exposition of every process's series, plus `extra`'s."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        if extra is not None:
            registry.register(extra)
        with metrics_archive.scrape_lock(directory):
            return generate_latest(registry)

    text = generate_latest(REGISTRY)
    if extra is not None:
        registry = CollectorRegistry()
        registry.register(extra)
        text += generate_latest(registry)
    return text


# Security layer. Labels come from fixed sets: transport (http, websocket), rule
# ids of `deeperhub.security.rules`, event kinds and alert types of
# `deeperhub.security.policy`, severities, channel names and risk buckets.
SECURITY_RATE_LIMITED = Counter(
    "deeperhub_security_rate_limited",
    "HTTP requests and WebSocket messages rejected by a rate limit, by transport.",
    ["transport"],
)
SECURITY_BLOCKED_REQUESTS = Counter(
    "deeperhub_security_blocked_requests",
    "HTTP requests and WebSocket upgrades rejected because the IP is blocked.",
    ["transport"],
)
SECURITY_PAYLOADS_REJECTED = Counter(
    "deeperhub_security_payloads_rejected",
    "Requests and WebSocket messages rejected by a payload rule, by rule id.",
    ["rule"],
)
SECURITY_EVENTS_DROPPED = Counter(
    "deeperhub_security_events_dropped",
    "Security events an acceptor could not send to the security monitor.",
)
SECURITY_EVENTS = Counter(
    "deeperhub_security_events",
    "Security events received by the security monitor, by kind.",
    ["kind"],
)
SECURITY_LOGIN_FAILURES = Counter(
    "deeperhub_security_login_failures",
    "Failed logins reported to the security monitor.",
)
SECURITY_BLOCKS = Counter(
    "deeperhub_security_blocks",
    "IP blocks created, by reason (the alert type, or manual_block).",
    ["reason"],
)
SECURITY_BLOCKS_ACTIVE = Gauge(
    "deeperhub_security_blocks_active",
    "IPs blocked now, by a block or by a high-risk score.",
    multiprocess_mode="mostrecent",
)
SECURITY_REPUTATION_IPS = Gauge(
    "deeperhub_security_reputation_ips",
    "IPs with a reputation score below 100, by bucket: high_risk, medium_risk, "
    "low_risk.",
    ["bucket"],
    multiprocess_mode="mostrecent",
)
SECURITY_ALERTS = Counter(
    "deeperhub_security_alerts",
    "Alerts recorded by the security monitor, by severity.",
    ["severity"],
)
SECURITY_ALERTS_DELIVERED = Counter(
    "deeperhub_security_alerts_delivered",
    "Alerts delivered by the alert dispatcher, by severity and channel.",
    ["severity", "channel"],
)
SECURITY_ALERT_DELIVERY_FAILURES = Counter(
    "deeperhub_security_alert_delivery_failures",
    "Failed alert delivery attempts, by channel and outcome (retry or gave_up).",
    ["channel", "outcome"],
)
