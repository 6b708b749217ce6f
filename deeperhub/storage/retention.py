"""DB writer ops for message retention: per-channel limits and pruning.

A channel keeps at most `max_messages` messages and none older than `max_age`
seconds. Each limit comes from the channel's own column when it is set
(`set_channel_retention`), else from the `retention.*` defaults that the DB
writer passes to `prune_messages`. 0 means no limit.

Pruning deletes the oldest messages of a channel in `seq` order and records the
largest deleted seq and id in `channels.pruned_seq` and `pruned_id`. So a
replay can tell whether messages after a client's last seen one were deleted.
Age is compared on `inserted_at`, and the cut-off is the newest message older
than the limit. A message whose clock went backwards may therefore be deleted
with older ones, because seq order wins.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import StorageError
from .writes import WriteOutcome, _int_arg, format_timestamp

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .writes import WriteExecutor

__all__ = ["RETENTION_OPS", "prune_messages", "set_channel_retention"]


def _optional_limit(args: Mapping[str, Any], name: str) -> int | None:
    if args.get(name) is None:
        return None
    value = _int_arg(args, name)
    if value < 0:
        raise StorageError("invalid", f"invalid argument {name}: must be 0 or more")
    return value


def set_channel_retention(ex: WriteExecutor, args: Mapping[str, Any]) -> WriteOutcome:
    """Set or clear (None) a channel's own retention limits; owner only."""
    channel_id = _int_arg(args, "channel_id")
    user_id = _int_arg(args, "user_id")
    max_messages = _optional_limit(args, "max_messages")
    max_age = _optional_limit(args, "max_age")

    _, owner_id = ex._require_channel(channel_id)
    if owner_id != user_id:
        raise StorageError(
            "forbidden", f"only the owner can change the retention of {channel_id}"
        )
    ex._rows(
        "UPDATE channels SET retention_max_messages = ?, retention_max_age = ? "
        "WHERE id = ?",
        (max_messages, max_age, channel_id),
    )
    retention = {"max_messages": max_messages, "max_age": max_age}
    return WriteOutcome(result={"retention": retention})


def prune_messages(ex: WriteExecutor, args: Mapping[str, Any]) -> WriteOutcome:
    """Delete up to `limit` messages beyond the retention limits, oldest first.

    `max_messages` and `max_age` are the defaults for channels without their
    own limits. The result is `{"deleted": N, "more": bool}`, where `more`
    means the limit stopped the pass and another batch should follow.
    """
    default_count = _int_arg(args, "max_messages")
    default_age = _int_arg(args, "max_age")
    limit = _int_arg(args, "limit")
    if limit < 1:
        raise StorageError("invalid", "invalid argument limit: must be 1 or more")

    now = ex.clock()
    channels = ex._rows(
        "SELECT id, last_seq, pruned_seq, "
        "coalesce(retention_max_messages, ?), coalesce(retention_max_age, ?) "
        "FROM channels ORDER BY id",
        (default_count, default_age),
    )
    deleted = 0
    for channel_id, last_seq, pruned_seq, max_messages, max_age in channels:
        cutoff = _cutoff_seq(ex, channel_id, last_seq, max_messages, max_age, now)
        if cutoff <= pruned_seq:
            continue
        rows = ex._rows(
            "DELETE FROM messages WHERE id IN ("
            "SELECT id FROM messages WHERE channel_id = ? AND seq <= ? "
            "ORDER BY seq LIMIT ?) RETURNING id, seq",
            (channel_id, cutoff, limit - deleted),
        )
        if rows:
            ex._rows(
                "UPDATE channels SET pruned_seq = max(pruned_seq, ?), "
                "pruned_id = max(pruned_id, ?) WHERE id = ?",
                (max(row[1] for row in rows), max(row[0] for row in rows), channel_id),
            )
        deleted += len(rows)
        if deleted >= limit:
            return WriteOutcome(result={"deleted": deleted, "more": True})
    return WriteOutcome(result={"deleted": deleted, "more": False})


def _cutoff_seq(
    ex: WriteExecutor,
    channel_id: int,
    last_seq: int,
    max_messages: int,
    max_age: int,
    now: Any,
) -> int:
    """Return the largest seq that the channel's limits allow to delete (0: none)."""
    cutoff = 0
    if max_messages > 0:
        cutoff = max(cutoff, last_seq - max_messages)
    if max_age > 0:
        oldest_kept = format_timestamp(now - timedelta(seconds=max_age))
        row = ex._row(
            "SELECT max(seq) FROM messages WHERE channel_id = ? AND inserted_at < ?",
            (channel_id, oldest_kept),
        )
        if row is not None and row[0] is not None:
            cutoff = max(cutoff, int(row[0]))
    return cutoff


RETENTION_OPS = {
    "set_channel_retention": set_channel_retention,
    "prune_messages": prune_messages,
}
