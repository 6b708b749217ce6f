"""Topics, subscribers and presence of one acceptor process.

The hub owns every open WebSocket connection of the process. Each
`Connection` has a bounded outgoing buffer of encoded WebSocket frames and one
writer task (`Connection.run_writer`) that sends everything buffered with a
single `send_all`. Appending never blocks: a connection whose buffer would grow
past `websocket.send_queue_bytes` is closed with 1008 "slow consumer", so one
client that stops reading never delays delivery to the others.

A broadcast is encoded to frame bytes at most once per Phoenix serializer
version in use, and the same `bytes` object is appended to every subscriber.

Presence is tracked per connection and topic: a user with two open tabs has
two metas under its user id, and closing one tab removes only that meta. The
payloads have the shapes that phoenix.js `Presence` expects:
`presence_state` is `{user_id: {"metas": [meta, ...]}}` and `presence_diff` is
`{"joins": {...}, "leaves": {...}}`, where a meta is
`{"phx_ref", "username", "online_at"}`. Presence covers the connections of
this acceptor process only.
"""

from __future__ import annotations

import enum
import itertools
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.metrics import (
    MESSAGES_BROADCAST,
    MESSAGES_DELIVERED,
    SEND_QUEUE_DROPS,
)
from deeperhub.phoenix.protocol import encode_push
from deeperhub.ws.frames import (
    CloseCode,
    Opcode,
    encode_close,
    encode_frame,
    encode_text,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from deeperhub.config import Settings
    from deeperhub.phoenix.protocol import Ref

__all__ = [
    "CLOSE_BATCH_INTERVAL",
    "CLOSE_BATCH_SIZE",
    "CLOSE_TIMEOUT",
    "Connection",
    "Hub",
    "Subscription",
    "message_payload",
]

log = logging.getLogger("deeperhub.acceptor.ws")

# Seconds a closing connection gets to send its Close frame and receive the
# client's Close before the TCP connection is dropped.
CLOSE_TIMEOUT = 5.0
# `Hub.close_all` closes this many connections, then sleeps this many seconds
# before the next batch, so that a shutdown with many clients does not write
# every Close frame in the same scheduler tick.
CLOSE_BATCH_SIZE = 200
CLOSE_BATCH_INTERVAL = 0.01

SLOW_CONSUMER_REASON = "slow consumer"

# Keys of a stored message that are sent to clients in `new_msg`.
_MESSAGE_KEYS = ("id", "seq", "channel", "user_id", "username", "body", "inserted_at")


def message_payload(
    message: Mapping[str, Any], channel: str | None = None
) -> dict[str, Any]:
    """Return the `new_msg` payload of a stored message.

    `channel` fills the `channel` key when `message` has none, as rows read
    from the database may not.
    """
    payload = {key: message.get(key) for key in _MESSAGE_KEYS}
    if payload["channel"] is None and channel is not None:
        payload["channel"] = channel
    return payload


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _CloseState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # a Close frame is queued, so nothing else may be sent
    ABORTED = "aborted"  # the TCP connection is gone, so nothing can be sent


class Connection:
    """One WebSocket client: identity, joined topics and the outgoing buffer.

    `send` and `close` never block, so the hub can call them while it iterates
    over subscribers. Only `run_writer` writes to the socket.
    """

    def __init__(
        self,
        *,
        connection_id: int,
        user_id: int,
        username: str,
        vsn: str,
        send_queue_bytes: int,
    ) -> None:
        self.id = connection_id
        self.user_id = user_id
        self.username = username
        self.vsn = vsn
        # Joined topics, in join order.
        self.subscriptions: dict[str, Subscription] = {}
        self.send_queue_bytes = send_queue_bytes

        self._chunks: list[bytes] = []
        # Bytes appended and not yet written, including a batch in `send_all`.
        self._buffered = 0
        self._data_ready = trio.Event()
        self._space_ready = trio.Event()

        self._state = _CloseState.OPEN
        # The close code sent, or received when the client closed first. 1005
        # (no code in the client's Close) and 1006 (TCP dropped without a Close)
        # are only used as metric labels and never appear in a Close frame.
        self.close_code: int | None = None
        self.close_reason = ""
        # False when the server fails the connection (RFC 6455 section 7.1.7) and
        # closes TCP right after its Close frame without waiting for the client's.
        self.wait_for_peer_close = True
        self.close_requested = trio.Event()
        self.close_sent = trio.Event()
        self.peer_closed = trio.Event()

    @property
    def extra(self) -> dict[str, Any]:
        """Log record fields that identify this connection."""
        return {"connection_id": self.id, "user_id": self.user_id}

    @property
    def is_open(self) -> bool:
        return self._state is _CloseState.OPEN

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def _fits(self, size: int, limit: int) -> bool:
        # A frame larger than the limit is still accepted into an empty buffer,
        # otherwise it could never be sent.
        return self._buffered == 0 or self._buffered + size <= limit

    def _append(self, frame: bytes) -> None:
        self._chunks.append(frame)
        self._buffered += len(frame)
        self._data_ready.set()

    def send(self, frame: bytes) -> bool:
        """Queue one encoded frame, or close the connection if its buffer is full.

        Returns False when the frame was not queued: the connection is closing,
        or it has just been closed as a slow consumer.
        """
        if self._state is not _CloseState.OPEN:
            return False
        if not self._fits(len(frame), self.send_queue_bytes):
            self.close_slow_consumer(self._buffered + len(frame))
            return False
        self._append(frame)
        return True

    def close_slow_consumer(self, required_bytes: int) -> None:
        """Close with 1008 "slow consumer" because `required_bytes` exceed the limit."""
        SEND_QUEUE_DROPS.inc()
        log.warning(
            "closing slow consumer: %d bytes to buffer, limit %d",
            required_bytes,
            self.send_queue_bytes,
            extra=self.extra,
        )
        self.close(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON, discard=True)

    async def send_paced(self, frame: bytes) -> bool:
        """Queue one frame after waiting until the buffer is at most half full.

        Used for bulk sends such as a replay, so they leave room for live
        traffic and do not trip the slow-consumer limit on their own. Returns
        False if the connection closed meanwhile.
        """
        limit = self.send_queue_bytes // 2
        while self._state is _CloseState.OPEN and not self._fits(len(frame), limit):
            await self._space_ready.wait()
        return self.send(frame)

    def close(
        self, code: int | None, reason: str = "", *, discard: bool = False
    ) -> None:
        """Queue a Close frame after the buffered frames and stop accepting more.

        `code=None` sends a Close without a status code, as the echo of a client
        Close that had none. With `discard=True` the frames still waiting in the
        buffer are dropped, but a batch already passed to `send_all` is
        completed first, so the Close frame starts on a frame boundary. Only
        the first call has an effect.
        """
        if self._state is not _CloseState.OPEN:
            return
        self._state = _CloseState.CLOSING
        self.close_code = 1005 if code is None else int(code)
        self.close_reason = reason
        if discard:
            self._buffered -= sum(len(chunk) for chunk in self._chunks)
            self._chunks.clear()
        if code is None:
            frame = encode_frame(Opcode.CLOSE, b"")
        else:
            frame = encode_close(code, reason)
        self._append(frame)
        self.close_requested.set()
        self._space_ready.set()

    def abort(self) -> None:
        """Record that the TCP connection is gone, so nothing more can be sent."""
        if self._state is _CloseState.OPEN:
            self.close_code = 1006
        self._state = _CloseState.ABORTED
        self._chunks.clear()
        self.close_requested.set()
        self.close_sent.set()
        self.peer_closed.set()
        self._data_ready.set()
        self._space_ready.set()

    async def run_writer(self, stream: trio.abc.SendStream) -> None:
        """Send buffered frames until the Close frame is sent or the socket fails.

        Everything buffered when the writer wakes up goes out in one `send_all`,
        so a burst of broadcasts costs one system call per wake-up.
        """
        try:
            while self._state is not _CloseState.ABORTED:
                if not self._chunks:
                    await self._data_ready.wait()
                    self._data_ready = trio.Event()
                    continue
                closing = self._state is _CloseState.CLOSING
                batch = b"".join(self._chunks)
                self._chunks.clear()
                await stream.send_all(batch)
                self._buffered -= len(batch)
                self._space_ready.set()
                self._space_ready = trio.Event()
                # close() appends the Close frame last and nothing after it, so a
                # batch taken while closing ends with the Close frame.
                if closing:
                    self.close_sent.set()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.abort()


@dataclass(eq=False)
class Subscription:
    """One connection's join of one topic.

    Until `live` is set, chat messages for the topic are held in `pending`
    instead of being sent, so that a replay of stored messages can be sent
    first. Messages with an id up to `after_id` are never sent, because the
    replay already contained them. Presence diffs are sent only once
    `presence_synced` is set, that is after the `presence_state` push.
    """

    connection: Connection
    topic: str
    join_ref: Ref
    live: bool = False
    presence_synced: bool = False
    after_id: int = 0
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    pending_bytes: int = 0
    meta: dict[str, Any] | None = None


class _Broadcast:
    """Frames of one push to many connections, encoded once per serializer version."""

    def __init__(self, topic: str, event: str, payload: Mapping[str, Any]) -> None:
        self.topic = topic
        self.event = event
        self.payload = payload
        self._frames: dict[str, bytes] = {}

    def frame(self, vsn: str) -> bytes:
        frame = self._frames.get(vsn)
        if frame is None:
            frame = encode_text(
                encode_push(vsn, None, self.topic, self.event, self.payload)
            )
            self._frames[vsn] = frame
        return frame


class Hub:
    """Connections, topic subscriptions and presence of one acceptor process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_connections = int(settings["server.max_connections"])
        self.send_queue_bytes = int(settings["websocket.send_queue_bytes"])
        # Set by close_all. Upgrades are then rejected with HTTP 503.
        self.shutting_down = trio.Event()
        # Close code and reason of close_all, for connections that finish their
        # upgrade after it started.
        self._shutdown_close: tuple[int, str] | None = None

        self._ids = itertools.count(1)
        # Slots taken by upgrades in progress and by open connections.
        self._slots = 0
        self._connections: set[Connection] = set()
        self._topics: dict[str, dict[Connection, Subscription]] = {}
        self._all_closed = trio.Event()

    # Connections

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def reserve_slot(self) -> bool:
        """Take one of `server.max_connections` slots for an upgrade, or return False.

        The caller must call `release_slot` exactly once, whether or not the
        upgrade succeeds.
        """
        if self.shutting_down.is_set() or self._slots >= self.max_connections:
            return False
        self._slots += 1
        return True

    def release_slot(self) -> None:
        self._slots -= 1

    def open_connection(self, *, user_id: int, username: str, vsn: str) -> Connection:
        """Register a new connection. It takes no slot of its own: see reserve_slot."""
        connection = Connection(
            connection_id=next(self._ids),
            user_id=user_id,
            username=username,
            vsn=vsn,
            send_queue_bytes=self.send_queue_bytes,
        )
        self._connections.add(connection)
        if self._shutdown_close is not None:
            connection.close(*self._shutdown_close)
        return connection

    def remove_connection(self, connection: Connection) -> None:
        """Unsubscribe an ended connection from every topic and forget it."""
        for topic in list(connection.subscriptions):
            self.unsubscribe(connection, topic)
        self._connections.discard(connection)
        if not self._connections:
            self._all_closed.set()

    async def close_all(self, code: int) -> None:
        """Close every connection with `code`, in batches, and wait until all ended.

        `code` should be 1001 (going away) or 1012 (service restart). Both make
        phoenix.js reconnect. Returns at the latest CLOSE_TIMEOUT seconds after
        the last batch, even if some connections are still ending.
        """
        self.shutting_down.set()
        reason = (
            "server restart" if code == CloseCode.SERVICE_RESTART else "server shutdown"
        )
        self._shutdown_close = (code, reason)
        connections = list(self._connections)
        log.info(
            "closing %d WebSocket connections with code %d", len(connections), code
        )
        for start in range(0, len(connections), CLOSE_BATCH_SIZE):
            for connection in connections[start : start + CLOSE_BATCH_SIZE]:
                connection.close(code, reason)
            await trio.sleep(CLOSE_BATCH_INTERVAL)
        with trio.move_on_after(CLOSE_TIMEOUT):
            while self._connections:
                self._all_closed = trio.Event()
                await self._all_closed.wait()

    # Topics

    def subscribe(
        self, connection: Connection, topic: str, join_ref: Ref
    ) -> Subscription:
        """Add a join of `topic` whose chat messages wait in `pending` until `go_live`.

        The connection must not be subscribed to `topic` already.
        """
        if topic in connection.subscriptions:
            raise ValueError(f"connection {connection.id} already joined {topic!r}")
        subscription = Subscription(
            connection=connection, topic=topic, join_ref=join_ref
        )
        connection.subscriptions[topic] = subscription
        self._topics.setdefault(topic, {})[connection] = subscription
        return subscription

    def unsubscribe(self, connection: Connection, topic: str) -> Subscription | None:
        """Remove the connection's join of `topic` and broadcast its presence leave."""
        subscription = connection.subscriptions.pop(topic, None)
        if subscription is None:
            return None
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            subscribers.pop(connection, None)
            if not subscribers:
                del self._topics[topic]
        if subscription.meta is not None:
            leaves = {str(connection.user_id): {"metas": [subscription.meta]}}
            subscription.meta = None
            self._broadcast_presence(topic, joins={}, leaves=leaves)
        return subscription

    def subscriber_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def go_live(self, subscription: Subscription, after_id: int = 0) -> None:
        """Send the held chat messages with an id above `after_id`, then stop holding.

        If the held messages no longer fit into the buffer, the connection is
        closed as a slow consumer by `Connection.send`.
        """
        subscription.after_id = after_id
        subscription.live = True
        pending = subscription.pending
        subscription.pending = []
        subscription.pending_bytes = 0
        connection = subscription.connection
        for message_id, frame in pending:
            if message_id > after_id:
                if not connection.send(frame):
                    return
                MESSAGES_DELIVERED.inc()

    # Presence

    def presence_state(self, topic: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Return the tracked metas of `topic`, grouped by user id."""
        state: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for connection, subscription in self._topics.get(topic, {}).items():
            if subscription.meta is not None:
                entry = state.setdefault(str(connection.user_id), {"metas": []})
                entry["metas"].append(subscription.meta)
        return state

    def track_presence(self, subscription: Subscription) -> None:
        """Push `presence_state` to the joiner, then broadcast its join to the topic.

        The state is taken before the joiner's own meta is added, and the diff
        that adds it goes to every synced subscriber including the joiner, in
        the order the Phoenix server uses.
        """
        connection = subscription.connection
        state = self.presence_state(subscription.topic)
        frame = encode_text(
            encode_push(
                connection.vsn,
                subscription.join_ref,
                subscription.topic,
                "presence_state",
                state,
            )
        )
        connection.send(frame)
        subscription.presence_synced = True

        meta = {
            "phx_ref": secrets.token_urlsafe(12),
            "username": connection.username,
            "online_at": _utc_now(),
        }
        subscription.meta = meta
        joins = {str(connection.user_id): {"metas": [meta]}}
        self._broadcast_presence(subscription.topic, joins=joins, leaves={})

    def _broadcast_presence(
        self, topic: str, *, joins: dict[str, Any], leaves: dict[str, Any]
    ) -> None:
        broadcast = _Broadcast(
            topic, "presence_diff", {"joins": joins, "leaves": leaves}
        )
        for connection, subscription in list(self._topics.get(topic, {}).items()):
            if subscription.presence_synced:
                connection.send(broadcast.frame(connection.vsn))

    # Messages

    def broadcast_message(self, topic: str, message: Mapping[str, Any]) -> int:
        """Fan a stored chat message out to the subscribers of `topic` as `new_msg`.

        Returns the number of connections the frame was queued to now. Joins
        that are still replaying keep it in `pending` and send it later.
        """
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        message_id = message.get("id")
        if isinstance(message_id, bool) or not isinstance(message_id, int):
            log.warning("dropping bus message for %s without an integer id", topic)
            return 0
        broadcast = _Broadcast(topic, "new_msg", message_payload(message))
        MESSAGES_BROADCAST.inc()
        delivered = 0
        for connection, subscription in list(subscribers.items()):
            frame = broadcast.frame(connection.vsn)
            if not subscription.live:
                self._hold(subscription, message_id, frame)
            elif message_id > subscription.after_id and connection.send(frame):
                delivered += 1
        MESSAGES_DELIVERED.inc(delivered)
        return delivered

    def _hold(self, subscription: Subscription, message_id: int, frame: bytes) -> None:
        connection = subscription.connection
        if not connection.is_open:
            return
        # Held messages count against the same limit as the buffer they will be
        # moved into.
        required = subscription.pending_bytes + len(frame)
        if required > connection.send_queue_bytes:
            subscription.pending.clear()
            subscription.pending_bytes = 0
            connection.close_slow_consumer(required)
            return
        subscription.pending.append((message_id, frame))
        subscription.pending_bytes += len(frame)

    async def consume_bus(
        self, events: trio.MemoryReceiveChannel[dict[str, Any]]
    ) -> None:
        """Broadcast the DB writer's bus events until the channel closes.

        Events are `{"event": "message", "topic": "channel:NAME", "message": {...}}`.
        Others are ignored.
        """
        async for event in events:
            if event.get("event") != "message":
                log.debug("ignoring bus event %r", event.get("event"))
                continue
            topic = event.get("topic")
            message = event.get("message")
            if not isinstance(topic, str) or not isinstance(message, dict):
                log.warning("ignoring malformed bus message event for topic %r", topic)
                continue
            self.broadcast_message(topic, message)
        log.info("message bus closed; no more broadcasts")

    def connections(self) -> Iterable[Connection]:
        return iter(list(self._connections))
