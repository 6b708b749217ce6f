"""HTTP/1.1 connections that the listener hands to hypercorn.

hypercorn's trio `TCPServer` runs HTTP/1.1 and the quart-trio app for the rest
of a connection. This module adds what DeeperHub needs around it:

- `PrefixedStream` replays the bytes the listener already read, and closes the
  socket with a bounded lingering close.
- `HttpConnection` runs hypercorn's close and keep-alive steps shielded from
  cancellation (see its docstring).
- `RequestGuard` wraps the ASGI app. It rejects a request with an ambiguous
  body length with 400 and adds `Connection: close` to a response sent before
  the request body was read, so that the connection closes after that response.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, cast

import h11
import trio
from hypercorn.events import Closed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

from deeperhub.errors import ProtocolError
from deeperhub.http_head import check_body_framing

if TYPE_CHECKING:
    from hypercorn.events import Event
    from hypercorn.typing import (
        ASGIFramework,
        ASGIReceiveCallable,
        ASGIReceiveEvent,
        ASGISendCallable,
        ASGISendEvent,
        Scope,
    )

__all__ = [
    "LINGER_TIMEOUT",
    "WEBSOCKET_PATH",
    "HttpConnection",
    "PrefixedStream",
    "RequestGuard",
    "aclose_lingering",
]

log = logging.getLogger("deeperhub.acceptor.http")

# The path of DeeperHub's WebSocket endpoint.
WEBSOCKET_PATH = "/socket/websocket"

# Seconds a closing connection keeps reading and discarding what the client
# still sends after the server's FIN. Closing a socket while received bytes are
# unread makes the kernel send RST, and an RST can destroy a response that the
# client has not read yet (a 413 sent before a large body arrived, say).
LINGER_TIMEOUT = 1.0
_RECEIVE_SIZE = 65536
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream that first returns bytes the listener already read."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket
        self._receiving = False
        self._lingering = False
        self._eof = trio.Event()
        self._closing = False
        self._closed = trio.Event()
        # hypercorn sends FIN without its send lock, and trio raises
        # BusyResourceError for a FIN while a send_all is in progress.
        self._send_lock = trio.Lock()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        if self._lingering:
            # aclose reads the socket now, and a second reader would raise
            # trio.BusyResourceError.
            return b""
        self._receiving = True
        try:
            data = await self._stream.receive_some(max_bytes)
        except _STREAM_ERRORS:
            self._eof.set()
            raise
        finally:
            self._receiving = False
        if not data:
            self._eof.set()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._send_lock:
            await self._stream.send_eof()

    async def aclose(self) -> None:
        """Send FIN, discard input until the client's EOF or `LINGER_TIMEOUT`, close.

        hypercorn may close from two tasks at once. The second call waits for
        the first. The socket is closed also when the caller is cancelled.
        """
        if self._closing:
            try:
                await self._closed.wait()
            finally:
                await self._stream.aclose()
            return
        self._closing = True
        try:
            with trio.move_on_after(LINGER_TIMEOUT):
                await self._linger()
        finally:
            self._closed.set()
            await self._stream.aclose()

    async def _linger(self) -> None:
        try:
            await self.send_eof()
        except (*_STREAM_ERRORS, trio.BusyResourceError):
            return
        if self._receiving:
            # hypercorn's reader task waits in receive_some and receives the EOF.
            await self._eof.wait()
            return
        self._lingering = True
        await _discard_until_eof(self._stream)


async def aclose_lingering(stream: trio.SocketStream) -> None:
    """Send FIN, discard input until the client's EOF or `LINGER_TIMEOUT`, close.

    No other task may read `stream` meanwhile. The socket is closed also when
    the caller is cancelled.
    """
    try:
        with trio.move_on_after(LINGER_TIMEOUT):
            await stream.send_eof()
            await _discard_until_eof(stream)
    except (*_STREAM_ERRORS, trio.BusyResourceError):
        pass
    finally:
        await stream.aclose()


async def _discard_until_eof(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(_RECEIVE_SIZE):
            pass
    except (*_STREAM_ERRORS, trio.BusyResourceError):
        pass


class HttpConnection(TCPServer):
    """hypercorn's `TCPServer`, with connection events that cancellation cannot skip.

    hypercorn calls `protocol_send` inside the app's ASGI `send` when a
    response ends: to close the connection (HTTP/1.0, `Connection: close`, an
    unread request body) or to start the keep-alive timer. quart-trio 0.12
    cancels the request's tasks right after the last body chunk, so in
    hypercorn 0.18 that cancellation interrupted these steps. The socket then
    stayed open and the keep-alive timer never ran. Each step is short, except
    the lingering close, which `LINGER_TIMEOUT` bounds.
    """

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Closed) and self._response_in_progress():
            # h11 rejects bytes that follow a request on a connection that
            # must close, such as a request pipelined behind a response with
            # `Connection: close`. Closing now would cut the response short, so
            # the connection closes when hypercorn finishes the response.
            return
        with trio.CancelScope(shield=True):
            await super().protocol_send(event)

    def _response_in_progress(self) -> bool:
        protocol = getattr(self.protocol, "protocol", None)
        if not isinstance(protocol, H11Protocol) or protocol.stream is None:
            return False
        connection = protocol.connection
        return (
            isinstance(connection, h11.Connection)
            and connection.our_state is h11.SEND_BODY
        )


class RequestGuard:
    """ASGI middleware for the HTTP/1.1 requests that hypercorn parses.

    The listener checks the first request head of a connection itself. The
    following requests on a keep-alive connection reach the app only through
    hypercorn, so this middleware repeats the body-framing check for them. It
    also bounds the time a request body may take to arrive, and rejects a
    WebSocket upgrade that is not the first request of its connection.

    NOTE: the raw head is not visible here, so a later request with bare LF
    line endings is served, because h11 0.16 accepts them.
    """

    def __init__(self, app: ASGIFramework, *, body_timeout: float) -> None:
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH:
            await _reject_late_upgrade(scope, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope["headers"]
        ]
        try:
            check_body_framing(headers)
        except ProtocolError as exc:
            await _send_error(send, 400, "bad_request", str(exc))
            return

        body_pending = _has_body(headers)
        body_deadline = trio.current_time() + self.body_timeout
        timed_out = False
        response_started = False

        async def receive_tracked() -> ASGIReceiveEvent:
            nonlocal body_pending, timed_out
            if not body_pending:
                return await receive()
            with trio.move_on_at(body_deadline):
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body"):
                    body_pending = False
                return message
            # A response already on its way ends the request by itself, and
            # quart-trio then cancels this call. Otherwise the app is
            # cancelled here and the 408 is sent after it.
            if not response_started:
                timed_out = True
                app_scope.cancel()
            await trio.sleep_forever()

        async def send_closing(message: ASGISendEvent) -> None:
            nonlocal response_started
            # The server will not read the rest of the body, so the client
            # must not send another request on this connection.
            if message["type"] == "http.response.start":
                response_started = True
                if body_pending:
                    headers = [*message.get("headers", ()), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            await send(message)

        with trio.CancelScope() as app_scope:
            await self.app(scope, receive_tracked, send_closing)
        if timed_out and not response_started:
            log.info(
                "request body from %s not complete within %g s",
                _client_ip(scope),
                self.body_timeout,
            )
            await _send_error(
                send,
                408,
                "request_timeout",
                f"request body not received within {self.body_timeout:g} s",
            )


def _has_body(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name == "transfer-encoding":
            return True
        if name == "content-length" and value.strip() != "0":
            return True
    return False


async def _reject_late_upgrade(scope: Scope, send: ASGISendCallable) -> None:
    """Reject an upgrade to the WebSocket path that follows another request.

    The listener hands the first request for this path to the WebSocket path
    itself, so hypercorn passes only later ones to the app, as a `websocket`
    scope. Quart would respond with 404, which the 404-scan detector counts.
    """
    log.info(
        "rejected a WebSocket upgrade that was not the first request "
        "on its connection from %s",
        _client_ip(scope),
    )
    await _send_error(
        send,
        400,
        "upgrade_not_first",
        "a WebSocket upgrade must be the first request on its connection",
        prefix="websocket.http",
    )


def _client_ip(scope: Scope) -> str:
    client = cast("tuple[str, int] | None", scope.get("client"))
    return client[0] if client else "unknown"


async def _send_error(
    send: ASGISendCallable,
    status: int,
    code: str,
    message: str,
    *,
    prefix: str = "http",
) -> None:
    """Send a JSON error response with `Connection: close`.

    `prefix` is `websocket.http` for the ASGI WebSocket denial response.
    """
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    start = {"type": f"{prefix}.response.start", "status": status, "headers": headers}
    await send(cast("ASGISendEvent", start))
    end = {"type": f"{prefix}.response.body", "body": body, "more_body": False}
    await send(cast("ASGISendEvent", end))
