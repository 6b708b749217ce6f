"""Security monitor worker: receives security events from acceptors.

It listens on `<var_dir>/run/security.sock`. Acceptors send one-way events
`{"event": "security", "kind": NAME, "ip": ADDRESS, ...}`; the monitor counts
them per kind and answers `stats` requests.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.ipc import RemoteError, RpcClient, serve_unix

if TYPE_CHECKING:
    from deeperhub.ipc import MessageStream
    from workers.common import WorkerContext

__all__ = ["serve"]

log = logging.getLogger("deeperhub.security_monitor")


async def serve(ctx: WorkerContext) -> None:
    """Serve the security socket until the worker is asked to stop."""
    # TODO: rate limits, anomaly thresholds, IP reputation and blocking decisions
    # pushed to acceptors are not implemented yet; events are only counted.
    counts: Counter[str] = Counter()

    async def handle_request(op: str, args: dict[str, Any]) -> Any:
        if op == "ping":
            return {}
        if op == "stats":
            return {"events": dict(counts)}
        raise RemoteError("invalid", f"unknown op {op}")

    async def handle_connection(messages: MessageStream) -> None:
        peer = RpcClient(messages, 1000, handle_request)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run_receiver)
            async for event in peer.events:
                if event.get("event") == "security":
                    kind = str(event.get("kind", "unknown"))
                    counts[kind] += 1
                    log.info("security event %s from %s", kind, event.get("ip"))
            nursery.cancel_scope.cancel()

    path = ctx.settings.socket_path("security")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, handle_connection)
        log.info("security monitor listening on %s", path)
        await ctx.ready()
        await ctx.stopping.wait()
        nursery.cancel_scope.cancel()
