"""A request/reply link to a worker's Unix socket that reconnects by itself.

The security workers and the acceptor's security gate talk to workers that
the supervisor may restart at any time. `Link.run` keeps one connection open,
retrying with back-off while the socket is missing, and `Link.call` fails fast
with `LinkDown` while it is. This is the one module of the package with I/O.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ProtocolError
from ..ipc import RemoteError, open_rpc_client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from ..ipc import RpcClient

__all__ = ["RETRY_DELAY", "RETRY_DELAY_MAX", "Link", "LinkDown"]

log = logging.getLogger("deeperhub.security")

# Seconds between connection attempts: doubling from RETRY_DELAY.
RETRY_DELAY = 0.05
RETRY_DELAY_MAX = 1.0


class LinkDown(Exception):
    """The link has no connection right now."""


class Link:
    """One connection to the Unix socket `path`, reopened after it closes.

    `name` names the peer in logs and errors ("security monitor").
    """

    def __init__(self, path: Path, name: str, *, event_buffer: int = 10_000) -> None:
        self.path = path
        self.name = name
        self.event_buffer = event_buffer
        self.client: RpcClient | None = None
        self.connected = trio.Event()

    async def run(
        self,
        on_connect: Callable[[RpcClient], Awaitable[None]] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the link open forever, running `on_connect(client)` per connection.

        `on_connect` may run for as long as the connection lives (to consume
        pushes, for example). An error it raises from the connection closes the
        connection, which is then reopened.
        """
        task_status.started()
        delay = RETRY_DELAY
        lost_logged = False
        while True:
            try:
                async with open_rpc_client(
                    self.path, event_buffer=self.event_buffer
                ) as client:
                    delay = RETRY_DELAY
                    lost_logged = False
                    log.info("connected to the %s at %s", self.name, self.path)
                    await self._serve(client, on_connect)
            except OSError as exc:
                if not lost_logged:
                    log.warning(
                        "cannot connect to the %s at %s: %s; retrying",
                        self.name,
                        self.path,
                        exc.strerror or exc,
                    )
                    lost_logged = True
            else:
                log.warning("connection to the %s closed; reconnecting", self.name)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_DELAY_MAX)

    async def _serve(
        self,
        client: RpcClient,
        on_connect: Callable[[RpcClient], Awaitable[None]] | None,
    ) -> None:
        self.client = client
        self.connected.set()
        try:
            if on_connect is not None:
                await on_connect(client)
            await client.closed_event.wait()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            ProtocolError,
            RemoteError,
        ) as exc:
            log.warning("connection to the %s failed: %s", self.name, exc)
        finally:
            self.client = None
            self.connected = trio.Event()

    async def call(self, op: str, timeout: float = math.inf, **args: Any) -> Any:
        """Send request `op` and return its result.

        Raises LinkDown when not connected or when the connection breaks
        during the request, RemoteError when the peer replies with an error,
        and trio.TooSlowError after `timeout` seconds.
        """
        client = self.client
        if client is None or client.closed:
            raise LinkDown(f"the {self.name} is not reachable at {self.path}")
        try:
            return await client.call(op, timeout=timeout, **args)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise LinkDown(f"connection to the {self.name} lost: {exc}") from exc

    async def notify(self, message: dict[str, Any]) -> bool:
        """Send a one-way message, or return False when it cannot be sent."""
        client = self.client
        if client is None or client.closed:
            return False
        try:
            await client.notify(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
