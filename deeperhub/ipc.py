"""Messages between worker processes over Unix sockets.

Wire format: each message is a 4-byte big-endian length followed by that many
bytes of UTF-8 JSON encoding one object. Requests carry an integer `id`, an
`op` name and an `args` object; the reply repeats the `id` with either
`{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`.
Messages without an `id` are one-way events (pushes) in either direction.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from .errors import ProtocolError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MessageStream",
    "RemoteError",
    "RequestHandler",
    "RpcClient",
    "encode_message",
    "iter_messages",
    "open_rpc_client",
    "open_unix_stream",
    "serve_unix",
]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")

log = logging.getLogger("deeperhub.ipc")

Handler = Callable[["MessageStream"], Awaitable[None]]
RequestHandler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class RemoteError(Exception):
    """The peer answered a request with an error object."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode_message(message: dict[str, Any]) -> bytes:
    """Return the framed bytes of one message."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"IPC message of {len(body)} bytes exceeds the maximum")
    return _HEADER.pack(len(body)) + body


def iter_messages(buffer: bytearray) -> Iterator[Any]:
    """Yield the decoded complete messages at the start of `buffer`.

    For readers that handle every message of one read before they flush.
    When the iteration ends or stops, the bytes of the yielded messages are
    removed from `buffer` and an incomplete message stays for the next read.
    """
    offset = 0
    size = len(buffer)
    try:
        while size - offset >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length > MAX_MESSAGE_BYTES:
                raise ProtocolError(
                    f"IPC message of {length} bytes exceeds the maximum"
                )
            end = offset + _HEADER.size + length
            if end > size:
                break
            try:
                message = json.loads(buffer[offset + _HEADER.size : end])
            except ValueError as exc:
                raise ProtocolError(f"invalid JSON in IPC message: {exc}") from exc
            offset = end
            yield message
    finally:
        del buffer[:offset]


class MessageStream:
    """Framed JSON messages on a trio stream. Sends are serialized by a lock."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(encode_message(message))

    async def send_raw(self, framed: bytes) -> None:
        """Send bytes already framed by `encode_message` (encode once, send to many)."""
        async with self._send_lock:
            await self.stream.send_all(framed)

    async def receive(self) -> dict[str, Any] | None:
        """Return the next message, or None when the peer closed cleanly."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buffer)
                if length > MAX_MESSAGE_BYTES:
                    raise ProtocolError(
                        f"IPC message of {length} bytes exceeds the maximum"
                    )
                end = _HEADER.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[_HEADER.size : end])
                    del self._buffer[:end]
                    try:
                        message = json.loads(body)
                    except ValueError as exc:
                        raise ProtocolError(
                            f"invalid JSON in IPC message: {exc}"
                        ) from exc
                    if not isinstance(message, dict):
                        raise ProtocolError("IPC message is not a JSON object")
                    return message
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                if self._buffer:
                    raise ProtocolError("IPC peer closed in the middle of a message")
                return None
            self._buffer += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_unix_stream(path: Path | str) -> MessageStream:
    """Connect to the Unix socket at `path`."""
    stream = await trio.open_unix_socket(str(path))
    return MessageStream(stream)


async def serve_unix(
    path: Path,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the Unix socket `path` (mode 0600) and run `handler` per connection.

    A stale socket file from a killed process is removed first. The handler's
    errors are logged and end only that connection.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    path.chmod(0o600)
    sock.listen(128)
    listener = trio.SocketListener(sock)

    async def run_one(stream: trio.SocketStream) -> None:
        messages = MessageStream(stream)
        try:
            await handler(messages)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except ProtocolError as exc:
            log.warning("closing IPC connection on %s: %s", path, exc)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(run_one, stream)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class RpcClient:
    """Request/reply peer over one MessageStream, with pushes on `events`.

    Many tasks may call `call` at once; replies are matched by id. Pushes (messages
    without an id) go to `events`, a memory channel with a bounded buffer. When a
    `request_handler` is given, requests from the other side (messages with an
    `op`) are answered with its return value, one at a time, so it must be quick.
    """

    def __init__(
        self,
        messages: MessageStream,
        event_buffer: int,
        request_handler: RequestHandler | None = None,
    ) -> None:
        self.messages = messages
        self._request_handler = request_handler
        self._next_id = 0
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self.events = trio.open_memory_channel[dict[str, Any]](
            event_buffer
        )
        self.closed = False
        self.closed_event = trio.Event()

    async def call(self, op: str, /, timeout: float = math.inf, **args: Any) -> Any:
        """Send request `op` and return its result, raising RemoteError on error."""
        if self.closed:
            raise trio.ClosedResourceError(f"IPC connection closed before {op}")
        self._next_id += 1
        request_id = self._next_id
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[request_id] = send
        try:
            await self.messages.send({"id": request_id, "op": op, "args": args})
            with trio.fail_after(timeout):
                try:
                    reply = await receive.receive()
                except trio.EndOfChannel:
                    raise trio.BrokenResourceError(
                        f"IPC connection closed while waiting for {op}"
                    ) from None
        finally:
            self._pending.pop(request_id, None)
        if reply.get("ok"):
            return reply.get("result")
        error = reply.get("error") or {}
        raise RemoteError(
            str(error.get("code", "error")), str(error.get("message", ""))
        )

    async def _answer(self, request: dict[str, Any]) -> None:
        op = str(request.get("op"))
        args = request.get("args")
        reply: dict[str, Any] = {"id": request.get("id")}
        if self._request_handler is None:
            reply.update(
                ok=False, error={"code": "invalid", "message": f"unknown op {op}"}
            )
        else:
            try:
                result = await self._request_handler(
                    op, args if isinstance(args, dict) else {}
                )
                reply.update(ok=True, result=result)
            except RemoteError as exc:
                reply.update(ok=False, error={"code": exc.code, "message": exc.message})
        await self.messages.send(reply)

    async def notify(self, event: dict[str, Any]) -> None:
        """Send a one-way message."""
        await self.messages.send(event)

    async def run_receiver(self) -> None:
        """Dispatch replies and pushes until the connection closes."""
        try:
            while True:
                message = await self.messages.receive()
                if message is None:
                    break
                request_id = message.get("id")
                if "op" in message:
                    await self._answer(message)
                elif isinstance(request_id, int):
                    waiter = self._pending.get(request_id)
                    if waiter is not None:
                        waiter.send_nowait(message)
                else:
                    await self._events_send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            self.closed_event.set()
            for waiter in self._pending.values():
                waiter.close()
            self._events_send.close()


@asynccontextmanager
async def open_rpc_client(
    path: Path | str,
    *,
    event_buffer: int = 10000,
    request_handler: RequestHandler | None = None,
) -> AsyncIterator[RpcClient]:
    """Connect to `path` and yield an RpcClient with its receiver running."""
    messages = await open_unix_stream(path)
    client = RpcClient(messages, event_buffer, request_handler)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run_receiver)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await messages.aclose()
    except BaseExceptionGroup as group:
        # The receiver task ends quietly, so a group here holds the caller's
        # own exception: hand it back unwrapped (RemoteError, TooSlowError, ...).
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
