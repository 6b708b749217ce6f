"""The acceptor's TCP listener: one port for the HTTP API and WebSockets.

For each connection the listener reads the HTTP request head. A request for
`/socket/websocket` goes to DeeperHub's own WebSocket path; any other request
is handed, together with the bytes already read, to hypercorn's trio
`TCPServer` (`http_connection.py`), which serves the quart-trio app for the
rest of the connection.

An error the listener sends itself (400, 408, 431) is a JSON error with
`Connection: close`, and the connection is closed after it.
"""

from __future__ import annotations

import json
import logging
import socket as stdlib_socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext as HypercornContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from deeperhub.errors import ProtocolError
from deeperhub.http_head import find_head_end, parse_request_head
from deeperhub.ws.handshake import error_response

from .http_connection import (
    WEBSOCKET_PATH,
    HttpConnection,
    PrefixedStream,
    RequestGuard,
    aclose_lingering,
)
from .websocket import handle_websocket

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .services import Services

__all__ = ["HEAD_TIMEOUT", "Listener", "WEBSOCKET_PATH", "open_listen_socket"]

log = logging.getLogger("deeperhub.acceptor")

# Seconds a client gets to send a complete request head (slow-loris guard).
HEAD_TIMEOUT = 10.0
# Seconds the listener waits to send one of its own error responses.
SEND_TIMEOUT = 5.0
_RECEIVE_SIZE = 65536


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
    config.keep_alive_timeout = float(services.settings["server.keep_alive_timeout"])
    # hypercorn applies it to every read of the connection after the head.
    config.read_timeout = float(services.settings["server.read_timeout"])
    config.graceful_timeout = 5
    config.h11_max_incomplete_size = int(services.settings["server.max_header_bytes"])
    return config


class Listener:
    """Accepts TCP connections and routes each to hypercorn or the WebSocket path."""

    def __init__(self, services: Services, app: QuartTrio) -> None:
        self.services = services
        self.config = _hypercorn_config(services)
        guard = RequestGuard(
            app, body_timeout=float(services.settings["server.body_timeout"])
        )
        self.app = wrap_app(guard, self.config.wsgi_max_body_size, "asgi")
        self.context = HypercornContext(None)
        self.lifespan_state: dict[str, Any] = {}
        self.max_head = int(services.settings["server.max_header_bytes"])
        # Cancel scopes of connections that have not sent a byte yet, which
        # the listener closes at once when it stops.
        self._idle_reads: set[trio.CancelScope] = set()

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
                for waiting in self._idle_reads:
                    waiting.cancel()
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
        responded = False
        try:
            buffer, error = await self._read_head(stream)
            if error is not None:
                log.info(
                    "rejected request from %s with %d: %s",
                    client[0],
                    error.status,
                    error.message,
                )
                responded = await _send_error(stream, error)
                return
            if buffer is None:
                return
            end = find_head_end(buffer)
            try:
                head = parse_request_head(bytes(buffer[:end]), client)
            except ProtocolError as exc:
                log.info("bad request head from %s: %s", client[0], exc)
                responded = await _send_error(stream, _bad_request(str(exc)))
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
            server = HttpConnection(
                self.app,
                self.config,
                self.context,
                ConnectionState(self.lifespan_state.copy()),
                PrefixedStream(stream, bytes(buffer)),  # type: ignore[arg-type]
            )
            await server.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # A bug ends only this connection, never the listener's other tasks.
            log.exception("HTTP connection failed", extra={"ip": client[0]})
        finally:
            if not handed_over:
                with trio.CancelScope(shield=True):
                    if responded:
                        await aclose_lingering(stream)
                    else:
                        await stream.aclose()

    async def _read_head(
        self, stream: trio.SocketStream
    ) -> tuple[bytearray | None, _ListenerError | None]:
        """Read until the end of the request head.

        Returns the bytes read, or an error to send, or (None, None) when the
        client closed the connection or the server stops before the first byte.
        """
        buffer = bytearray()
        with trio.move_on_after(HEAD_TIMEOUT):
            if not await self._receive_first(stream, buffer):
                return None, None
            while find_head_end(buffer) < 0:
                if len(buffer) > self.max_head:
                    return None, _too_large(self.max_head)
                chunk = await stream.receive_some(_RECEIVE_SIZE)
                if not chunk:
                    return None, None
                buffer += chunk
            if find_head_end(buffer) > self.max_head:
                return None, _too_large(self.max_head)
            return buffer, None
        return None, _ListenerError(
            408,
            "request_timeout",
            f"request head not complete within {HEAD_TIMEOUT:g} seconds",
        )

    async def _receive_first(
        self, stream: trio.SocketStream, buffer: bytearray
    ) -> bool:
        """Receive the first bytes of a request into `buffer`.

        Returns False when the client closes first or the server stops first,
        so that stopping never waits for a connection that sent nothing.
        """
        with trio.CancelScope() as waiting:
            self._idle_reads.add(waiting)
            if self.context.terminated.is_set():
                waiting.cancel()
            try:
                chunk = await stream.receive_some(_RECEIVE_SIZE)
            finally:
                self._idle_reads.discard(waiting)
            buffer += chunk
            return bool(chunk)
        return False


@dataclass(frozen=True)
class _ListenerError:
    """An HTTP error response that the listener sends before closing."""

    status: int
    code: str
    message: str


def _bad_request(message: str) -> _ListenerError:
    return _ListenerError(400, "bad_request", message)


def _too_large(max_head: int) -> _ListenerError:
    message = f"request head exceeds the maximum of {max_head} bytes"
    return _ListenerError(431, "headers_too_large", message)


async def _send_error(stream: trio.SocketStream, error: _ListenerError) -> bool:
    """Send `error` as a JSON error with `Connection: close`.

    Returns whether the whole response was sent.
    """
    body = json.dumps(
        {"error": {"code": error.code, "message": error.message}}
    ).encode()
    headers = (("Content-Type", "application/json"),)
    try:
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(error_response(error.status, headers, body))
            return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return False
