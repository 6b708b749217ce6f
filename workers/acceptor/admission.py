"""Connection slots and joins of this acceptor, admitted over every acceptor.

`server.max_connections` and `websocket.max_joins_per_user` count over all
acceptor processes. Before a WebSocket upgrade or a `phx_join`, the acceptor
sends an admission request (`admit_connection`, `admit_join`) on its bus
connection to the DB writer, which counts the connections and joins of every
acceptor (`workers/db_writer/admission.py`). That is one round trip per
upgrade or join, not per message. The end of an admitted connection or join
is sent as a one-way `release_*` event.

The local counts are the truth that the DB writer mirrors. A slot or join is
counted here before the request is sent, so every `admission_sync` (sent
after each bus subscription, see `bus.py`) includes the requests still
waiting for their reply. The DB writer drops an acceptor's counts when its
bus connection ends and learns them again from that sync.

While the DB writer cannot reply (it is restarting, or no reply came within
`bus.REQUEST_TIMEOUT`), a local rule decides:

- connections: this acceptor admits up to its static share of
  `server.max_connections` (`connection_budget`), counting only its own.
- joins: the user's topics in this acceptor's presence count, which include
  the other acceptors' joins as the bus last relayed them.

NOTE: during such an outage the totals can exceed the settings, by the
connections other acceptors held beyond their shares and by joins on other
acceptors that were not relayed yet. Once the DB writer is back, the sync
restores the exact counts and new requests are rejected until the totals are
below the limits again.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from deeperhub.config import Settings

    from .bus import BusClient
    from .presence import Presence

__all__ = ["Admission", "connection_budget"]

_ACCEPTOR_NUMBER = re.compile(r"acceptor-(\d+)$")


def connection_budget(total: int, acceptors: int, worker_id: str) -> int:
    """Return how many of `total` connections the acceptor `worker_id` may hold.

    Acceptor N of M (worker id `acceptor-N`) gets `total // M`, plus one for
    the first `total % M` acceptors, so the shares add up to `total`. Any
    other worker id (a single acceptor in tests) gets `total`. The shares
    apply only while the DB writer cannot admit connections.
    """
    match = _ACCEPTOR_NUMBER.match(worker_id)
    if match is None or acceptors <= 1:
        return total
    number = int(match.group(1))
    return total // acceptors + (1 if number <= total % acceptors else 0)


class Admission:
    """Connection slots and per-user joins held by this acceptor."""

    def __init__(self, settings: Settings, worker_id: str, presence: Presence) -> None:
        self.max_connections = int(settings["server.max_connections"])
        self.connection_share = connection_budget(
            self.max_connections, int(settings["server.acceptors"]), worker_id
        )
        self.max_joins_per_user = int(settings["websocket.max_joins_per_user"])
        self.presence = presence
        # The bus client sends the requests; None in unit tests without a bus,
        # where only the local rules apply.
        self.bus: BusClient | None = None
        # Slots taken by upgrades in progress and by open connections.
        self.slots = 0
        # user id -> topic -> joins held (admitted or waiting for the reply)
        self._joins: dict[int, Counter[str]] = {}

    def snapshot(self) -> dict[str, Any]:
        """Return the `admission_sync` event with everything this acceptor holds."""
        joins = {str(user_id): dict(topics) for user_id, topics in self._joins.items()}
        return {"event": "admission_sync", "connections": self.slots, "joins": joins}

    # Connections

    async def reserve_slot(self) -> bool:
        """Take a connection slot if the total over all acceptors allows it.

        The caller must call `release_slot` exactly once after a True result.
        """
        self.slots += 1
        return await self._decide(
            "admit_connection",
            {},
            release={"event": "release_connection"},
            local_rule=lambda: self.slots <= self.connection_share,
            undo=self._forget_slot,
        )

    def release_slot(self) -> None:
        """Give back a slot taken by `reserve_slot`."""
        self._forget_slot()
        self._send({"event": "release_connection"})

    def _forget_slot(self) -> None:
        self.slots -= 1

    # Joins

    async def admit_join(self, user_id: int, topic: str) -> bool:
        """Count a join of `topic` by the user if its distinct topics allow it.

        The caller must call `release_join` exactly once after a True result.
        """
        self._joins.setdefault(user_id, Counter())[topic] += 1
        args = {"user_id": user_id, "topic": topic}
        return await self._decide(
            "admit_join",
            args,
            release={"event": "release_join", **args},
            local_rule=lambda: self._admit_join_locally(user_id, topic),
            undo=lambda: self._forget_join(user_id, topic),
        )

    def release_join(self, user_id: int, topic: str) -> None:
        """Give back a join admitted by `admit_join`."""
        self._forget_join(user_id, topic)
        self._send({"event": "release_join", "user_id": user_id, "topic": topic})

    def _admit_join_locally(self, user_id: int, topic: str) -> bool:
        # The user's other topics: its presence on every acceptor as last
        # relayed, plus the joins held here apart from the one being decided.
        joined = self.presence.topics_of_user(user_id)
        for other_topic, count in self._joins.get(user_id, Counter()).items():
            if count > (1 if other_topic == topic else 0):
                joined.add(other_topic)
        return topic in joined or len(joined) < self.max_joins_per_user

    def _forget_join(self, user_id: int, topic: str) -> None:
        topics = self._joins.get(user_id)
        if topics is None:
            return
        topics[topic] -= 1
        if topics[topic] <= 0:
            del topics[topic]
        if not topics:
            del self._joins[user_id]

    # The DB writer

    async def _decide(
        self,
        op: str,
        args: dict[str, Any],
        *,
        release: dict[str, Any],
        local_rule: Callable[[], bool],
        undo: Callable[[], None],
    ) -> bool:
        """Ask the DB writer about a reservation already counted here.

        `local_rule` decides when the DB writer cannot reply. A rejected or
        cancelled reservation is undone with `undo`, and `release` is sent when
        a bus subscription made since the reservation counted it in its
        `admission_sync`.
        """
        bus = self.bus
        session = bus.session if bus is not None else 0
        admitted = False
        try:
            result = None
            if bus is not None:
                result = await bus.request(op, args, release=release)
            if result is None:
                admitted = local_rule()
            else:
                admitted = bool(result.get("admitted"))
        finally:
            if not admitted:
                undo()
                if bus is not None and bus.session != session:
                    bus.send(release)
        return admitted

    def _send(self, event: dict[str, Any]) -> None:
        if self.bus is not None:
            self.bus.send(event)
