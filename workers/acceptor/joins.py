"""`phx_join` of a channel topic: checks, presence, and replay of missed messages.

A join payload may carry `last_seen_id` (the id of the last message the client
saw) or `last_seen_seq` (its per-channel `seq`). The join then replays the
stored messages after it before any live message, with no gap and no
duplicate, even while messages are being published:

1. The subscription is added first, holding live messages in `pending`.
2. One read transaction returns the newest `websocket.replay_limit` messages
   after the last seen one, and the channel's newest seq.
3. The reply, `presence_state` and the replayed messages are sent.
4. `Hub.go_live` sends the held messages whose seq is above everything the
   replay covered, and later ones go out as they arrive.

When more messages were missed than `replay_limit`, or retention deleted some
of them, the newest `replay_limit` are replayed (so the replay still joins up
with the live messages), and the reply reports it:

    {"channel_id": 7, "recovered": false, "reason": "replay_limit" or "retention",
     "replayed_from": 1234, "earliest_available": 1001}

`replayed_from` is the id of the first replayed message (null if none was
replayed); the client fetches the messages between its last seen id and that
one from `GET /api/channels/7/messages?after_id=LAST_SEEN_ID`.
`earliest_available` is the id of the oldest stored message (null when none
is stored); older ones were deleted by retention for good. A join whose
replay is complete replies `{"channel_id": 7, "recovered": true}`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import apsw
import trio

from deeperhub.errors import StorageError
from deeperhub.phoenix.protocol import EVENT_CLOSE
from deeperhub.storage import reads
from deeperhub.validation import ValidationError, validate_channel_name

from .channel_deletes import CHANNEL_TOPIC_PREFIX
from .hub import message_payload

if TYPE_CHECKING:
    from deeperhub.phoenix.protocol import PhoenixMessage

    from .hub import Subscription
    from .session import Session

__all__ = ["CHANNEL_TOPIC_PREFIX", "JoinRejected", "join"]

log = logging.getLogger("deeperhub.acceptor.ws")

_READ_ERRORS = (apsw.Error, StorageError, trio.ClosedResourceError, LookupError)


class JoinRejected(Exception):
    """Rejection of a `phx_join`, sent as an error reply with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _last_seen(payload: dict[str, Any]) -> tuple[str, int] | None:
    """Return ("id" or "seq", value) of a join payload, or None for a plain join."""
    found = [
        (kind, payload[key])
        for kind, key in (("id", "last_seen_id"), ("seq", "last_seen_seq"))
        if payload.get(key) is not None
    ]
    if not found:
        return None
    if len(found) > 1:
        raise JoinRejected("invalid_last_seen")
    kind, value = found[0]
    # Ids and seqs are SQLite integers, so a value above reads.MAX_INT64 cannot
    # be bound to a query (OverflowError) and is as invalid as a negative one.
    if isinstance(value, bool) or not isinstance(value, int):
        raise JoinRejected(f"invalid_last_seen_{kind}")
    if not 0 <= value <= reads.MAX_INT64:
        raise JoinRejected(f"invalid_last_seen_{kind}")
    return kind, value


async def join(session: Session, message: PhoenixMessage) -> None:
    """Handle a `phx_join` of `message.topic`, replying ok or error."""
    connection = session.connection
    topic = message.topic
    # V1 clients may omit join_ref, and then the join's own ref identifies it.
    join_ref = message.join_ref if message.join_ref is not None else message.ref

    previous = connection.subscriptions.get(topic)
    if previous is not None:
        # A second join replaces the first, which the client sees closed.
        session.unsubscribe(topic)
        connection.send(session.push_frame(previous.join_ref, topic, EVENT_CLOSE, {}))

    hub = session.hub
    with hub.deletes.watch() as watch:
        try:
            channel, last_seen = await _check(session, message)
        except JoinRejected as exc:
            session.reply(message, join_ref, "error", {"reason": exc.reason})
            return
        channel_id = int(channel["id"])
        if not connection.is_open:
            hub.admission.release_join(connection.user_id, topic)
            return
        # A `channel_deleted` event applied during _check means that the
        # channel it read is gone, and no later event would end this join.
        # NOTE: a channel deleted and re-created with the same id during
        # _check is rejected too, although the join read the new channel.
        if watch.deleted(topic, channel_id):
            hub.admission.release_join(connection.user_id, topic)
            session.reply(message, join_ref, "error", {"reason": "not_found"})
            return

        # NOTE: membership of a private channel is checked at join time only. A
        # member removed later keeps receiving the topic until it leaves.
        subscription = hub.subscribe(connection, topic, join_ref, channel_id)
        # From here on Hub.unsubscribe releases the join admitted by _check.
        subscription.admitted = True
    if last_seen is None:
        session.reply(message, join_ref, "ok", {"channel_id": channel["id"]})
        hub.track_presence(subscription)
        hub.go_live(subscription)
        return
    await _join_with_replay(session, message, subscription, channel, last_seen)


async def _check(
    session: Session, message: PhoenixMessage
) -> tuple[dict[str, Any], tuple[str, int] | None]:
    """Return the channel and the last seen message of a join, or raise.

    The per-user topic limit is checked last, so that an admitted join is
    released only by the caller (`Admission.admit_join`).
    """
    connection = session.connection
    topic = message.topic
    if not topic.startswith(CHANNEL_TOPIC_PREFIX):
        raise JoinRejected("unmatched topic")
    name = topic[len(CHANNEL_TOPIC_PREFIX) :]
    try:
        validate_channel_name(name)
    except ValidationError:
        raise JoinRejected("invalid_topic") from None
    if len(connection.subscriptions) >= session.max_joins:
        raise JoinRejected("too_many_joins")
    last_seen = _last_seen(message.payload)

    run = session.services.reads.run
    try:
        channel = await run(reads.channel_by_name, name)
        if channel is None:
            raise JoinRejected("not_found")
        if channel["private"]:
            if not await run(reads.is_member, channel["id"], connection.user_id):
                raise JoinRejected("unauthorized")
    except _READ_ERRORS as exc:
        log.warning("join of %s failed: %s", topic, exc, extra=connection.extra)
        raise JoinRejected("unavailable") from None

    # Counted over all acceptors by the DB writer (admission.py).
    if not await session.hub.admission.admit_join(connection.user_id, topic):
        raise JoinRejected("too_many_joins")
    return channel, last_seen


async def _join_with_replay(
    session: Session,
    message: PhoenixMessage,
    subscription: Subscription,
    channel: dict[str, Any],
    last_seen: tuple[str, int],
) -> None:
    """Finish a join that asked for the messages after its last seen one."""
    connection = session.connection
    topic = subscription.topic
    join_ref = subscription.join_ref
    kind, value = last_seen
    try:
        window = await session.services.reads.run(
            _read_window, int(channel["id"]), kind, value, session.replay_limit
        )
    except _READ_ERRORS as exc:
        log.warning("replay for %s failed: %s", topic, exc, extra=connection.extra)
        session.unsubscribe(topic)
        session.reply(message, join_ref, "error", {"reason": "unavailable"})
        return
    if (
        not connection.is_open
        or connection.subscriptions.get(topic) is not subscription
    ):
        return

    rows = window["messages"]
    response: dict[str, Any] = {
        "channel_id": channel["id"],
        "recovered": window["complete"],
    }
    if not window["complete"]:
        response["reason"] = "retention" if window["pruned"] else "replay_limit"
        response["replayed_from"] = rows[0]["id"] if rows else None
        response["earliest_available"] = window["earliest_id"]
        log.info(
            "replay for %s is incomplete (%s)",
            topic,
            response["reason"],
            extra=connection.extra,
        )
    session.reply(message, join_ref, "ok", response)
    session.hub.track_presence(subscription)

    # Live messages up to the channel's seq at the read are in the replay or
    # were never missed.
    covered = max(window["last_seq"], rows[-1]["seq"] if rows else 0)
    for row in rows:
        # A deleted channel or a second join of the topic ended this join.
        if connection.subscriptions.get(topic) is not subscription:
            return
        payload = message_payload(row, channel["name"])
        frame = session.push_frame(join_ref, topic, "new_msg", payload)
        if not await session.send_paced(frame):
            return
    if connection.subscriptions.get(topic) is subscription:
        session.hub.go_live(subscription, covered)


def _read_window(
    conn: apsw.Connection, channel_id: int, kind: str, value: int, limit: int
) -> dict[str, Any]:
    if kind == "id":
        return reads.replay_window(conn, channel_id, after_id=value, limit=limit)
    return reads.replay_window(conn, channel_id, after_seq=value, limit=limit)
