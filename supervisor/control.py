"""The supervisor's control socket (`<var_dir>/run/supervisor.sock`).

Workers connect here, report `ready` and answer liveness pings. The CLI and
the acceptor's `/health` connect here too and send `status` requests.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.ipc import MessageStream, RemoteError, RpcClient

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["ControlServer"]

log = logging.getLogger("deeperhub.supervisor.control")


class ControlServer:
    """Tracks the connection of each ready worker, keyed by worker id and pid."""

    def __init__(self, handle_request: Callable[[str, dict[str, Any]], Awaitable[Any]]):
        self._handle_request = handle_request
        self._workers: dict[tuple[str, int], RpcClient] = {}
        self._changed = trio.Event()

    async def wait_ready(self, worker_id: str, pid: int) -> RpcClient:
        """Wait until worker `worker_id` with `pid` reports ready; return its peer."""
        while (worker_id, pid) not in self._workers:
            await self._changed.wait()
        return self._workers[(worker_id, pid)]

    def peer(self, worker_id: str, pid: int) -> RpcClient | None:
        return self._workers.get((worker_id, pid))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def handle_connection(self, messages: MessageStream) -> None:
        """Serve one connection from a worker or a client such as the CLI."""
        client = RpcClient(messages, 16, self._request)
        key: tuple[str, int] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run_receiver)
            async for event in client.events:
                if event.get("event") == "ready":
                    worker = event.get("worker")
                    pid = event.get("pid")
                    if isinstance(worker, str) and isinstance(pid, int):
                        key = (worker, pid)
                        self._workers[key] = client
                        self._notify()
            nursery.cancel_scope.cancel()
        if key is not None and self._workers.get(key) is client:
            del self._workers[key]
            self._notify()

    async def _request(self, op: str, args: dict[str, Any]) -> Any:
        try:
            return await self._handle_request(op, args)
        except RemoteError:
            raise
        except Exception as exc:
            log.exception("control request %s failed", op)
            raise RemoteError("internal_error", f"{op} failed: {exc}") from exc
