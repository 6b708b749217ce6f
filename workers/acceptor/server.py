"""Acceptor worker: wires the shared services and serves the TCP port."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import trio

from deeperhub.auth.passwords import PasswordService
from deeperhub.auth.tokens import TokenService
from deeperhub.ipc import open_rpc_client
from deeperhub.storage.reads import open_read_pool

from .bus import BusClient
from .http_app import create_app
from .hub import Hub
from .listener import Listener, open_listen_socket
from .pushes import PushPipeline
from .remote_ops import register_remote_ops
from .security_gate import SecurityGate
from .services import Services
from .session import DB_CALL_TIMEOUT
from .token_watch import TokenWatch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from deeperhub.config import Settings
    from deeperhub.ipc import RpcClient
    from workers.common import WorkerContext

__all__ = ["serve"]

log = logging.getLogger("deeperhub.acceptor")

# Back-off between attempts to reach the DB writer while it restarts, seconds.
RECONNECT_DELAY = 0.05
RECONNECT_DELAY_MAX = 1.0
# WebSocket close codes sent when the server stops: 1001 "going away" on
# shutdown, 1012 "service restart" on restart. Never 1000, after which
# phoenix.js does not reconnect.
CLOSE_CODES = {"shutdown": 1001, "restart": 1012}


async def serve(ctx: WorkerContext) -> None:
    """Serve HTTP and WebSockets until the worker is asked to stop."""
    settings = ctx.settings
    async with open_read_pool(
        settings.db_path, int(settings["database.pool_size"])
    ) as reads:
        hub = Hub(settings, worker_id=ctx.worker_id)
        register_remote_ops(ctx, hub)
        async with trio.open_nursery() as nursery:
            db = await nursery.start(_keep_db_client, settings, None)
            token_watch = TokenWatch(settings, hub)
            hub.bus_handlers["revoked"] = token_watch.apply_revocation
            await nursery.start(token_watch.run)
            security = SecurityGate(settings)
            await nursery.start(security.run)
            services = Services(
                settings=settings,
                db=db,
                reads=reads,
                tokens=TokenService(settings),
                passwords=PasswordService(),
                hub=hub,
                worker_id=ctx.worker_id,
                supervisor=ctx.supervisor,
                token_watch=token_watch,
                security=security,
            )
            # From now on the reconnect loops replace services.db in place.
            nursery.start_soon(_keep_db_client, settings, services, db)
            # Fan-out: the flusher, pipelined pushes and the bus (see bus.py).
            await nursery.start(hub.run_flusher)
            services.pushes = PushPipeline(settings, hub, timeout=DB_CALL_TIMEOUT)
            await nursery.start(services.pushes.run)
            await nursery.start(BusClient(settings, hub, reads).run)

            app = create_app(services)
            host = str(settings["server.host"])
            port = int(settings["server.port"])
            reuse_port = int(settings["server.acceptors"]) > 1
            sock = await open_listen_socket(host, port, reuse_port=reuse_port)
            listener = Listener(services, app)
            async with trio.open_nursery() as serving:
                # The listener stops accepting as soon as `stopping` is set and
                # returns once in-flight HTTP requests drained.
                await serving.start(
                    listener.serve,
                    sock,
                    ctx.stopping,
                    float(settings["server.drain_timeout"]),
                )
                log.info("acceptor listening on http://%s:%d", host, port)
                await ctx.ready()
                await ctx.stopping.wait()
                await hub.close_all(CLOSE_CODES.get(ctx.stop_reason, 1001))
            nursery.cancel_scope.cancel()
        log.info("acceptor stopped")


async def _keep_db_client(
    settings: Settings,
    services: Services | None,
    current: RpcClient | None = None,
    *,
    task_status: trio.TaskStatus[RpcClient] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold a request connection to the DB writer, reconnecting after it restarts.

    Called first without `services` to open the initial connection (returned via
    `task_status`, then this call ends). Called again with `services` and the
    client it holds, it waits for that client to close and reconnects, storing
    each new client in `services.db`. Requests made while the DB writer is down
    fail fast with a closed-connection error.
    """
    path = settings.socket_path("db")
    if services is None:
        async with _connect_with_retry(path) as client:
            task_status.started(client)
            await trio.sleep_forever()
        return
    assert current is not None
    await current.closed_event.wait()
    log.warning("connection to the DB writer closed; reconnecting")
    while True:
        async with _connect_with_retry(path) as client:
            services.db = client
            log.info("reconnected to the DB writer")
            await client.closed_event.wait()
            log.warning("connection to the DB writer closed; reconnecting")


@asynccontextmanager
async def _connect_with_retry(path: Path) -> AsyncIterator[RpcClient]:
    """Connect to the Unix socket `path`, retrying with back-off while it is absent."""
    delay = RECONNECT_DELAY
    async with AsyncExitStack() as stack:
        while True:
            try:
                client = await stack.enter_async_context(open_rpc_client(path))
            except OSError as exc:
                log.debug(
                    "cannot connect to %s: %s; retrying in %g s", path, exc, delay
                )
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                continue
            break
        yield client
