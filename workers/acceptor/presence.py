"""Presence of a topic over every acceptor process.

Presence is tracked per connection and topic: a user with two open tabs has
two metas under its user id, and closing one tab removes only that meta. So a
user whose old socket is reaped after it reconnected stays present. A meta is
`{"phx_ref", "username", "online_at"}` and its `phx_ref` is unique.

This acceptor keeps the metas of its own connections on their `Subscription`
and the metas of the other acceptors in `Presence._remote`. Its own changes
go to the DB writer's bus (`relay`), which passes them to the other acceptors,
and theirs arrive here through `apply_remote` (see
`workers/db_writer/presence.py` for the bus messages). When the DB writer
sees an acceptor's bus connection end, it sends leaves for that acceptor's
metas, so presence recovers from a crashed acceptor.

The payloads have the shapes that phoenix.js `Presence` expects:
`presence_state` is `{user_id: {"metas": [meta, ...]}}` and `presence_diff`
is `{"joins": {...}, "leaves": {...}}`. A joiner gets `presence_state` before
any `presence_diff` of the topic: diffs go only to subscriptions whose
`presence_synced` is set, which `track` sets right after queueing the state.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from deeperhub.phoenix.protocol import encode_push
from deeperhub.ws.frames import encode_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .hub import Hub, Subscription

__all__ = ["Presence", "PresenceMap"]

log = logging.getLogger("deeperhub.acceptor.presence")

# {user id: {"metas": [meta, ...]}}
PresenceMap = dict[str, dict[str, list[dict[str, Any]]]]


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _group(pairs: Iterable[tuple[str, dict[str, Any]]]) -> PresenceMap:
    grouped: PresenceMap = {}
    for key, meta in pairs:
        grouped.setdefault(key, {"metas": []})["metas"].append(meta)
    return grouped


def _pairs(value: object) -> list[tuple[str, dict[str, Any]]]:
    """Return the (user id key, meta) pairs of a presence map from the bus."""
    pairs: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(value, dict):
        return pairs
    for key, entry in value.items():
        metas = entry.get("metas") if isinstance(entry, dict) else None
        if not isinstance(metas, list):
            continue
        for meta in metas:
            if isinstance(meta, dict) and isinstance(meta.get("phx_ref"), str):
                pairs.append((str(key), meta))
    return pairs


class Presence:
    """Local and remote metas per topic, and the diffs they cause."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        # Sends a local change to the other acceptors; set by the bus client.
        self.relay: Callable[[dict[str, Any]], None] | None = None
        # topic -> phx_ref -> (user id key, meta), for other acceptors' metas.
        self._remote: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
        # user id key -> topic -> number of metas, local and remote, for the
        # per-user join limit.
        self._user_topics: dict[str, Counter[str]] = {}

    # Queries

    def state(self, topic: str) -> PresenceMap:
        """Return every meta of `topic`, local and remote, grouped by user id."""
        pairs = [
            (str(subscription.connection.user_id), subscription.meta)
            for subscription in self.hub.subscriptions_of(topic)
            if subscription.meta is not None
        ]
        pairs.extend(self._remote.get(topic, {}).values())
        return _group(pairs)

    def topics_of_user(self, user_id: int) -> set[str]:
        """Return the topics where the user has a meta on any acceptor."""
        return set(self._user_topics.get(str(user_id), ()))

    def local_snapshot(self) -> dict[str, PresenceMap]:
        """Return the metas of this acceptor's connections, by topic."""
        topics: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for topic in self.hub.topics():
            for subscription in self.hub.subscriptions_of(topic):
                if subscription.meta is not None:
                    key = str(subscription.connection.user_id)
                    topics.setdefault(topic, []).append((key, subscription.meta))
        return {topic: _group(pairs) for topic, pairs in topics.items()}

    # Local connections

    def track(self, subscription: Subscription) -> None:
        """Push `presence_state` to the joiner, then announce its meta everywhere.

        The state is taken before the joiner's own meta is added, and the diff
        that adds it goes to every synced subscriber including the joiner, in
        the order the Phoenix server uses.
        """
        connection = subscription.connection
        # TODO: the state is encoded anew for every joiner, so N joins of one
        # topic in a burst encode O(N^2) bytes of JSON.
        frame = encode_text(
            encode_push(
                connection.vsn,
                subscription.join_ref,
                subscription.topic,
                "presence_state",
                self.state(subscription.topic),
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
        key = str(connection.user_id)
        self._count(key, subscription.topic, 1)
        self._changed(subscription.topic, [(key, meta)], [])

    def untrack(self, subscription: Subscription) -> None:
        """Remove a local meta, for example after a leave or a closed connection."""
        meta = subscription.meta
        if meta is None:
            return
        subscription.meta = None
        key = str(subscription.connection.user_id)
        self._count(key, subscription.topic, -1)
        self._changed(subscription.topic, [], [(key, meta)])

    def _changed(
        self,
        topic: str,
        joins: list[tuple[str, dict[str, Any]]],
        leaves: list[tuple[str, dict[str, Any]]],
    ) -> None:
        diff = {"joins": _group(joins), "leaves": _group(leaves)}
        self.hub.broadcast(topic, "presence_diff", diff, presence=True)
        if self.relay is not None:
            self.relay({"event": "presence", "topic": topic, **diff})

    # Other acceptors

    def apply_remote(self, event: dict[str, Any]) -> None:
        """Apply a `presence` event relayed by the DB writer."""
        topic = event.get("topic")
        if not isinstance(topic, str):
            log.warning("ignoring presence event without a topic")
            return
        metas = self._remote.setdefault(topic, {})
        leaves = []
        for key, meta in _pairs(event.get("leaves")):
            if metas.pop(meta["phx_ref"], None) is not None:
                self._count(key, topic, -1)
                leaves.append((key, meta))
        joins = []
        for key, meta in _pairs(event.get("joins")):
            if meta["phx_ref"] not in metas:
                self._count(key, topic, 1)
                joins.append((key, meta))
            metas[meta["phx_ref"]] = (key, meta)
        if not metas:
            del self._remote[topic]
        if joins or leaves:
            diff = {"joins": _group(joins), "leaves": _group(leaves)}
            self.hub.broadcast(topic, "presence_diff", diff, presence=True)

    def apply_snapshot(self, event: dict[str, Any]) -> None:
        """Replace the remote metas with a `presence_snapshot`, sending the diffs.

        The snapshot arrives after each (re)subscription to the bus. Metas that
        other acceptors tracked while the bus was down appear as joins, and
        metas of acceptors that stopped meanwhile as leaves.
        """
        topics = event.get("topics")
        new: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
        if isinstance(topics, dict):
            for topic, presences in topics.items():
                for key, meta in _pairs(presences):
                    new.setdefault(str(topic), {})[meta["phx_ref"]] = (key, meta)
        for topic in set(self._remote) | set(new):
            old_metas = self._remote.get(topic, {})
            new_metas = new.get(topic, {})
            leaves = [old_metas[ref] for ref in old_metas.keys() - new_metas.keys()]
            joins = [new_metas[ref] for ref in new_metas.keys() - old_metas.keys()]
            self.apply_remote(
                {
                    "topic": topic,
                    "joins": _group(joins),
                    "leaves": _group(leaves),
                }
            )

    def _count(self, key: str, topic: str, delta: int) -> None:
        topics = self._user_topics.setdefault(key, Counter())
        topics[topic] += delta
        if topics[topic] <= 0:
            del topics[topic]
        if not topics:
            del self._user_topics[key]
