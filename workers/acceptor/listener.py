"""The acceptor's TCP listener: one port for the HTTP API and WebSockets.

For each connection the listener reads the HTTP request head. A request for
`/socket/websocket` goes to DeeperHub's own WebSocket path; any other request
is handed, together with the bytes already read, to hypercorn's trio
`TCPServer`, which serves the quart-trio app for the rest of the connection.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext as HypercornContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from deeperhub.errors import ProtocolError
from deeperhub.http_head import find_head_end, parse_request_head

from .websocket import handle_websocket

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .services import Services

__all__ = ["HEAD_TIMEOUT", "Listener", "WEBSOCKET_PATH", "open_listen_socket"]

log = logging.getLogger("deeperhub.acceptor")

WEBSOCKET_PATH = "/socket/websocket"
# Seconds a client gets to send a complete request head (slow-loris guard).
HEAD_TIMEOUT = 10.0


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream that first returns bytes the listener already read."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def open_listen_socket(
    host: str, port: int, *, reuse_port: bool, backlog: int = 1024
) -> trio.socket.SocketType:
    """Bind and listen on `host:port` (IPv4, or IPv6 when `host` contains a colon)."""
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
    await sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _hypercorn_config(services: Services) -> HypercornConfig:
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = logging.getLogger("deeperhub.acceptor.hypercorn")
    config.keep_alive_timeout = 15
    config.graceful_timeout = 5
    config.h11_max_incomplete_size = int(services.settings["server.max_header_bytes"])
    return config


class Listener:
    """Accepts TCP connections and routes each to hypercorn or the WebSocket path."""

    def __init__(self, services: Services, app: QuartTrio) -> None:
        self.services = services
        self.config = _hypercorn_config(services)
        self.app = wrap_app(app, self.config.wsgi_max_body_size, "asgi")
        self.context = HypercornContext(None)
        self.lifespan_state: dict[str, Any] = {}
        self.max_head = int(services.settings["server.max_header_bytes"])

    async def serve(
        self,
        sock: trio.socket.SocketType,
        stopping: trio.Event,
        drain_timeout: float,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `stopping` is set, then drain in-flight work and return."""
        lifespan = Lifespan(self.app, self.config, self.lifespan_state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()

            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(self._accept_loop, listener, connections)
                    task_status.started()
                    await stopping.wait()
                    accepting.cancel_scope.cancel()
                await listener.aclose()
                log.info("acceptor stopped accepting; draining connections")
                await self.context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + drain_timeout

            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _accept_loop(
        self, listener: trio.SocketListener, connections: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.error("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            connections.start_soon(self._handle, stream, connections)

    async def _handle(
        self, stream: trio.SocketStream, connections: trio.Nursery
    ) -> None:
        try:
            peer = stream.socket.getpeername()
            client = (str(peer[0]), int(peer[1]))
        except OSError:
            await stream.aclose()
            return
        handed_over = False
        try:
            buffer = await self._read_head(stream)
            if buffer is None:
                return
            end = find_head_end(buffer)
            try:
                head = parse_request_head(bytes(buffer[:end]), client)
            except ProtocolError as exc:
                log.info("bad request head from %s: %s", client[0], exc)
                await _send_simple(stream, 400, "Bad Request")
                return
            if head.path == WEBSOCKET_PATH:
                # A task of its own, so that this task ends and frees the
                # request buffer; handle_websocket closes the stream.
                rest = bytes(buffer[end:])
                connections.start_soon(
                    handle_websocket, self.services, stream, head, rest
                )
                handed_over = True
                return
            server = TCPServer(
                self.app,
                self.config,
                self.context,
                ConnectionState(self.lifespan_state.copy()),
                PrefixedStream(stream, bytes(buffer)),  # type: ignore[arg-type]
            )
            await server.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if not handed_over:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _read_head(self, stream: trio.SocketStream) -> bytearray | None:
        """Read until the end of the request head; None if the client gave up."""
        buffer = bytearray()
        with trio.move_on_after(HEAD_TIMEOUT):
            while find_head_end(buffer) < 0:
                if len(buffer) > self.max_head:
                    await _send_simple(stream, 431, "Request Header Fields Too Large")
                    return None
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                buffer += chunk
            return buffer
        await _send_simple(stream, 408, "Request Timeout")
        return None


async def _send_simple(stream: trio.SocketStream, status: int, reason: str) -> None:
    body = (
        f'{{"error": {{"code": "http_{status}", "message": "{reason.lower()}"}}}}'
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
