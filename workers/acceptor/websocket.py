"""WebSocket connections of the acceptor: the upgrade, then the Phoenix Channels loop.

The listener calls `handle_websocket` for `/socket/websocket`. These requests
are rejected with an HTTP error before the upgrade:

- 400 or 426: an invalid upgrade request or an unsupported `vsn`.
- 403 with an empty body: a missing, invalid, expired or revoked access token.
- 503: `server.max_connections` is reached, or the server is shutting down.

After the 101 response each connection runs two tasks: a reader that parses
frames and handles Phoenix messages one at a time, and the writer of its hub
`Connection`.

Close codes the server sends:

- 1001 (going away): no frame from the client for `websocket.heartbeat_timeout`
  seconds, or server shutdown (`Hub.close_all`).
- 1012 (service restart): server restart (`Hub.close_all`).
- 1008 (policy violation): slow consumer, or a malformed Phoenix message.
- 1003 (unsupported data): a binary message, since only the JSON serializers
  are supported.
- 1002, 1007, 1009: protocol violations found by the frame parser.
- The client's own code, echoed, when the client closes first.

The server never closes with 1000. phoenix.js 1.7 (checked in 1.7.23,
`Socket.onConnClose`) does not reconnect after a close with code 1000. 1.8
(checked in 1.8.16) reconnects after any close it did not start itself, but
older clients are still deployed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import apsw
import trio

from deeperhub.errors import AuthError, ProtocolError, StorageError
from deeperhub.ipc import RemoteError
from deeperhub.metrics import (
    MESSAGES_RECEIVED,
    WS_CONNECTIONS_ACTIVE,
    WS_CONNECTIONS_CLOSED,
    WS_CONNECTIONS_OPENED,
    WS_PROTOCOL_ERRORS,
)
from deeperhub.phoenix.protocol import (
    EVENT_CLOSE,
    EVENT_HEARTBEAT,
    EVENT_JOIN,
    EVENT_LEAVE,
    HEARTBEAT_TOPIC,
    PhoenixMessage,
    decode_message,
    encode_push,
    encode_reply,
    select_vsn,
)
from deeperhub.storage import reads
from deeperhub.validation import ValidationError, validate_body, validate_channel_name
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
from deeperhub.ws.handshake import (
    HandshakeError,
    accept_response,
    check_upgrade,
    error_response,
    extract_token,
)

from .hub import CLOSE_TIMEOUT, message_payload

if TYPE_CHECKING:
    from deeperhub.http_head import RequestHead
    from deeperhub.phoenix.protocol import Ref
    from deeperhub.ws.frames import Event

    from .hub import Connection, Subscription
    from .services import Services

__all__ = ["CHANNEL_TOPIC_PREFIX", "DB_CALL_TIMEOUT", "handle_websocket"]

log = logging.getLogger("deeperhub.acceptor.ws")

CHANNEL_TOPIC_PREFIX = "channel:"
# Seconds to wait for the DB writer to store a pushed message. phoenix.js
# reports a push as timed out after 10 seconds by default, so a later reply
# would be ignored.
DB_CALL_TIMEOUT = 10.0
RECEIVE_BYTES = 65536
REJECTION_LOG_INTERVAL = 10.0


class _LogThrottle:
    """Allows one log record per `interval` seconds and counts the ones skipped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next_at = -math.inf
        self._skipped = 0

    def allow(self) -> int | None:
        """Return how many records were skipped since the last one, or None to skip."""
        now = time.monotonic()
        if now < self._next_at:
            self._skipped += 1
            return None
        self._next_at = now + self.interval
        skipped, self._skipped = self._skipped, 0
        return skipped


# Rejected upgrades are logged at most once per interval, so that a client
# retrying in a loop cannot flood the log.
_rejection_log = _LogThrottle(REJECTION_LOG_INTERVAL)


def _log_rejection(status: int, reason: str, client_ip: str) -> None:
    skipped = _rejection_log.allow()
    if skipped is not None:
        log.info(
            "rejecting WebSocket upgrade with %d: %s (%d more rejections not logged)",
            status,
            reason,
            skipped,
            extra={"ip": client_ip},
        )


class _Rejected(Exception):
    """Rejection of an upgrade request with an HTTP error instead of 101."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def handle_websocket(
    services: Services, stream: trio.SocketStream, head: RequestHead, buffered: bytes
) -> None:
    """Serve one WebSocket request from the upgrade to the TCP close.

    `buffered` contains the bytes received after the request head. The stream is
    closed before this returns.
    """
    try:
        await _serve(services, stream, head, buffered)
    except Exception:
        # A bug ends only this connection, never the listener's other tasks.
        log.exception("WebSocket connection failed", extra={"ip": head.client[0]})
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _serve(
    services: Services, stream: trio.SocketStream, head: RequestHead, buffered: bytes
) -> None:
    hub = services.hub
    client_ip = head.client[0]
    try:
        key = check_upgrade(head)
        vsn = select_vsn(head.query)
    except HandshakeError as exc:
        await _send_http_error(stream, exc.status, exc.message, exc.headers)
        return
    except ProtocolError as exc:
        await _send_http_error(stream, 400, str(exc))
        return

    if not hub.reserve_slot():
        if hub.shutting_down.is_set():
            reason = "server is shutting down"
        else:
            reason = f"too many WebSocket connections (limit {hub.max_connections})"
        _log_rejection(503, reason, client_ip)
        await _send_http_error(stream, 503, reason)
        return
    try:
        await _upgrade_and_serve(services, stream, head, buffered, key, vsn)
    finally:
        hub.release_slot()


async def _upgrade_and_serve(
    services: Services,
    stream: trio.SocketStream,
    head: RequestHead,
    buffered: bytes,
    key: str,
    vsn: str,
) -> None:
    client_ip = head.client[0]
    token, subprotocol = extract_token(head)
    try:
        user_id, username = await _authenticate(services, token)
    except _Rejected as exc:
        _log_rejection(exc.status, exc.reason, client_ip)
        # A 403 has no body, so a client learns nothing about why its token failed.
        message = "" if exc.status == 403 else exc.reason
        await _send_http_error(stream, exc.status, message)
        return

    try:
        with trio.fail_after(CLOSE_TIMEOUT):
            await stream.send_all(accept_response(key, subprotocol))
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return

    connection = services.hub.open_connection(
        user_id=user_id, username=username, vsn=vsn
    )
    WS_CONNECTIONS_OPENED.inc()
    WS_CONNECTIONS_ACTIVE.inc()
    log.info(
        "WebSocket connection opened (vsn %s)",
        vsn,
        extra={**connection.extra, "ip": client_ip},
    )
    try:
        await _Session(services, connection).run(stream, buffered)
    finally:
        services.hub.remove_connection(connection)
        code = connection.close_code if connection.close_code is not None else 1006
        WS_CONNECTIONS_ACTIVE.dec()
        WS_CONNECTIONS_CLOSED.labels(code=str(code)).inc()
        log.info(
            "WebSocket connection closed with code %d", code, extra=connection.extra
        )


async def _authenticate(services: Services, token: str | None) -> tuple[int, str]:
    """Return the user id and username of a valid access token, or raise _Rejected."""
    if token is None:
        raise _Rejected(403, "missing access token")
    try:
        claims = services.tokens.verify(token, "access")
    except AuthError as exc:
        # Only the stable reason code is logged: a PyJWT message may quote
        # parts of the token.
        reason = getattr(exc, "reason", "invalid")
        raise _Rejected(403, f"access token rejected ({reason})") from None
    try:
        user_id = int(claims["sub"])
    except (KeyError, TypeError, ValueError):
        raise _Rejected(403, "invalid access token: `sub` is not a user id") from None

    try:
        if await services.reads.run(reads.is_token_revoked, claims["jti"]):
            raise _Rejected(403, f"access token of user {user_id} is revoked")
        user = await services.reads.run(reads.user_by_id, user_id)
    except (apsw.Error, StorageError, trio.ClosedResourceError) as exc:
        log.warning("cannot check the access token of user %d: %s", user_id, exc)
        raise _Rejected(503, "database unavailable, try again later") from None
    if user is None:
        raise _Rejected(403, f"user {user_id} of the access token does not exist")
    return user_id, str(user["username"])


async def _send_http_error(
    stream: trio.SocketStream,
    status: int,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Send an error response: empty when `message` is empty, else a JSON error."""
    body = b""
    if message:
        body = json.dumps(
            {"error": {"code": f"http_{status}", "message": message}}
        ).encode()
        headers = (*headers, ("Content-Type", "application/json"))
    try:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.send_all(error_response(status, headers, body))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class _JoinRejected(Exception):
    """Rejection of a `phx_join`, sent as an error reply with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Session:
    """The Phoenix Channels state of one upgraded connection."""

    def __init__(self, services: Services, connection: Connection) -> None:
        self.services = services
        self.settings = services.settings
        self.hub = services.hub
        self.connection = connection
        self.heartbeat_timeout = float(self.settings["websocket.heartbeat_timeout"])
        self.max_joins = int(self.settings["websocket.max_joins"])
        self.replay_limit = int(self.settings["websocket.replay_limit"])
        # Stored channel id of each joined topic.
        self.channel_ids: dict[str, int] = {}

    async def run(self, stream: trio.SocketStream, buffered: bytes) -> None:
        """Run the reader and the writer until the close handshake ends or times out."""
        connection = self.connection
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run_writer, stream)
            nursery.start_soon(self._read_loop, stream, buffered)
            await connection.close_requested.wait()
            with trio.move_on_after(CLOSE_TIMEOUT):
                await connection.close_sent.wait()
                if connection.wait_for_peer_close:
                    await connection.peer_closed.wait()
            nursery.cancel_scope.cancel()

    # Frames

    async def _read_loop(self, stream: trio.SocketStream, buffered: bytes) -> None:
        connection = self.connection
        parser = FrameParser(
            max_message_size=int(self.settings["websocket.max_frame_size"])
        )
        data = buffered
        try:
            while True:
                if data:
                    for event in parser.feed(data):
                        if not await self._handle_event(event):
                            return
                data = b""
                with trio.move_on_after(self.heartbeat_timeout) as timer:
                    data = await stream.receive_some(RECEIVE_BYTES)
                if timer.cancelled_caught:
                    if connection.is_open:
                        log.info(
                            "closing connection: no frame for %g s",
                            self.heartbeat_timeout,
                            extra=connection.extra,
                        )
                        connection.close(CloseCode.GOING_AWAY, "heartbeat timeout")
                    continue
                if not data:
                    # The client closed TCP. Without its Close frame first, the
                    # closure is abnormal (1006).
                    if connection.is_open:
                        connection.abort()
                    connection.peer_closed.set()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            connection.abort()

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
            connection.peer_closed.set()
            return False
        elif isinstance(event, ProtocolViolation):
            self._close_for_violation(event.code, event.reason)
            # The frame stream cannot be parsed any further, so TCP is closed
            # right after the Close frame.
            connection.wait_for_peer_close = False
            return False
        elif isinstance(event, BinaryMessage):
            if connection.is_open:
                self._close_for_violation(
                    CloseCode.UNSUPPORTED_DATA, "binary messages are not supported"
                )
        return True

    def _close_for_violation(self, code: int, reason: str) -> None:
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
            self._close_for_violation(CloseCode.POLICY_VIOLATION, str(exc))
            return

        if message.topic == HEARTBEAT_TOPIC:
            if message.event == EVENT_HEARTBEAT:
                self._reply(message, None, "ok", {})
            else:
                self._reply(
                    message, message.join_ref, "error", {"reason": "unmatched topic"}
                )
        elif message.event == EVENT_JOIN:
            await self._join(message)
        elif message.event == EVENT_LEAVE:
            self._leave(message)
        else:
            await self._push(message)

    def _reply(
        self,
        message: PhoenixMessage,
        join_ref: Ref,
        status: str,
        response: dict[str, Any],
    ) -> None:
        frame = encode_reply(
            self.connection.vsn, join_ref, message.ref, message.topic, status, response
        )
        self.connection.send(encode_text(frame))

    def _push_to_client(
        self, join_ref: Ref, topic: str, event: str, payload: dict[str, Any]
    ) -> bytes:
        return encode_text(
            encode_push(self.connection.vsn, join_ref, topic, event, payload)
        )

    def _joined(self, message: PhoenixMessage) -> Subscription | None:
        """Return the join of `message`, or reply "unmatched topic" and return None.

        A message that names an earlier join of the topic also gets that reply,
        as on a Phoenix server.
        """
        subscription = self.connection.subscriptions.get(message.topic)
        if subscription is None or (
            message.join_ref is not None and message.join_ref != subscription.join_ref
        ):
            self._reply(
                message, message.join_ref, "error", {"reason": "unmatched topic"}
            )
            return None
        return subscription

    async def _join(self, message: PhoenixMessage) -> None:
        connection = self.connection
        topic = message.topic
        # V1 clients may omit join_ref, and then the join's own ref identifies it.
        join_ref = message.join_ref if message.join_ref is not None else message.ref

        previous = connection.subscriptions.get(topic)
        if previous is not None:
            # A second join replaces the first, which the client sees closed.
            self._unsubscribe(topic)
            connection.send(
                self._push_to_client(previous.join_ref, topic, EVENT_CLOSE, {})
            )

        try:
            channel, last_seen_id = await self._check_join(message)
        except _JoinRejected as exc:
            self._reply(message, join_ref, "error", {"reason": exc.reason})
            return
        if not connection.is_open:
            return

        # NOTE: membership of a private channel is checked at join time only. A
        # member removed later keeps receiving the topic until it leaves.
        subscription = self.hub.subscribe(connection, topic, join_ref)
        self.channel_ids[topic] = int(channel["id"])
        if last_seen_id is None:
            self._reply(message, join_ref, "ok", {"channel_id": channel["id"]})
            self.hub.track_presence(subscription)
            self.hub.go_live(subscription)
            return
        await self._join_with_replay(message, subscription, channel, last_seen_id)

    async def _check_join(
        self, message: PhoenixMessage
    ) -> tuple[dict[str, Any], int | None]:
        """Return the channel and `last_seen_id` of a join, or raise _JoinRejected."""
        connection = self.connection
        topic = message.topic
        if not topic.startswith(CHANNEL_TOPIC_PREFIX):
            raise _JoinRejected("unmatched topic")
        if len(connection.subscriptions) >= self.max_joins:
            raise _JoinRejected("too_many_joins")
        name = topic[len(CHANNEL_TOPIC_PREFIX) :]
        try:
            validate_channel_name(name)
        except ValidationError:
            raise _JoinRejected("not_found") from None

        last_seen_id = message.payload.get("last_seen_id")
        if last_seen_id is not None:
            valid = isinstance(last_seen_id, int) and not isinstance(last_seen_id, bool)
            if not valid or last_seen_id < 0:
                raise _JoinRejected("invalid_last_seen_id")

        run = self.services.reads.run
        try:
            channel = await run(reads.channel_by_name, name)
            if channel is None:
                raise _JoinRejected("not_found")
            if channel["private"]:
                if not await run(reads.is_member, channel["id"], connection.user_id):
                    raise _JoinRejected("unauthorized")
        except (apsw.Error, StorageError, trio.ClosedResourceError) as exc:
            log.warning("join of %s failed: %s", topic, exc, extra=connection.extra)
            raise _JoinRejected("unavailable") from None
        return channel, last_seen_id

    async def _join_with_replay(
        self,
        message: PhoenixMessage,
        subscription: Subscription,
        channel: dict[str, Any],
        last_seen_id: int,
    ) -> None:
        """Finish a join that asked for the messages after `last_seen_id`.

        The subscription keeps live messages in `pending` while the stored ones
        are read and sent. It does so from before the read, so every message is
        in the read, in `pending`, or in both. `go_live` then drops the pending
        messages that the replay already sent.
        """
        connection = self.connection
        topic = subscription.topic
        join_ref = subscription.join_ref
        try:
            rows = await self.services.reads.run(
                reads.messages_after,
                int(channel["id"]),
                last_seen_id,
                self.replay_limit + 1,
            )
        except (apsw.Error, StorageError, trio.ClosedResourceError) as exc:
            log.warning("replay for %s failed: %s", topic, exc, extra=connection.extra)
            self._unsubscribe(topic)
            self._reply(message, join_ref, "error", {"reason": "unavailable"})
            return
        if (
            not connection.is_open
            or connection.subscriptions.get(topic) is not subscription
        ):
            return

        # NOTE: when more than `replay_limit` messages were missed, the oldest
        # ones are replayed, because the read pool only reads forwards. The
        # client fetches the rest with GET /api/channels/:id/messages?after_id=N,
        # N being `resume_after_id`.
        recovered = len(rows) <= self.replay_limit
        rows = rows[: self.replay_limit]
        after_id = max(last_seen_id, rows[-1]["id"]) if rows else last_seen_id
        response: dict[str, Any] = {"channel_id": channel["id"], "recovered": recovered}
        if not recovered:
            response["resume_after_id"] = after_id
        self._reply(message, join_ref, "ok", response)
        self.hub.track_presence(subscription)

        for row in rows:
            payload = message_payload(row, channel["name"])
            frame = self._push_to_client(join_ref, topic, "new_msg", payload)
            if not await self._send_paced(frame):
                return
        if connection.subscriptions.get(topic) is subscription:
            self.hub.go_live(subscription, after_id)

    async def _send_paced(self, frame: bytes) -> bool:
        """Queue a bulk frame, closing the connection if the client stops reading."""
        with trio.move_on_after(self.heartbeat_timeout):
            return await self.connection.send_paced(frame)
        self.connection.close_slow_consumer(self.connection.buffered_bytes + len(frame))
        return False

    def _unsubscribe(self, topic: str) -> None:
        self.hub.unsubscribe(self.connection, topic)
        self.channel_ids.pop(topic, None)

    def _leave(self, message: PhoenixMessage) -> None:
        subscription = self._joined(message)
        if subscription is None:
            return
        self._unsubscribe(message.topic)
        self._reply(message, subscription.join_ref, "ok", {})
        self.connection.send(
            self._push_to_client(subscription.join_ref, message.topic, EVENT_CLOSE, {})
        )

    async def _push(self, message: PhoenixMessage) -> None:
        subscription = self._joined(message)
        if subscription is None:
            return
        join_ref = subscription.join_ref
        if message.event != "new_msg":
            self._reply(message, join_ref, "error", {"reason": "unknown_event"})
            return
        try:
            body = validate_body(message.payload.get("body"), self.settings)
        except ValidationError as exc:
            self._reply(
                message,
                join_ref,
                "error",
                {"reason": "invalid_body", "message": exc.message},
            )
            return

        connection = self.connection
        try:
            result = await self.services.db.call(
                "insert_message",
                timeout=DB_CALL_TIMEOUT,
                channel_id=self.channel_ids[message.topic],
                user_id=connection.user_id,
                body=body,
            )
        except RemoteError as exc:
            log.info("insert_message failed: %s", exc, extra=connection.extra)
            self._reply(message, join_ref, "error", {"reason": exc.code})
            return
        except trio.TooSlowError:
            log.warning(
                "insert_message timed out after %g s",
                DB_CALL_TIMEOUT,
                extra=connection.extra,
            )
            self._reply(message, join_ref, "error", {"reason": "timeout"})
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("insert_message failed: %s", exc, extra=connection.extra)
            self._reply(message, join_ref, "error", {"reason": "unavailable"})
            return
        MESSAGES_RECEIVED.inc()
        self._reply(message, join_ref, "ok", {"id": result["message"]["id"]})
