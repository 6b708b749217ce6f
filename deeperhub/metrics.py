"""Prometheus series shared by all worker processes.

Each worker process writes its samples to files under `$PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode); the supervisor creates that folder
empty at start and the acceptor's `/metrics` sums the files of every process,
including those of processes that were restarted. Without the variable (unit
tests), the series live in the default in-process registry.

No label may carry a user, an IP, a topic or a raw path: label values come from
small fixed sets (method, route template, status, close code, worker id).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "DB_BATCH_SIZE",
    "DB_QUERY_DURATION",
    "DB_WRITES",
    "HTTP_DURATION",
    "HTTP_REQUESTS",
    "MESSAGES_BROADCAST",
    "MESSAGES_DELIVERED",
    "MESSAGES_RECEIVED",
    "SEND_QUEUE_DROPS",
    "WORKER_RESTARTS",
    "WORKER_UP",
    "WS_CONNECTIONS_ACTIVE",
    "WS_CONNECTIONS_CLOSED",
    "WS_CONNECTIONS_OPENED",
    "WS_PROTOCOL_ERRORS",
    "render_metrics",
]

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
    "WebSocket connections closed, by the close code the server sent or received.",
    ["code"],
)
WS_PROTOCOL_ERRORS = Counter(
    "deeperhub_ws_protocol_errors",
    "WebSocket protocol violations by clients, by the close code sent in answer.",
    ["code"],
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


def render_metrics() -> bytes:
    """Return the text exposition of every process's series."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)
    return generate_latest()
