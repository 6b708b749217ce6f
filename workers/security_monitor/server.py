"""Security monitor worker: decisions on IPs from the events of every acceptor.

It listens on `<var_dir>/run/security.sock`. Acceptors subscribe to decisions
(blocks and halved rate limits per IP) and send one-way security events
(failed logins, 404s, malicious payloads, rate limit hits, WebSocket floods)
and their rate limit usage, which the monitor relays to the other acceptors.
The CLI sends operator requests (`blocked`, `block`, `unblock`, `reputation`,
`events`). docs/architecture.md lists the messages and docs/security.md the
rules.

At start it loads block records and reputation scores from SQLite through a
read-only connection. Every write goes through the DB writer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from deeperhub.ipc import serve_unix
from deeperhub.security.clock import SteadyClock
from deeperhub.security.config import alert_config, monitor_config
from deeperhub.security.links import Link
from deeperhub.security.policy import SecurityPolicy
from deeperhub.storage.reads import open_read_pool
from deeperhub.storage.security_reads import load_blocks, load_scores

from .monitor import OPERATOR_OPS, Monitor

if TYPE_CHECKING:
    from workers.common import WorkerContext

__all__ = ["serve"]

log = logging.getLogger("deeperhub.security_monitor")


async def serve(ctx: WorkerContext) -> None:
    """Serve the security socket until the worker is asked to stop."""
    settings = ctx.settings
    config = monitor_config(settings)
    policy = SecurityPolicy(config, SteadyClock())
    db = Link(settings.socket_path("db"), "DB writer")
    alerts = Link(settings.socket_path("alerts"), "alert dispatcher")

    async with open_read_pool(settings.db_path, 1) as reads:
        blocks = await reads.run(load_blocks)
        scores = await reads.run(load_scores)
        policy.load(blocks, scores)
        log.info(
            "security monitor loaded %d block records and %d scores; %d IPs blocked",
            len(blocks),
            len(scores),
            policy.blocked_count(),
        )
        monitor = Monitor(
            policy, config, alert_config(settings), db=db, alerts=alerts, reads=reads
        )
        # The same requests through the supervisor (`bin/deeperhub remote`).
        for op in OPERATOR_OPS:
            ctx.handlers[op] = monitor.handle_request
        path = settings.socket_path("security")
        async with trio.open_nursery() as nursery:
            await nursery.start(db.run)
            await nursery.start(alerts.run)
            nursery.start_soon(monitor.run_writes)
            nursery.start_soon(monitor.run_checks)
            await nursery.start(serve_unix, path, monitor.handle_connection)
            log.info("security monitor listening on %s", path)
            await ctx.ready()
            await ctx.stopping.wait()
            # Leave half of the supervisor's SIGTERM-to-SIGKILL time for the rest.
            await monitor.drain(float(settings["supervisor.shutdown_timeout"]) / 2)
            nursery.cancel_scope.cancel()
    log.info("security monitor stopped")
