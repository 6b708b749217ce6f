"""Admission of WebSocket connections and joins over every acceptor process.

An acceptor sends an admission request on its bus connection before it
accepts a WebSocket upgrade or a `phx_join`, so `server.max_connections` and
`websocket.max_joins_per_user` apply over all acceptors, not per process. The
DB writer counts the connections and joins of each bus connection and drops
them when that connection ends (the acceptor stopped or crashed), as it does
for presence.

Requests, each answered `{"admitted": bool}` at once (no SQLite access):

- `admit_connection {}`: admitted while the connections held by all bus
  connections are fewer than `max_connections`. An admitted connection is
  counted for the bus connection that asked.
- `admit_join {user_id, topic}`: admitted when the user already holds `topic`
  through any bus connection, or holds fewer than `max_joins_per_user`
  distinct topics. An admitted join is counted for the bus connection that
  asked, once per join, so two connections of one user on the same topic
  hold it twice and the topic is freed only when both left.

One-way events from the acceptor:

- `{"event": "release_connection"}`: one admitted connection ended.
- `{"event": "release_join", "user_id", "topic"}`: one admitted join ended.
- `{"event": "admission_sync", "connections": N, "joins": {user_id: {topic:
  count}}}`: everything the acceptor holds, sent after each `bus_subscribe`.
  It replaces what that bus connection held, so a restarted DB writer learns
  the counts again. It is not checked against the limits, because those
  connections and joins exist already; while the total is over a limit, new
  requests are rejected.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from deeperhub.storage.writes import WriteOutcome

__all__ = ["ADMISSION_EVENTS", "ADMISSION_OPS", "AdmissionRegistry"]

log = logging.getLogger("deeperhub.db_writer")

ADMISSION_OPS = frozenset({"admit_connection", "admit_join"})
ADMISSION_EVENTS = frozenset({"release_connection", "release_join", "admission_sync"})


def _join_key(args: dict[str, Any]) -> tuple[str, str] | None:
    """Return (user id key, topic) of an admission message, or None if invalid."""
    user_id = args.get("user_id")
    topic = args.get("topic")
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        return None
    if not isinstance(topic, str):
        return None
    return str(user_id), topic


class AdmissionRegistry:
    """Connections and joins held by each bus connection, identified by an owner key."""

    def __init__(self, *, max_connections: int, max_joins_per_user: int) -> None:
        self.max_connections = max_connections
        self.max_joins_per_user = max_joins_per_user
        self._connections: dict[object, int] = {}
        # owner -> user id key -> topic -> joins held through that owner
        self._joins: dict[object, dict[str, Counter[str]]] = {}
        # user id key -> topic -> joins held through every owner
        self._user_topics: dict[str, Counter[str]] = {}
        self.connection_count = 0

    def topics_of_user(self, user_id: int) -> set[str]:
        """Return the topics the user has joined through any bus connection."""
        return set(self._user_topics.get(str(user_id), ()))

    def counts(self) -> dict[str, Any]:
        """Return the totals: connections, and each user's distinct topics."""
        users = {user: sorted(topics) for user, topics in self._user_topics.items()}
        return {"connections": self.connection_count, "topics_by_user": users}

    async def handle_counts(self, op: str, args: dict[str, Any]) -> Any:
        """Return `counts()`: the handler of the `admission` operator request."""
        return self.counts()

    # Requests and events

    def request(self, owner: object, op: str, args: dict[str, Any]) -> WriteOutcome:
        """Decide an `admit_connection` or `admit_join` request of `owner`."""
        if op == "admit_connection":
            return WriteOutcome(result={"admitted": self.admit_connection(owner)})
        key = _join_key(args)
        if key is None:
            error = ("invalid", "admit_join needs an integer user_id and a topic")
            return WriteOutcome(error=error)
        return WriteOutcome(result={"admitted": self.admit_join(owner, *key)})

    def apply_event(self, owner: object, event: dict[str, Any]) -> None:
        """Apply a one-way `release_*` or `admission_sync` event of `owner`."""
        name = event.get("event")
        if name == "release_connection":
            self.release_connection(owner)
        elif name == "release_join":
            key = _join_key(event)
            if key is None:
                log.warning("ignoring release_join without a user_id and a topic")
                return
            self.release_join(owner, *key)
        elif name == "admission_sync":
            self.sync(owner, event)

    # Connections

    def admit_connection(self, owner: object) -> bool:
        """Count one more connection for `owner`, unless the limit is reached."""
        if self.connection_count >= self.max_connections:
            return False
        self._connections[owner] = self._connections.get(owner, 0) + 1
        self.connection_count += 1
        return True

    def release_connection(self, owner: object) -> None:
        held = self._connections.get(owner, 0)
        if held <= 0:
            log.warning("ignoring release_connection: no connection is admitted")
            return
        self._add_connections(owner, -1)

    def _add_connections(self, owner: object, delta: int) -> None:
        held = self._connections.get(owner, 0) + delta
        self.connection_count += delta
        if held > 0:
            self._connections[owner] = held
        else:
            self._connections.pop(owner, None)

    # Joins

    def admit_join(self, owner: object, user: str, topic: str) -> bool:
        """Count a join of `topic` by `user` for `owner`, unless over the limit."""
        topics = self._user_topics.get(user, Counter())
        if topic not in topics and len(topics) >= self.max_joins_per_user:
            return False
        self._add_joins(owner, user, topic, 1)
        return True

    def release_join(self, owner: object, user: str, topic: str) -> None:
        if self._joins.get(owner, {}).get(user, Counter())[topic] <= 0:
            log.warning("ignoring release_join of %s: the join is not held", topic)
            return
        self._add_joins(owner, user, topic, -1)

    def _add_joins(self, owner: object, user: str, topic: str, delta: int) -> None:
        for counters in (self._joins.setdefault(owner, {}), self._user_topics):
            topics = counters.setdefault(user, Counter())
            topics[topic] += delta
            if topics[topic] <= 0:
                del topics[topic]
            if not topics:
                del counters[user]
        if not self._joins[owner]:
            del self._joins[owner]

    # Bus connections

    def sync(self, owner: object, event: dict[str, Any]) -> None:
        """Replace the counts of `owner` by those of an `admission_sync`."""
        self.drop(owner)
        connections = event.get("connections")
        if isinstance(connections, int) and not isinstance(connections, bool):
            if connections > 0:
                self._add_connections(owner, connections)
        joins = event.get("joins")
        if not isinstance(joins, dict):
            return
        for user, topics in joins.items():
            if not isinstance(topics, dict):
                continue
            for topic, count in topics.items():
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    self._add_joins(owner, str(user), str(topic), count)

    def drop(self, owner: object) -> None:
        """Forget every connection and join held by `owner`."""
        self._add_connections(owner, -self._connections.get(owner, 0))
        for user, topics in self._joins.get(owner, {}).copy().items():
            for topic, count in list(topics.items()):
                self._add_joins(owner, user, topic, -count)
