"""Bootstrap shared by every worker process.

A worker is started by the supervisor as `python -m workers.<name>` with the
settings in its environment, plus `DEEPERHUB_WORKER_ID` and
`DEEPERHUB_SUPERVISOR_SOCKET`. `run_worker` connects back to the supervisor,
runs the worker's `serve(ctx)`, answers liveness pings and turns SIGTERM, a
`stop` message or the loss of the supervisor into `ctx.stopping`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from deeperhub.config import Settings, load_settings
from deeperhub.errors import ConfigError
from deeperhub.ipc import RemoteError, RequestHandler, RpcClient, open_rpc_client
from deeperhub.logs import APPLICATION_LOG, configure_logging

__all__ = ["WorkerContext", "run_worker"]

log = logging.getLogger("deeperhub.worker")

_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerContext:
    """What a worker's `serve` gets: settings, its id, readiness and stop signals."""

    settings: Settings
    worker_id: str
    stopping: trio.Event = field(default_factory=trio.Event)
    # "shutdown" or "restart": tells the acceptor which close code to send.
    stop_reason: str = "shutdown"
    # Connection to the supervisor; None when the worker runs on its own (tests).
    supervisor: RpcClient | None = None
    is_ready: trio.Event = field(default_factory=trio.Event)
    # Requests the supervisor forwards to this worker (`worker_call`, used by
    # `bin/deeperhub remote`), by op name. `ping` is always answered.
    handlers: dict[str, RequestHandler] = field(default_factory=dict)

    async def ready(self) -> None:
        """Report to the supervisor that this worker serves requests now."""
        if self.is_ready.is_set():
            return
        self.is_ready.set()
        if self.supervisor is not None:
            await self.supervisor.notify(
                {"event": "ready", "worker": self.worker_id, "pid": os.getpid()}
            )
        log.info("worker %s ready (pid %d)", self.worker_id, os.getpid())

    def request_stop(self, reason: str) -> None:
        """Set `stopping` once; the first reason wins."""
        if not self.stopping.is_set():
            self.stop_reason = reason
            self.stopping.set()


Serve = Callable[[WorkerContext], Awaitable[None]]


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("could not set PR_SET_PDEATHSIG; relying on the control socket")


def _supervisor_request_handler(ctx: WorkerContext) -> RequestHandler:
    async def handle(op: str, args: dict[str, Any]) -> Any:
        if op == "ping":
            return {}
        handler = ctx.handlers.get(op)
        if handler is None:
            raise RemoteError("invalid", f"unknown op {op} for worker {ctx.worker_id}")
        try:
            return await handler(op, args)
        except RemoteError:
            raise
        except Exception as exc:
            log.exception("request %s to worker %s failed", op, ctx.worker_id)
            raise RemoteError("internal_error", f"{op} failed: {exc}") from exc

    return handle


async def _watch_signals(ctx: WorkerContext) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info(
                "worker %s received %s, stopping",
                ctx.worker_id,
                signal.Signals(signum).name,
            )
            ctx.request_stop(ctx.stop_reason)


async def _watch_supervisor(ctx: WorkerContext, client: RpcClient) -> None:
    async for event in client.events:
        if event.get("event") == "stop":
            ctx.request_stop(str(event.get("reason") or "shutdown"))
    # The receiver ended: the supervisor is gone, so nobody will restart us.
    if not ctx.stopping.is_set():
        log.warning("worker %s lost its supervisor, stopping", ctx.worker_id)
        ctx.request_stop("shutdown")


async def _run(worker_id: str, serve: Serve, settings: Settings) -> None:
    ctx = WorkerContext(settings=settings, worker_id=worker_id)
    socket_path = os.environ.get("DEEPERHUB_SUPERVISOR_SOCKET")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, ctx)
        if socket_path:
            client_cm = open_rpc_client(
                socket_path, request_handler=_supervisor_request_handler(ctx)
            )
            ctx.supervisor = await nursery.start(_hold_client, client_cm)
            nursery.start_soon(_watch_supervisor, ctx, ctx.supervisor)
        await serve(ctx)
        nursery.cancel_scope.cancel()


async def _hold_client(
    client_cm: Any,
    *,
    task_status: trio.TaskStatus[RpcClient] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with client_cm as client:
        task_status.started(client)
        await trio.sleep_forever()


def run_worker(worker_id: str, serve: Serve) -> None:
    """Run `serve` as the main task of this worker process, then exit."""
    # Ctrl-C in a foreground `start` reaches the whole process group; the
    # supervisor decides the stop order, so workers ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    worker_id = os.environ.get("DEEPERHUB_WORKER_ID", worker_id)
    try:
        settings = load_settings(create_dev_key=False)
    except ConfigError as exc:
        print(f"deeperhub {worker_id}: {exc}", file=sys.stderr)
        sys.exit(78)  # EX_CONFIG
    configure_logging(settings, APPLICATION_LOG)
    log.info("worker %s starting (pid %d)", worker_id, os.getpid())
    try:
        trio.run(_run, worker_id, serve, settings)
    except Exception:
        log.exception("worker %s crashed", worker_id)
        sys.exit(1)
    log.info("worker %s stopped", worker_id)
