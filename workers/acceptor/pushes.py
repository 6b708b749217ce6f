"""Pipelined `insert_message` requests from WebSocket pushes to the DB writer.

A push is acknowledged only after the DB writer committed its message, but a
connection's reader must not wait for that commit before it reads the next
push: with one round trip per push, a client with many pushes in flight would
get no benefit from the DB writer's group commit. `PushPipeline.submit`
therefore writes the request and returns at once; the reply calls the given
callback, which sends the `phx_reply`.

Requests of one connection are written in the order they were read, and the
DB writer commits the requests of one IPC connection in order, so a client's
messages are stored in the order it sent them.

The pipeline has its own connection to `db.sock`. When that connection
breaks, every request in flight fails with `unavailable` (its message may or
may not have been stored), and the next submit reconnects.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import ProtocolError
from deeperhub.ipc import encode_message, iter_messages

if TYPE_CHECKING:
    from collections.abc import Callable

    from deeperhub.config import Settings

    from .hub import Hub

__all__ = ["PushPipeline", "PushResult"]

log = logging.getLogger("deeperhub.acceptor.pushes")

RECEIVE_BYTES = 1 << 20
RECONNECT_DELAY = 0.05
RECONNECT_DELAY_MAX = 1.0
# Seconds between checks for requests that waited longer than their timeout.
TIMEOUT_CHECK_INTERVAL = 0.5

# (error code or None, result or error message)
PushResult = tuple[str | None, Any]


class PushPipeline:
    """One IPC connection carrying many outstanding `insert_message` requests."""

    def __init__(self, settings: Settings, hub: Hub, *, timeout: float) -> None:
        self.path = settings.socket_path("db")
        self.hub = hub
        self.timeout = timeout
        self._next_id = 0
        # request id -> (deadline, callback)
        self._pending: dict[int, tuple[float, Callable[[PushResult], None]]] = {}
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._connected = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(
        self, op: str, args: dict[str, Any], callback: Callable[[PushResult], None]
    ) -> None:
        """Send request `op` and call `callback` with its result later; never blocks.

        The callback gets `(None, result)` on success and `(code, message)` on
        failure, where `code` is a DB writer error code, `timeout` or
        `unavailable`.
        """
        if not self._connected:
            callback(("unavailable", "the DB writer is not reachable"))
            return
        self._next_id += 1
        request_id = self._next_id
        framed = encode_message({"id": request_id, "op": op, "args": args})
        self._pending[request_id] = (trio.current_time() + self.timeout, callback)
        self._outbox.append(framed)
        self._outbox_ready.set()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the connection to the DB writer open, forever."""
        started = False
        delay = RECONNECT_DELAY
        while True:
            try:
                stream = await trio.open_unix_socket(str(self.path))
            except OSError as exc:
                log.debug("cannot connect to %s: %s", self.path, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)
                continue
            delay = RECONNECT_DELAY
            self._connected = True
            if not started:
                started = True
                task_status.started()
            try:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, stream)
                    nursery.start_soon(self._expire_loop)
                    await self._receive_loop(stream)
                    nursery.cancel_scope.cancel()
            # The nursery wraps errors of its tasks in exception groups.
            except* (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ) as exc:
                log.warning(
                    "push connection to the DB writer failed: %s", exc.exceptions[0]
                )
            except* ProtocolError as exc:
                log.error("invalid reply from the DB writer: %s", exc.exceptions[0])
            finally:
                self._connected = False
                self._outbox.clear()
                self._fail_all("unavailable", "connection to the DB writer lost")
            log.warning("push connection to the DB writer closed; reconnecting")

    def _fail_all(self, code: str, message: str) -> None:
        pending, self._pending = self._pending, {}
        for _, callback in pending.values():
            callback((code, message))
        self.hub.flush()

    async def _send_loop(self, stream: trio.SocketStream) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            if self._outbox:
                data, self._outbox = b"".join(self._outbox), []
                await stream.send_all(data)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(TIMEOUT_CHECK_INTERVAL)
            now = trio.current_time()
            expired = [
                request_id
                for request_id, (deadline, _) in self._pending.items()
                if deadline <= now
            ]
            for request_id in expired:
                _, callback = self._pending.pop(request_id)
                callback(("timeout", f"no reply within {self.timeout:g} s"))
            if expired:
                self.hub.flush()

    async def _receive_loop(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while True:
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return
            buffer += chunk
            for reply in iter_messages(buffer):
                self._complete(reply)
            self.hub.flush()

    def _complete(self, reply: Any) -> None:
        if not isinstance(reply, dict):
            raise ProtocolError("reply is not a JSON object")
        request_id = reply.get("id")
        entry = None
        if isinstance(request_id, int):
            entry = self._pending.pop(request_id, None)
        if entry is None:
            # The request timed out before its reply came.
            return
        callback = entry[1]
        if reply.get("ok"):
            callback((None, reply.get("result")))
        else:
            error = reply.get("error") or {}
            callback((str(error.get("code", "error")), str(error.get("message", ""))))
