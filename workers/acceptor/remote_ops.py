"""Requests an operator can send to an acceptor through `bin/deeperhub remote`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from deeperhub.ipc import RemoteError

if TYPE_CHECKING:
    from workers.common import WorkerContext

    from .hub import Hub

__all__ = ["OPERATOR_CLOSE_CODE", "register_remote_ops"]

log = logging.getLogger("deeperhub.acceptor.remote")

# Policy violation: phoenix.js reconnects after it, and the new upgrade is
# checked again (so a revoked token or blocked IP stays out).
OPERATOR_CLOSE_CODE = 1008


def register_remote_ops(ctx: WorkerContext, hub: Hub) -> None:
    """Add the acceptor's operator requests to the worker's handler table."""

    async def connections(op: str, args: dict[str, Any]) -> Any:
        return [
            {
                "id": connection.id,
                "user_id": connection.user_id,
                "username": connection.username,
                "vsn": connection.vsn,
                "topics": list(connection.subscriptions),
            }
            for connection in hub.connections()
        ]

    async def presence(op: str, args: dict[str, Any]) -> Any:
        topic = args.get("topic")
        if not isinstance(topic, str):
            raise RemoteError(
                "invalid", "presence needs a topic such as 'channel:lobby'"
            )
        return hub.presence_state(topic)

    async def disconnect_user(op: str, args: dict[str, Any]) -> Any:
        user_id = args.get("user_id")
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            raise RemoteError("invalid", f"user_id must be an integer, got {user_id!r}")
        closed = 0
        for connection in hub.connections():
            if connection.user_id == user_id:
                connection.close(OPERATOR_CLOSE_CODE, "disconnected by operator")
                closed += 1
        log.info(
            "operator disconnected user %d (%d connections) on %s",
            user_id,
            closed,
            ctx.worker_id,
        )
        return {"closed": closed}

    ctx.handlers.update(
        connections=connections,
        presence=presence,
        disconnect_user=disconnect_user,
    )
