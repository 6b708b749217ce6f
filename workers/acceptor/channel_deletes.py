"""The end of a deleted channel's joins on this acceptor.

`DELETE /api/channels/{id}` commits `delete_channel` in the DB writer, which
then publishes `{"event": "channel_deleted", "channel_id", "topic"}` on its
bus to every acceptor. Each acceptor ends every join of that topic whose
channel id matches: the client gets `phx_close` for its join_ref, the
presence meta leaves, and the join admitted by the DB writer is released.
The connection stays open for its other topics.

Channel ids are not reused (`channels.id` is AUTOINCREMENT since migration
5), except once for an id deleted before that migration ran. A deletion is
also recognised by its place in the bus order, which covers that case and a
join that read the channel before the deletion committed:

- The DB writer publishes a batch's events before it starts the next
  transaction. A join that read the re-created channel read it after the
  deletion's event was queued to every acceptor, and its `admit_join` reply
  comes after that event on the same bus connection. So by the time the join
  subscribes, the old channel's event has been applied, and it never ends
  the new channel's join.
- A join that read the channel before the deletion committed can still be
  waiting for its `admit_join` reply when the event is applied. `JoinWatch`
  records the deletions applied during the join, and the join is then
  rejected with `not_found` instead of subscribing to a deleted channel.

NOTE: the DB writer publishes an event only to the bus connections open at
that moment. An acceptor that is resubscribing when the deletion commits
(after a bus error or a request timeout) never gets the event, and its joins
of the deleted channel stay until they leave. Joins admitted by the local
rule while the DB writer cannot reply have no bus order to rely on either.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .hub import Hub

__all__ = ["CHANNEL_DELETED_EVENT", "ChannelDeletes", "JoinWatch"]

log = logging.getLogger("deeperhub.acceptor.ws")

CHANNEL_DELETED_EVENT = "channel_deleted"


class JoinWatch:
    """The deletions applied on this acceptor since one join started."""

    __slots__ = ("_deletes", "_start")

    def __init__(self, deletes: ChannelDeletes, start: int) -> None:
        self._deletes = deletes
        # Number of deletions applied before the join read its channel.
        self._start = start

    def deleted(self, topic: str, channel_id: int) -> bool:
        """Return whether the channel was deleted after the join started."""
        applied = self._deletes.recent.get((topic, channel_id))
        return applied is not None and applied > self._start


class ChannelDeletes:
    """Applies `channel_deleted` bus events to the hub of this acceptor."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        # Deletions applied since the process started.
        self.applied = 0
        # (topic, channel id) -> value of `applied` after its deletion. Kept
        # only while a join is in progress, so it stays small.
        self.recent: dict[tuple[str, int], int] = {}
        self._joins_in_progress = 0

    @contextmanager
    def watch(self) -> Iterator[JoinWatch]:
        """Record the deletions applied while a join reads and admits its channel."""
        self._joins_in_progress += 1
        try:
            yield JoinWatch(self, self.applied)
        finally:
            self._joins_in_progress -= 1
            if not self._joins_in_progress:
                self.recent.clear()

    def apply(self, event: dict[str, Any]) -> None:
        """End this acceptor's joins of the channel named by a bus event."""
        topic = event.get("topic")
        channel_id = event.get("channel_id")
        if (
            not isinstance(topic, str)
            or isinstance(channel_id, bool)
            or not isinstance(channel_id, int)
        ):
            log.warning(
                "ignoring malformed %s bus event for topic %r",
                CHANNEL_DELETED_EVENT,
                topic,
            )
            return

        self.applied += 1
        if self._joins_in_progress:
            self.recent[(topic, channel_id)] = self.applied
        ended = self.hub.end_channel(topic, channel_id)
        log.info(
            "channel %d (%s) was deleted: ended %d joins", channel_id, topic, ended
        )
