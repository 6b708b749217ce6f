"""The Phoenix Channels loop of one upgraded WebSocket connection.

Each connection runs one task: a reader that parses frames and handles the
Phoenix messages of each read in order. Writes go straight to the socket
(`connection.py`), and a drain task exists only while the kernel's send
buffer is full. After handling one read, the reader writes this connection's
replies and pongs. Frames that the read queued to other connections, such as
presence diffs, are written by the hub's flusher.

A push (`new_msg`) is handed to the `PushPipeline` and the reader goes on
with the next message; the reply is sent when the DB writer has committed
the message. At most `websocket.max_pending_pushes` pushes of one connection
wait for their commit; beyond that the reader stops reading the socket until
one is answered, so a client that pushes faster than the database commits is
slowed down by TCP flow control instead of growing the server's memory.

When the server closes the connection for any reason (a flood, an expired or
revoked token, a slow consumer, a stop), the messages read after that
decision are not handled, so none of them is stored. The pushes already
handed to the DB writer still get their replies before the Close frame, for
up to `REPLY_WAIT_TIMEOUT` seconds (see `Connection.close`). A client whose
connection ends without its replies, because TCP broke, the wait timed out
or the acceptor process died, finds its stored messages with
`GET /api/channels/{id}/messages`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import ProtocolError
from deeperhub.ipc import RemoteError
from deeperhub.metrics import MESSAGES_RECEIVED, WS_PROTOCOL_ERRORS
from deeperhub.phoenix.protocol import (
    EVENT_CLOSE,
    EVENT_HEARTBEAT,
    EVENT_JOIN,
    EVENT_LEAVE,
    HEARTBEAT_TOPIC,
    decode_message,
    encode_push,
    encode_reply,
)
from deeperhub.validation import ValidationError, validate_body
from deeperhub.ws.frames import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    FrameParser,
    Ping,
    ProtocolViolation,
    TextMessage,
    encode_pong,
    encode_text,
)

from .connection import REPLY_WAIT_TIMEOUT
from .hub import CLOSE_TIMEOUT
from .joins import join
from .token_watch import ACCESS_TOKEN_EVENT, renew_access_token

if TYPE_CHECKING:
    from deeperhub.phoenix.protocol import PhoenixMessage, Ref
    from deeperhub.ws.frames import Event

    from .hub import Connection, Subscription
    from .pushes import PushResult
    from .services import Services

__all__ = ["DB_CALL_TIMEOUT", "RECEIVE_BYTES", "Session"]

log = logging.getLogger("deeperhub.acceptor.ws")

# Seconds to wait for the DB writer to store a pushed message. phoenix.js
# reports a push as timed out after 10 seconds by default, so a later reply
# would be ignored.
DB_CALL_TIMEOUT = 10.0
RECEIVE_BYTES = 65536


class Session:
    """The Phoenix Channels state of one upgraded connection."""

    __slots__ = (
        "_closing",
        "_push_room",
        "_receive_scope",
        "_scope",
        "connection",
        "heartbeat_timeout",
        "hub",
        "max_joins",
        "max_pending_pushes",
        "replay_limit",
        "services",
        "settings",
    )

    def __init__(self, services: Services, connection: Connection) -> None:
        self.services = services
        self.settings = services.settings
        self.hub = services.hub
        self.connection = connection
        settings = self.settings
        self.heartbeat_timeout = float(settings["websocket.heartbeat_timeout"])
        self.max_joins = int(settings["websocket.max_joins"])
        self.replay_limit = int(settings["websocket.replay_limit"])
        self.max_pending_pushes = int(settings["websocket.max_pending_pushes"])
        self._push_room: trio.Event | None = None
        # Cancel scopes of the whole session and of the current receive.
        self._scope: trio.CancelScope | None = None
        self._receive_scope: trio.CancelScope | None = None
        self._closing = False

    async def run(self, stream: trio.SocketStream, buffered: bytes) -> None:
        """Serve the connection until the close handshake ends or times out.

        With the hub's flusher running, writes go straight to the socket and
        no writer task exists. Without it (unit tests), a writer task runs
        beside the reader.
        """
        connection = self.connection
        if self.hub.runs_drains:
            connection.attach(stream.socket)
            # Frames queued before the socket was attached, such as the
            # Close frame of a connection closed during its upgrade.
            connection.flush()
            try:
                await self._serve(stream, buffered)
            finally:
                connection.detach()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run_writer, stream)
            await self._serve(stream, buffered)
            nursery.cancel_scope.cancel()

    async def _serve(self, stream: trio.SocketStream, buffered: bytes) -> None:
        connection = self.connection
        connection.on_change = self._interrupt
        try:
            with trio.CancelScope() as self._scope:
                if not connection.is_open:
                    self._interrupt()
                await self._read_loop(stream, buffered)
        finally:
            connection.on_change = None
            self._scope = None
            # A session cut short by its deadline still sends its Close frame
            # if a write can take it now.
            connection.finish_close()
            connection.flush()

    def _interrupt(self) -> None:
        """Wake the reader after a change of the close state."""
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        connection = self.connection
        if connection.is_open or self._scope is None or self._closing:
            return
        if connection.is_awaiting_replies:
            # The wait for push replies and the close handshake after it are
            # bounded, whatever the reader is doing.
            timeout = REPLY_WAIT_TIMEOUT + CLOSE_TIMEOUT
            self._scope.deadline = trio.current_time() + timeout
            return
        self._closing = True
        # The close handshake gets CLOSE_TIMEOUT seconds, whatever the reader
        # is doing.
        self._scope.deadline = trio.current_time() + CLOSE_TIMEOUT

    # Frames

    async def _read_loop(self, stream: trio.SocketStream, buffered: bytes) -> None:
        connection = self.connection
        parser = FrameParser(
            max_message_size=int(self.settings["websocket.max_frame_size"]),
            max_fragments=int(self.settings["websocket.max_fragments"]),
        )
        data: bytes | None = buffered
        reading = True
        try:
            while True:
                if data:
                    for event in parser.feed(data):
                        if not await self._handle_event(event):
                            reading = False
                            break
                    # Only this connection's own frames (replies, pongs) go
                    # out now. What the read broadcast to others, such as a
                    # presence diff, is written by the hub's flusher once per
                    # scheduler tick, together with what other readers queued.
                    self.connection.flush()
                data = b""
                if not connection.is_open:
                    # Leave every topic now, not after the close handshake,
                    # so the presence leaves go out at once, because a client
                    # that vanished (half-open TCP) never completes it.
                    self._leave_all()
                    await self._wait_for_push_replies()
                    if not reading or connection.is_peer_closed:
                        # Nothing more to read: wait until the Close is out.
                        await connection.close_sent.wait()
                        return
                    if connection.is_close_sent and not connection.wait_for_peer_close:
                        return
                data = await self._receive(stream)
                if data is None:
                    continue
                if not data:
                    # The client closed TCP. Without its Close frame first, the
                    # closure is abnormal (1006).
                    if connection.is_open:
                        connection.abort()
                    connection.set_peer_closed()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            connection.abort()

    async def _receive(self, stream: trio.SocketStream) -> bytes | None:
        """Return the next bytes, or None when interrupted or timed out."""
        was_open = self.connection.is_open
        deadline = math.inf
        if was_open:
            deadline = trio.current_time() + self.heartbeat_timeout
        with trio.move_on_at(deadline) as scope:
            self._receive_scope = scope
            # A closed connection is read only for the client's Close frame.
            while (
                self.connection.is_open
                and self.connection.pushes_in_flight >= self.max_pending_pushes
            ):
                self._push_room = self._push_room or trio.Event()
                await self._push_room.wait()
            data = await stream.receive_some(RECEIVE_BYTES)
        self._receive_scope = None
        if not scope.cancelled_caught:
            return data
        if was_open and trio.current_time() >= deadline:
            self._heartbeat_timed_out()
        return None

    async def _wait_for_push_replies(self) -> None:
        """Queue the held-back Close frame once every push in flight has its reply.

        Waits at most REPLY_WAIT_TIMEOUT seconds. The replies that come later
        are dropped, and their messages may be stored.
        """
        connection = self.connection
        if not connection.is_awaiting_replies:
            return
        with trio.move_on_after(REPLY_WAIT_TIMEOUT):
            await connection.close_requested.wait()
        if connection.is_awaiting_replies:
            log.warning(
                "closing without the replies to %d pushes: no commit within %g s",
                connection.pushes_in_flight,
                REPLY_WAIT_TIMEOUT,
                extra=connection.extra,
            )
            connection.finish_close()
        connection.flush()

    def _leave_all(self) -> None:
        if self.connection.subscriptions:
            for topic in list(self.connection.subscriptions):
                self.unsubscribe(topic)

    def _heartbeat_timed_out(self) -> None:
        # A half-open TCP connection (a client that vanished without a FIN)
        # ends here; leaving its topics broadcasts its presence leaves.
        connection = self.connection
        if connection.is_open:
            log.info(
                "closing connection: no frame for %g s",
                self.heartbeat_timeout,
                extra=connection.extra,
            )
            connection.close(CloseCode.GOING_AWAY, "heartbeat timeout")
            connection.flush()

    async def _handle_event(self, event: Event) -> bool:
        """Handle one parsed frame. Returns False when no more frames may be read."""
        connection = self.connection
        if isinstance(event, TextMessage):
            if connection.is_open:
                await self._handle_text_safely(event.text)
        elif isinstance(event, Ping):
            connection.send(encode_pong(event.payload))
        elif isinstance(event, CloseReceived):
            # Echo the client's code, as RFC 6455 section 5.5.1 suggests. This
            # does nothing if the server sent its own Close first.
            connection.close(event.code, "")
            connection.set_peer_closed()
            return False
        elif isinstance(event, ProtocolViolation):
            self.close_for_violation(event.code, event.reason)
            # The frame stream cannot be parsed any further, so TCP is closed
            # right after the Close frame.
            connection.wait_for_peer_close = False
            return False
        elif isinstance(event, BinaryMessage):
            if connection.is_open:
                self.close_for_violation(
                    CloseCode.UNSUPPORTED_DATA, "binary messages are not supported"
                )
        return True

    def close_for_violation(self, code: int, reason: str) -> None:
        """Close with `code`, counting and logging the violation once."""
        connection = self.connection
        if not connection.is_open:
            return
        WS_PROTOCOL_ERRORS.labels(code=str(code)).inc()
        log.info(
            "closing connection with %d after a protocol violation: %s",
            code,
            reason,
            extra=connection.extra,
        )
        connection.close(code, reason)

    # Phoenix messages

    async def _handle_text_safely(self, text: str) -> None:
        """Handle one message. A bug closes only this connection, with 1011."""
        try:
            await self._handle_text(text)
        except Exception:
            log.exception(
                "closing connection after an internal error",
                extra=self.connection.extra,
            )
            self.connection.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _handle_text(self, text: str) -> None:
        try:
            message = decode_message(self.connection.vsn, text)
        except ProtocolError as exc:
            self.close_for_violation(CloseCode.POLICY_VIOLATION, str(exc))
            return

        # Only heartbeats are exempt from the rate limit, so a client that hit
        # it still keeps its connection alive. A heartbeat costs no more than a
        # pong. Every other message, also on the `phoenix` topic, counts.
        is_heartbeat = (
            message.topic == HEARTBEAT_TOPIC and message.event == EVENT_HEARTBEAT
        )
        security = self.services.security
        if security is not None and not is_heartbeat:
            verdict = security.check_message(self.connection, message)
            if verdict is not None:
                reply = {"reason": verdict.reason}
                self.reply(message, message.join_ref, "error", reply)
                if verdict.close:
                    self.connection.close(CloseCode.POLICY_VIOLATION, verdict.reason)
                return

        if is_heartbeat:
            self.reply(message, None, "ok", {})
        elif message.topic == HEARTBEAT_TOPIC:
            if message.event == ACCESS_TOKEN_EVENT:
                status, response = await renew_access_token(
                    self.services, self.connection, message.payload
                )
                self.reply(message, None, status, response)
            else:
                self.reply(
                    message, message.join_ref, "error", {"reason": "unmatched topic"}
                )
        elif message.event == EVENT_JOIN:
            await join(self, message)
        elif message.event == EVENT_LEAVE:
            self._leave(message)
        else:
            await self._push(message)

    def reply(
        self,
        message: PhoenixMessage,
        join_ref: Ref,
        status: str,
        response: dict[str, Any],
    ) -> None:
        """Queue the `phx_reply` to `message`."""
        frame = encode_reply(
            self.connection.vsn, join_ref, message.ref, message.topic, status, response
        )
        self.connection.send(encode_text(frame))

    def push_frame(
        self, join_ref: Ref, topic: str, event: str, payload: dict[str, Any]
    ) -> bytes:
        """Return the frame of a server push to this connection."""
        return encode_text(
            encode_push(self.connection.vsn, join_ref, topic, event, payload)
        )

    async def send_paced(self, frame: bytes) -> bool:
        """Queue a bulk frame, closing the connection if the client stops reading."""
        self.connection.flush()
        with trio.move_on_after(self.heartbeat_timeout):
            return await self.connection.send_paced(frame)
        self.connection.close_slow_consumer(self.connection.buffered_bytes + len(frame))
        return False

    def _joined(self, message: PhoenixMessage) -> Subscription | None:
        """Return the join of `message`, or reply "unmatched topic" and return None.

        A message that names an earlier join of the topic also gets that reply,
        as on a Phoenix server.
        """
        subscription = self.connection.subscriptions.get(message.topic)
        if subscription is None or (
            message.join_ref is not None and message.join_ref != subscription.join_ref
        ):
            self.reply(
                message, message.join_ref, "error", {"reason": "unmatched topic"}
            )
            return None
        return subscription

    def unsubscribe(self, topic: str) -> None:
        """Leave `topic`, which broadcasts this connection's presence leave."""
        self.hub.unsubscribe(self.connection, topic)

    def _leave(self, message: PhoenixMessage) -> None:
        subscription = self._joined(message)
        if subscription is None:
            return
        self.unsubscribe(message.topic)
        self.reply(message, subscription.join_ref, "ok", {})
        self.connection.send(
            self.push_frame(subscription.join_ref, message.topic, EVENT_CLOSE, {})
        )

    # Pushes

    async def _push(self, message: PhoenixMessage) -> None:
        subscription = self._joined(message)
        if subscription is None:
            return
        join_ref = subscription.join_ref
        if message.event != "new_msg":
            self.reply(message, join_ref, "error", {"reason": "unknown_event"})
            return
        try:
            body = validate_body(message.payload.get("body"), self.settings)
        except ValidationError as exc:
            self.reply(
                message,
                join_ref,
                "error",
                {"reason": "invalid_body", "message": exc.message},
            )
            return

        args = {
            "channel_id": subscription.channel_id,
            "user_id": self.connection.user_id,
            "body": body,
        }
        connection = self.connection
        pipeline = self.services.pushes
        # Counted until the reply is queued, so a close meanwhile waits for it.
        connection.pushes_in_flight += 1
        if pipeline is None:
            try:
                result = await self._call_insert(args)
            except BaseException:
                self._push_answered()
                raise
            self._pushed(message, join_ref, result)
            self._push_answered()
            return

        def answered(result: PushResult) -> None:
            self._pushed(message, join_ref, result)
            self._push_answered()

        pipeline.submit("insert_message", args, answered)

    def _push_answered(self) -> None:
        """Count one push reply as queued; the last one releases a held close."""
        connection = self.connection
        connection.pushes_in_flight -= 1
        if self._push_room is not None:
            self._push_room.set()
            self._push_room = None
        if connection.pushes_in_flight == 0:
            connection.finish_close()

    async def _call_insert(self, args: dict[str, Any]) -> PushResult:
        """Store a message with one request and wait for it (no pipeline)."""
        try:
            result = await self.services.db.call(
                "insert_message", timeout=DB_CALL_TIMEOUT, **args
            )
        except RemoteError as exc:
            return exc.code, exc.message
        except trio.TooSlowError:
            return "timeout", f"no reply within {DB_CALL_TIMEOUT:g} s"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return "unavailable", str(exc)
        return None, result

    def _pushed(
        self, message: PhoenixMessage, join_ref: Ref, result: PushResult
    ) -> None:
        """Reply to a push once its message is committed, or failed."""
        error, value = result
        connection = self.connection
        if error is not None:
            log.info(
                "insert_message failed: %s: %s", error, value, extra=connection.extra
            )
            self._reply_to_push(message, join_ref, "error", {"reason": error})
            return
        MESSAGES_RECEIVED.inc()
        self._reply_to_push(message, join_ref, "ok", {"id": value["message"]["id"]})

    def _reply_to_push(
        self,
        message: PhoenixMessage,
        join_ref: Ref,
        status: str,
        response: dict[str, Any],
    ) -> None:
        frame = encode_reply(
            self.connection.vsn, join_ref, message.ref, message.topic, status, response
        )
        self.connection.send_reply(encode_text(frame))
