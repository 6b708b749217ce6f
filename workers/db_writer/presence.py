"""Presence relay of the DB writer: which bus connection tracks which metas.

Every acceptor keeps the presence of its own connections and sends each change
on its bus connection. The DB writer records the metas per bus connection and
relays each change to the other bus subscribers, so every acceptor can build
`presence_state` and `presence_diff` for the whole server. When a bus
connection ends (its acceptor stopped or crashed), the DB writer relays a leave
for each meta it had tracked, so the surviving acceptors drop them too.

Messages from an acceptor (one-way, without an `id`):

- `{"event": "presence", "topic": T, "joins": P, "leaves": P}`: metas added
  and removed on topic T. P is `{user_id: {"metas": [meta, ...]}}`, the shape
  of a Phoenix `presence_diff`, and a meta is identified by its `phx_ref`.
- `{"event": "presence_sync", "topics": {T: P}}`: every meta the acceptor
  tracks, sent after it subscribed. It replaces what that connection tracked.

Messages to subscribers: `presence` events relayed as they are, and
`{"event": "presence_snapshot", "topics": {T: P}}` with the metas of every
other connection, sent once right after the reply to a `bus_subscribe` whose
args have `"presence": true`.

Relayed events carry no ordering promise between two acceptors: a meta is
added and removed by the acceptor that owns its connection, in that order, and
metas of different connections are independent.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["PresenceRegistry", "parse_presence_map"]

log = logging.getLogger("deeperhub.db_writer")

# topic -> phx_ref -> (user id key, meta)
_Metas = dict[str, dict[str, tuple[str, dict[str, Any]]]]


def parse_presence_map(value: object) -> list[tuple[str, dict[str, Any]]]:
    """Return the (user id key, meta) pairs of a presence map, skipping bad entries.

    A meta without a string `phx_ref` cannot be removed later, so it is skipped.
    """
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


def _group(pairs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    grouped: dict[str, Any] = {}
    for key, meta in pairs:
        grouped.setdefault(key, {"metas": []})["metas"].append(meta)
    return grouped


class PresenceRegistry:
    """Metas tracked by each bus connection, identified by an opaque owner key."""

    def __init__(self) -> None:
        self._owners: dict[object, _Metas] = {}

    def meta_count(self) -> int:
        return sum(
            len(metas) for topics in self._owners.values() for metas in topics.values()
        )

    def apply(self, owner: object, event: dict[str, Any]) -> dict[str, Any] | None:
        """Record a `presence` event of `owner` and return the event to relay.

        Returns None when the event is malformed or changes nothing.
        """
        topic = event.get("topic")
        if not isinstance(topic, str):
            return None
        topics = self._owners.setdefault(owner, {})
        metas = topics.setdefault(topic, {})
        joins = parse_presence_map(event.get("joins"))
        leaves = parse_presence_map(event.get("leaves"))
        for _key, meta in leaves:
            metas.pop(meta["phx_ref"], None)
        for key, meta in joins:
            metas[meta["phx_ref"]] = (key, meta)
        if not metas:
            del topics[topic]
        if not joins and not leaves:
            return None
        return {
            "event": "presence",
            "topic": topic,
            "joins": _group(joins),
            "leaves": _group(leaves),
        }

    def sync(self, owner: object, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Replace what `owner` tracks by a `presence_sync`; return the relays."""
        relayed = self.drop(owner)
        topics = event.get("topics")
        if not isinstance(topics, dict):
            return relayed
        for topic, presences in topics.items():
            joined = self.apply(
                owner, {"topic": topic, "joins": presences, "leaves": {}}
            )
            if joined is not None:
                relayed.append(joined)
        return relayed

    def drop(self, owner: object) -> list[dict[str, Any]]:
        """Forget every meta of `owner` and return one leave event per topic."""
        topics = self._owners.pop(owner, {})
        return [
            {
                "event": "presence",
                "topic": topic,
                "joins": {},
                "leaves": _group(list(metas.values())),
            }
            for topic, metas in topics.items()
            if metas
        ]

    def snapshot(self, exclude: object) -> dict[str, Any]:
        """Return the `presence_snapshot` event of every owner but `exclude`."""
        merged: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for owner, topics in self._owners.items():
            if owner is exclude:
                continue
            for topic, metas in topics.items():
                merged.setdefault(topic, []).extend(metas.values())
        return {
            "event": "presence_snapshot",
            "topics": {topic: _group(pairs) for topic, pairs in merged.items()},
        }
