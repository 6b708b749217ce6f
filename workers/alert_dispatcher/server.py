"""Alert dispatcher worker: delivers security alerts.

It listens on `<var_dir>/run/alerts.sock` for one-way events
`{"event": "alert", "type", "severity", "ip", "details"}` and writes each to
the `deeperhub.alerts` log, the channel that is always on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.ipc import RemoteError, RpcClient, serve_unix

if TYPE_CHECKING:
    from deeperhub.ipc import MessageStream
    from workers.common import WorkerContext

__all__ = ["serve"]

log = logging.getLogger("deeperhub.alert_dispatcher")
alerts_log = logging.getLogger("deeperhub.alerts")

SEVERITY_LEVELS = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "critical": logging.CRITICAL,
}


async def serve(ctx: WorkerContext) -> None:
    """Serve the alerts socket until the worker is asked to stop."""
    # TODO: webhook and email channels, the outbox table and retries are not
    # implemented yet; alerts go to the log only.
    delivered = 0

    async def handle_request(op: str, args: dict[str, Any]) -> Any:
        if op == "ping":
            return {}
        if op == "stats":
            return {"delivered": delivered}
        raise RemoteError("invalid", f"unknown op {op}")

    async def handle_connection(messages: MessageStream) -> None:
        nonlocal delivered
        peer = RpcClient(messages, 1000, handle_request)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run_receiver)
            async for event in peer.events:
                if event.get("event") != "alert":
                    continue
                severity = str(event.get("severity", "warning"))
                alerts_log.log(
                    SEVERITY_LEVELS.get(severity, logging.WARNING),
                    "security alert %s (%s) ip=%s details=%s",
                    event.get("type"),
                    severity,
                    event.get("ip"),
                    event.get("details"),
                )
                delivered += 1
            nursery.cancel_scope.cancel()

    path = ctx.settings.socket_path("alerts")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, handle_connection)
        log.info("alert dispatcher listening on %s", path)
        await ctx.ready()
        await ctx.stopping.wait()
        nursery.cancel_scope.cancel()
