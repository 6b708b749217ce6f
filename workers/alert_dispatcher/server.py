"""Alert dispatcher worker: delivers stored security alerts to their channels.

Alerts reach it through the `alert_outbox` table, written by the security
monitor through the DB writer together with the alert itself, so an alert
survives a restart of this worker and a receiver that is down. The monitor
sends `{"event": "outbox"}` on `<var_dir>/run/alerts.sock` after storing an
alert, which starts a scan at once. Without it the outbox is scanned every few
seconds and whenever a retry is due.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.ipc import RemoteError, RpcClient, serve_unix
from deeperhub.security.config import EMAIL, WEBHOOK, alert_config
from deeperhub.security.links import Link
from deeperhub.storage.reads import open_read_pool

from .channels import EmailChannel, LogChannel, WebhookChannel
from .outbox import OutboxRunner

if TYPE_CHECKING:
    from deeperhub.ipc import MessageStream
    from deeperhub.security.config import AlertConfig
    from workers.common import WorkerContext

    from .channels import Channel

__all__ = ["serve"]

log = logging.getLogger("deeperhub.alert_dispatcher")


def _channels(config: AlertConfig) -> list[tuple[Channel, float]]:
    """Return each active channel with its delivery timeout in seconds."""
    channels: list[tuple[Channel, float]] = [(LogChannel(), 1.0)]
    if WEBHOOK in config.channels:
        channels.append((WebhookChannel(config), config.webhook_timeout))
    if EMAIL in config.channels:
        channels.append((EmailChannel(config), config.smtp_timeout))
    return channels


async def serve(ctx: WorkerContext) -> None:
    """Deliver the outbox and serve the alerts socket until asked to stop."""
    settings = ctx.settings
    config = alert_config(settings)
    db = Link(settings.socket_path("db"), "DB writer")
    channels = _channels(config)

    async with open_read_pool(settings.db_path, 1) as reads:
        runners = [
            OutboxRunner(channel, config, reads=reads, db=db, delivery_timeout=timeout)
            for channel, timeout in channels
        ]

        async def handle_request(op: str, args: dict[str, Any]) -> Any:
            if op == "ping":
                return {}
            if op == "stats":
                return {
                    runner.channel.name: {
                        "delivered": runner.delivered,
                        "failed_attempts": runner.failed_attempts,
                    }
                    for runner in runners
                }
            raise RemoteError("invalid", f"unknown op {op}")

        async def handle_connection(messages: MessageStream) -> None:
            peer = RpcClient(messages, 1000, handle_request)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.run_receiver)
                async for event in peer.events:
                    if event.get("event") == "outbox":
                        for runner in runners:
                            runner.wake()
                nursery.cancel_scope.cancel()

        path = settings.socket_path("alerts")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(db.run)
                for runner in runners:
                    nursery.start_soon(runner.run)
                await nursery.start(serve_unix, path, handle_connection)
                log.info(
                    "alert dispatcher listening on %s; channels: %s",
                    path,
                    ", ".join(channel.name for channel, _ in channels),
                )
                await ctx.ready()
                await ctx.stopping.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for channel, _ in channels:
                    await channel.aclose()
    log.info("alert dispatcher stopped")
