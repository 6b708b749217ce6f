"""Topics, subscribers and presence of one acceptor process.

The hub owns every open WebSocket connection of the process and the
subscriptions of each topic. A broadcast is encoded to frame bytes at most
once per Phoenix serializer version in use, and the same `bytes` object is
queued to every subscriber. `flush` then writes each connection's queue with
one system call (see `connection.py`).

Chat messages come from the DB writer's bus in commit order, so every acceptor
delivers a topic's messages in the same order, whichever acceptor or HTTP
request published them. Each carries the channel's `seq`. A join that replays
stored messages holds live messages in `Subscription.pending` until the replay
is sent, and then drops those whose seq the replay already covered.

`server.max_connections` counts over all acceptor processes: a slot is
admitted by the DB writer, which counts every acceptor's connections, and
while it cannot reply each acceptor admits its static share
(`connection_budget`). See `admission.py`, which also admits the joins
limited by `websocket.max_joins_per_user`.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.metrics import (
    MESSAGES_BROADCAST,
    MESSAGES_DELIVERED,
    message_origin,
)
from deeperhub.phoenix.protocol import EVENT_CLOSE, encode_push
from deeperhub.ws.frames import CloseCode, encode_text

from .admission import Admission, connection_budget
from .channel_deletes import CHANNEL_DELETED_EVENT, ChannelDeletes
from .connection import REPLY_WAIT_TIMEOUT, SLOW_CONSUMER_REASON, Connection
from .presence import Presence

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from deeperhub.config import Settings
    from deeperhub.phoenix.protocol import Ref

__all__ = [
    "CLOSE_BATCH_INTERVAL",
    "CLOSE_BATCH_SIZE",
    "CLOSE_TIMEOUT",
    "SLOW_CONSUMER_REASON",
    "Connection",
    "Hub",
    "Subscription",
    "connection_budget",
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


@dataclass(eq=False, slots=True)
class Subscription:
    """One connection's join of one topic.

    Until `live` is set, chat messages for the topic are held in `pending`
    instead of being sent, so that a replay of stored messages can be sent
    first. Messages with a seq up to `after_seq` are never sent, because the
    replay already contained them. Presence diffs are sent only once
    `presence_synced` is set, that is after the `presence_state` push.
    `admitted` is set for joins that hold an `Admission.admit_join`, which
    `Hub.unsubscribe` releases. `channel_id` is the stored channel the join
    read, None only in unit tests that subscribe without one.
    """

    connection: Connection
    topic: str
    join_ref: Ref
    channel_id: int | None = None
    live: bool = False
    presence_synced: bool = False
    after_seq: int = 0
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    pending_bytes: int = 0
    meta: dict[str, Any] | None = None
    admitted: bool = False


class _Broadcast:
    """Frames of one push to many connections, encoded once per serializer version."""

    __slots__ = ("_frames", "event", "payload", "topic")

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

    def __init__(self, settings: Settings, *, worker_id: str = "acceptor") -> None:
        self.settings = settings
        self.send_queue_bytes = int(settings["websocket.send_queue_bytes"])
        # Set by close_all. Upgrades are then rejected with HTTP 503.
        self.shutting_down = trio.Event()
        # Close code and reason of close_all, for connections that finish their
        # upgrade after it started.
        self._shutdown_close: tuple[int, str] | None = None

        self._ids = itertools.count(1)
        self._connections: set[Connection] = set()
        self._topics: dict[str, dict[Connection, Subscription]] = {}
        self._all_closed = trio.Event()
        self.presence = Presence(self)
        self.admission = Admission(settings, worker_id, self.presence)
        self.deletes = ChannelDeletes(self)
        # Over all acceptors, named in the 503 response.
        self.max_connections = self.admission.max_connections
        # Handlers of bus events other than `message`, by event name, such as
        # `revoked` (token_watch.TokenWatch.apply_revocation).
        self.bus_handlers: dict[str, Callable[[dict[str, Any]], object]] = {
            "presence": self.presence.apply_remote,
            "presence_snapshot": self.presence.apply_snapshot,
            CHANNEL_DELETED_EVENT: self.deletes.apply,
        }

        # Connections with bytes to write, flushed together by `flush`.
        self._dirty: list[Connection] = []
        self._flush_wanted = trio.Event()
        self._flusher_running = False
        # Nursery of the drain tasks of connections whose socket is full.
        self._drains: trio.Nursery | None = None

    # Connections

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def reserve_slot(self) -> bool:
        """Take a connection slot for an upgrade, or return False (see admission.py).

        After a True result the caller must call `release_slot` exactly once,
        whether or not the upgrade succeeds.
        """
        if self.shutting_down.is_set():
            return False
        return await self.admission.reserve_slot()

    def release_slot(self) -> None:
        self.admission.release_slot()

    def open_connection(self, *, user_id: int, username: str, vsn: str) -> Connection:
        """Register a new connection. It takes no slot of its own: see reserve_slot."""
        connection = Connection(
            connection_id=next(self._ids),
            user_id=user_id,
            username=username,
            vsn=vsn,
            send_queue_bytes=self.send_queue_bytes,
            scheduler=self,
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
        self.flush()

    def connections(self) -> Iterable[Connection]:
        return iter(list(self._connections))

    async def close_all(self, code: int) -> None:
        """Close every connection with `code`, in batches, and wait until all ended.

        `code` should be 1001 (going away) or 1012 (service restart). Both make
        phoenix.js reconnect. Returns at the latest REPLY_WAIT_TIMEOUT plus
        CLOSE_TIMEOUT seconds after the last batch, even if some connections
        are still ending: a connection first waits for the replies to its
        pushes in flight, then for the close handshake.
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
            self.flush()
            await trio.sleep(CLOSE_BATCH_INTERVAL)
        with trio.move_on_after(REPLY_WAIT_TIMEOUT + CLOSE_TIMEOUT):
            while self._connections:
                self._all_closed = trio.Event()
                await self._all_closed.wait()

    # Writing

    def schedule_flush(self, connection: Connection) -> None:
        """Remember a connection with new bytes for the next `flush`."""
        if not self._flusher_running:
            # Without the flusher task (unit tests), write at once.
            connection.flush()
            return
        self._dirty.append(connection)
        self._flush_wanted.set()

    @property
    def runs_drains(self) -> bool:
        """Whether `run_flusher` runs, so connections need no writer task."""
        return self._drains is not None

    def start_drain(self, connection: Connection) -> bool:
        """Start the drain task of a connection whose socket is full.

        Returns False when the flusher does not run, so no nursery is there.
        """
        if self._drains is None:
            return False
        self._drains.start_soon(connection.drain)
        return True

    def flush(self) -> None:
        """Write the buffered frames of every connection that has new ones."""
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for connection in dirty:
                connection.flush()

    async def run_flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush connections whose frames were queued outside a batch, forever.

        The bus reader and each connection's reader call `flush` when they
        finish a batch. This task catches sends from anywhere else, such as
        timers, one scheduler tick later. It also owns the nursery of the
        drain tasks (`Connection.drain`).
        """
        async with trio.open_nursery() as drains:
            self._drains = drains
            self._flusher_running = True
            task_status.started()
            try:
                while True:
                    await self._flush_wanted.wait()
                    self._flush_wanted = trio.Event()
                    self.flush()
            finally:
                self._flusher_running = False
                self._drains = None

    # Topics

    def topics(self) -> list[str]:
        return list(self._topics)

    def subscriptions_of(self, topic: str) -> Iterable[Subscription]:
        return list(self._topics.get(topic, {}).values())

    def subscriber_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def subscribe(
        self,
        connection: Connection,
        topic: str,
        join_ref: Ref,
        channel_id: int | None = None,
    ) -> Subscription:
        """Add a join of `topic` whose chat messages wait in `pending` until `go_live`.

        The connection must not be subscribed to `topic` already.
        """
        if topic in connection.subscriptions:
            raise ValueError(f"connection {connection.id} already joined {topic!r}")
        subscription = Subscription(
            connection=connection, topic=topic, join_ref=join_ref, channel_id=channel_id
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
        self.presence.untrack(subscription)
        if subscription.admitted:
            subscription.admitted = False
            self.admission.release_join(connection.user_id, topic)
        return subscription

    def joined_channels(self) -> set[tuple[str, int]]:
        """Return (topic, channel id) of every join that read a stored channel."""
        return {
            (topic, subscription.channel_id)
            for topic, subscribers in self._topics.items()
            for subscription in subscribers.values()
            if subscription.channel_id is not None
        }

    def end_channel(self, topic: str, channel_id: int) -> int:
        """End every join of `topic` on the deleted channel `channel_id`.

        Each subscriber gets `phx_close` for its join_ref, as after a leave,
        and keeps its connection. Returns the number of joins ended.
        """
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        ended = [
            subscription
            for subscription in subscribers.values()
            if subscription.channel_id == channel_id
        ]

        # Taken off the topic before any presence leave is broadcast, so the
        # subscribers that end too get no `presence_diff` before `phx_close`.
        for subscription in ended:
            del subscribers[subscription.connection]
        if not subscribers:
            del self._topics[topic]

        # Hub.unsubscribe relays the presence leaves to the other acceptors and
        # releases the admitted joins.
        for subscription in ended:
            connection = subscription.connection
            frame = encode_push(
                connection.vsn, subscription.join_ref, topic, EVENT_CLOSE, {}
            )
            connection.send(encode_text(frame))
            self.unsubscribe(connection, topic)
        return len(ended)

    def go_live(self, subscription: Subscription, after_seq: int = 0) -> None:
        """Send the held chat messages with a seq above `after_seq`, then stop holding.

        If the held messages no longer fit into the buffer, the connection is
        closed as a slow consumer by `Connection.send`.
        """
        subscription.after_seq = after_seq
        subscription.live = True
        pending = subscription.pending
        subscription.pending = []
        subscription.pending_bytes = 0
        connection = subscription.connection
        # TODO: messages held during a replay are not observed in
        # deeperhub_message_delivery_seconds.
        delivered = 0
        for seq, frame in pending:
            if seq > after_seq:
                if not connection.send(frame):
                    break
                delivered += 1
        MESSAGES_DELIVERED.inc(delivered)

    # Presence

    def presence_state(self, topic: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Return the metas of `topic` on every acceptor, grouped by user id."""
        return self.presence.state(topic)

    def track_presence(self, subscription: Subscription) -> None:
        """Push `presence_state` to the joiner, then announce its join everywhere."""
        self.presence.track(subscription)

    # Broadcasts

    def broadcast(
        self,
        topic: str,
        event: str,
        payload: Mapping[str, Any],
        *,
        presence: bool = False,
    ) -> None:
        """Queue a push to every subscriber of `topic` (presence-synced ones only
        when `presence` is set)."""
        subscribers = self._topics.get(topic)
        if not subscribers:
            return
        broadcast = _Broadcast(topic, event, payload)
        for connection, subscription in list(subscribers.items()):
            if presence and not subscription.presence_synced:
                continue
            connection.send(broadcast.frame(connection.vsn))

    def broadcast_message(self, topic: str, message: Mapping[str, Any]) -> int:
        """Fan a stored chat message out to the subscribers of `topic` as `new_msg`.

        Returns the number of connections the frame was queued to now. Joins
        that are still replaying keep it in `pending` and send it later.
        """
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        seq = message.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            log.warning("dropping bus message for %s without an integer seq", topic)
            return 0
        broadcast = _Broadcast(topic, "new_msg", message_payload(message))
        MESSAGES_BROADCAST.inc()
        origin = message_origin(message)
        delivered = 0
        for connection, subscription in list(subscribers.items()):
            frame = broadcast.frame(connection.vsn)
            if not subscription.live:
                self._hold(subscription, seq, frame)
            elif seq > subscription.after_seq and connection.send(frame):
                delivered += 1
                # Metrics: start of the delivery latency, see Connection.flush.
                if connection.oldest_message_at is None:
                    connection.oldest_message_at = origin
        MESSAGES_DELIVERED.inc(delivered)
        return delivered

    def _hold(self, subscription: Subscription, seq: int, frame: bytes) -> None:
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
        subscription.pending.append((seq, frame))
        subscription.pending_bytes += len(frame)

    # The DB writer's bus

    def handle_bus_event(self, event: dict[str, Any]) -> None:
        """Apply one bus event: broadcast a `message`, or run its handler.

        Events are `{"event": "message", "topic": "channel:NAME", "message": {...}}`
        and the events in `bus_handlers`. Others are ignored. The caller
        flushes after a batch of events.
        """
        name = event.get("event")
        if name == "message":
            topic = event.get("topic")
            message = event.get("message")
            if not isinstance(topic, str) or not isinstance(message, dict):
                log.warning("ignoring malformed bus message event for topic %r", topic)
                return
            self.broadcast_message(topic, message)
            return
        handler = self.bus_handlers.get(str(name))
        if handler is not None:
            handler(event)
        else:
            log.debug("ignoring bus event %r", name)

    async def consume_bus(
        self, events: trio.MemoryReceiveChannel[dict[str, Any]]
    ) -> None:
        """Apply the bus events of a memory channel until it closes.

        The acceptor reads its bus with `bus.BusClient`; this is for callers
        that hold an `ipc.RpcClient` subscribed to the bus.
        """
        async for event in events:
            self.handle_bus_event(event)
            if not events.statistics().current_buffer_used:
                self.flush()
        log.info("message bus closed; no more broadcasts")
