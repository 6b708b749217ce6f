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

The DB writer publishes an event only to the bus connections open at that
moment, so an acceptor that is resubscribing when a deletion commits (after a
bus error or a request timeout) never gets its event. After each
resubscription, `ChannelDeletes.check_joins` therefore reads the names of
every joined channel id in one query and ends each join whose channel is gone
or whose id now names another channel, as the event would have. It first
waits for the joins that started before the resubscription, since they may
have read a channel whose deletion no event announces. A join that starts
later reads its channel after the resubscription, so any later deletion
reaches it as an event. A check that cannot read the database logs a warning
and leaves the joins as they are.

NOTE: a channel deleted and re-created with the same name and the same id
while the acceptor was not subscribed passes the check, so the old joins
stay on the new channel. Only an id deleted before migration 5 can return.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import apsw
import trio

from deeperhub.errors import StorageError
from deeperhub.storage import reads as queries

if TYPE_CHECKING:
    from collections.abc import Iterator

    from deeperhub.storage.reads import ReadPool

    from .hub import Hub

__all__ = [
    "CHANNEL_DELETED_EVENT",
    "CHANNEL_TOPIC_PREFIX",
    "ChannelDeletes",
    "JoinWatch",
]

log = logging.getLogger("deeperhub.acceptor.ws")

CHANNEL_DELETED_EVENT = "channel_deleted"
CHANNEL_TOPIC_PREFIX = "channel:"
_READ_ERRORS = (apsw.Error, StorageError, trio.ClosedResourceError, LookupError)


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
        # Number of `check_joins` calls, one per resubscription to the bus.
        self._resubscriptions = 0
        # Joins in progress that started before the latest resubscription, and
        # the event set when none is left.
        self._earlier_joins = 0
        self._earlier_joins_done = trio.Event()

    @contextmanager
    def watch(self) -> Iterator[JoinWatch]:
        """Record the deletions applied while a join reads and admits its channel."""
        resubscriptions = self._resubscriptions
        self._joins_in_progress += 1
        try:
            yield JoinWatch(self, self.applied)
        finally:
            self._joins_in_progress -= 1
            if resubscriptions != self._resubscriptions:
                self._earlier_joins -= 1
                if not self._earlier_joins:
                    self._earlier_joins_done.set()
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

        ended = self._end_channel(topic, channel_id)
        log.info(
            "channel %d (%s) was deleted: ended %d joins", channel_id, topic, ended
        )

    async def check_joins(self, pool: ReadPool) -> None:
        """End the joins whose channel was deleted while the bus was down.

        The bus client starts this after each resubscription, but not after
        the first subscription, when no join exists yet.
        """
        self._resubscriptions += 1
        self._earlier_joins = self._joins_in_progress
        self._earlier_joins_done = trio.Event()
        if not self._earlier_joins:
            self._earlier_joins_done.set()
        await self._earlier_joins_done.wait()

        joins = self.hub.joined_channels()
        if not joins:
            return
        channel_ids = sorted({channel_id for _, channel_id in joins})
        try:
            names = await pool.run(queries.channel_names, channel_ids)
        except _READ_ERRORS as exc:
            log.warning(
                "failed to check the channels of %d joins after resubscribing "
                "to the bus, so they stay joined: %s",
                len(joins),
                exc,
            )
            return

        for topic, channel_id in sorted(joins):
            name = names.get(channel_id)
            if name is not None and topic == CHANNEL_TOPIC_PREFIX + name:
                continue
            ended = self._end_channel(topic, channel_id)
            log.info(
                "channel %d (%s) was deleted while the bus was down: ended %d joins",
                channel_id,
                topic,
                ended,
            )
        self.hub.flush()

    def _end_channel(self, topic: str, channel_id: int) -> int:
        """Apply one deletion and return the number of joins it ended."""
        self.applied += 1
        if self._joins_in_progress:
            self.recent[(topic, channel_id)] = self.applied
        return self.hub.end_channel(topic, channel_id)
