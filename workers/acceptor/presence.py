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

Every join changes the topic's presence, so a cache of the whole
`presence_state` would be stale for the next joiner in a burst of joins.
Instead, `TopicPresence` keeps the JSON of each user id's entry and
re-encodes only the entries that changed, and `track` joins the cached
entries into the payload. In a burst of N joins by distinct users, each meta
is then encoded to JSON about once instead of about N times, but the pushes
still copy O(N^2) bytes.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from deeperhub.phoenix.protocol import VSN_2
from deeperhub.ws.frames import encode_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from deeperhub.phoenix.protocol import Ref

    from .hub import Hub, Subscription

__all__ = ["Presence", "PresenceMap", "TopicPresence", "encode_state_push"]

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


def _dump(value: object) -> bytes:
    # The same JSON form as deeperhub.phoenix.protocol.encode_push.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_state_push(vsn: str, join_ref: Ref, topic: str, payload: bytes) -> bytes:
    """Encode a `presence_state` push around a payload that is JSON already.

    The result equals `encode_push(vsn, join_ref, topic, "presence_state",
    json.loads(payload))` byte for byte. Only the envelope is encoded here.
    """
    if vsn == VSN_2:
        return b"".join(
            (
                b"[",
                _dump(join_ref),
                b",null,",
                _dump(topic),
                b',"presence_state",',
                payload,
                b"]",
            )
        )
    return b"".join(
        (
            b'{"topic":',
            _dump(topic),
            b',"event":"presence_state","payload":',
            payload,
            b',"ref":null,"join_ref":',
            _dump(join_ref),
            b"}",
        )
    )


class TopicPresence:
    """Every meta of one topic, local and remote, with each user id's JSON cached.

    Metas are grouped by user id key in the order their keys first appeared,
    and inside a key in the order they were added. A key's cached JSON
    (`"key":{"metas":[...]}`) is encoded again on the next `payload` after
    one of its metas was added, replaced or removed.
    """

    __slots__ = ("_fragments", "_metas", "_stale")

    def __init__(self) -> None:
        # user id key -> phx_ref -> meta
        self._metas: dict[str, dict[str, dict[str, Any]]] = {}
        # user id key -> its JSON, with the same keys in the same order as
        # `_metas`. An entry is out of date while its key is in `_stale`.
        self._fragments: dict[str, bytes] = {}
        self._stale: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._metas)

    def add(self, key: str, meta: dict[str, Any]) -> None:
        """Add a meta, or replace the meta of `key` with the same `phx_ref`."""
        metas = self._metas.get(key)
        if metas is None:
            metas = self._metas[key] = {}
            # A placeholder that keeps the key's place among the fragments.
            self._fragments[key] = b""
        metas[meta["phx_ref"]] = meta
        self._stale.add(key)

    def remove(self, key: str, phx_ref: str) -> None:
        """Remove the meta of `key` with `phx_ref`, if there is one."""
        metas = self._metas.get(key)
        if metas is None or metas.pop(phx_ref, None) is None:
            return
        if metas:
            self._stale.add(key)
            return
        del self._metas[key]
        del self._fragments[key]
        self._stale.discard(key)

    def state(self) -> PresenceMap:
        """Return the metas grouped by user id, as in `presence_state`."""
        return {
            key: {"metas": list(metas.values())} for key, metas in self._metas.items()
        }

    def payload(self) -> bytes:
        """Return the JSON of `state()`, encoding only the keys that changed."""
        for key in self._stale:
            entry = {"metas": list(self._metas[key].values())}
            self._fragments[key] = _dump(key) + b":" + _dump(entry)
        self._stale.clear()
        return b"{" + b",".join(self._fragments.values()) + b"}"


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
        # topic -> every meta of the topic, local and remote. Changed together
        # with `Subscription.meta` and `_remote`, and never empty.
        self._topics: dict[str, TopicPresence] = {}
        # user id key -> topic -> number of metas, local and remote, for the
        # per-user join limit.
        self._user_topics: dict[str, Counter[str]] = {}

    # Queries

    def state(self, topic: str) -> PresenceMap:
        """Return every meta of `topic`, local and remote, grouped by user id."""
        presence = self._topics.get(topic)
        return presence.state() if presence is not None else {}

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
        topic = subscription.topic
        presence = self._topics.get(topic)
        payload = presence.payload() if presence is not None else b"{}"
        frame = encode_state_push(connection.vsn, subscription.join_ref, topic, payload)
        connection.send(encode_text(frame))
        subscription.presence_synced = True

        meta = {
            "phx_ref": secrets.token_urlsafe(12),
            "username": connection.username,
            "online_at": _utc_now(),
        }
        subscription.meta = meta
        key = str(connection.user_id)
        self._add(topic, key, meta)
        self._count(key, topic, 1)
        self._changed(topic, [(key, meta)], [])

    def untrack(self, subscription: Subscription) -> None:
        """Remove a local meta, for example after a leave or a closed connection."""
        meta = subscription.meta
        if meta is None:
            return
        subscription.meta = None
        key = str(subscription.connection.user_id)
        self._remove(subscription.topic, key, meta["phx_ref"])
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
            known = metas.pop(meta["phx_ref"], None)
            if known is not None:
                self._remove(topic, known[0], meta["phx_ref"])
                self._count(key, topic, -1)
                leaves.append((key, meta))
        joins = []
        for key, meta in _pairs(event.get("joins")):
            known = metas.get(meta["phx_ref"])
            if known is None:
                self._count(key, topic, 1)
                joins.append((key, meta))
            elif known[0] != key:
                self._remove(topic, known[0], meta["phx_ref"])
            metas[meta["phx_ref"]] = (key, meta)
            self._add(topic, key, meta)
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

    def _add(self, topic: str, key: str, meta: dict[str, Any]) -> None:
        presence = self._topics.get(topic)
        if presence is None:
            presence = self._topics[topic] = TopicPresence()
        presence.add(key, meta)

    def _remove(self, topic: str, key: str, phx_ref: str) -> None:
        presence = self._topics.get(topic)
        if presence is None:
            return
        presence.remove(key, phx_ref)
        if not presence:
            del self._topics[topic]

    def _count(self, key: str, topic: str, delta: int) -> None:
        topics = self._user_topics.setdefault(key, Counter())
        topics[topic] += delta
        if topics[topic] <= 0:
            del topics[topic]
        if not topics:
            del self._user_topics[key]
