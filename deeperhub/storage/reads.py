"""Read queries on read-only connections, and the pool that runs them in threads.

The query functions are plain and synchronous: `fn(conn, *args)`. Acceptors
call them through `ReadPool.run`, which lends one connection to one thread at
a time. The returned dicts have the shapes of the DB writer's results in
docs/architecture.md (a channel's `private` is a bool).
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..metrics import DB_POOL_CONNECTIONS, DB_POOL_IN_USE, DB_QUERY_DURATION
from .database import open_read_connection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    import apsw

__all__ = [
    "MAX_INT64",
    "ReadPool",
    "channel_by_id",
    "channel_by_name",
    "channel_names",
    "channel_retention",
    "earliest_message_id",
    "is_member",
    "is_token_revoked",
    "list_channels_for",
    "messages_after",
    "open_read_pool",
    "replay_window",
    "token_revocation",
    "user_by_id",
    "user_for_login",
]

T = TypeVar("T")

# The largest SQLite integer (signed 64-bit). apsw raises OverflowError for a
# larger Python int, so no row has a larger id.
MAX_INT64 = 2**63 - 1

_CHANNEL_COLUMNS = "id, name, owner_id, private, inserted_at"
_MESSAGE_SELECT = """
SELECT m.id, m.seq, m.channel_id, c.name, m.user_id, u.username, m.body,
       m.inserted_at
FROM messages AS m
JOIN channels AS c ON c.id = m.channel_id
JOIN users AS u ON u.id = m.user_id
"""


def _rows(conn: apsw.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _channel(row: tuple[Any, ...]) -> dict[str, Any]:
    channel_id, name, owner_id, private, inserted_at = row
    return {
        "id": channel_id,
        "name": name,
        "owner_id": owner_id,
        "private": bool(private),
        "inserted_at": inserted_at,
    }


def _message(row: tuple[Any, ...]) -> dict[str, Any]:
    message_id, seq, channel_id, channel, user_id, username, body, inserted_at = row
    return {
        "id": message_id,
        "seq": seq,
        "channel_id": channel_id,
        "channel": channel,
        "user_id": user_id,
        "username": username,
        "body": body,
        "inserted_at": inserted_at,
    }


def user_by_id(conn: apsw.Connection, user_id: int) -> dict[str, Any] | None:
    """Return `{id, username, email, inserted_at}` of a user, or None."""
    rows = _rows(
        conn,
        "SELECT id, username, email, inserted_at FROM users WHERE id = ?",
        (user_id,),
    )
    if not rows:
        return None
    user_id, username, email, inserted_at = rows[0]
    return {
        "id": user_id,
        "username": username,
        "email": email,
        "inserted_at": inserted_at,
    }


def user_for_login(conn: apsw.Connection, login: str) -> dict[str, Any] | None:
    """Return `{id, username, email, password_hash}` of the user `login` names.

    `login` matches a username or an email, ignoring ASCII case (the columns use
    NOCASE). When it could match two users, a login containing `@` prefers the
    email match and any other login prefers the username match.
    """
    columns = ("email", "username") if "@" in login else ("username", "email")
    for column in columns:
        rows = _rows(
            conn,
            f"SELECT id, username, email, password_hash FROM users WHERE {column} = ?",
            (login,),
        )
        if rows:
            user_id, username, email, password_hash = rows[0]
            return {
                "id": user_id,
                "username": username,
                "email": email,
                "password_hash": password_hash,
            }
    return None


def channel_by_id(conn: apsw.Connection, channel_id: int) -> dict[str, Any] | None:
    """Return a channel `{id, name, owner_id, private, inserted_at}`, or None."""
    if not 0 <= channel_id <= MAX_INT64:
        return None
    rows = _rows(
        conn, f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE id = ?", (channel_id,)
    )
    return _channel(rows[0]) if rows else None


def channel_by_name(conn: apsw.Connection, name: str) -> dict[str, Any] | None:
    """Return the channel called `name` (case-sensitive), or None."""
    rows = _rows(
        conn, f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE name = ?", (name,)
    )
    return _channel(rows[0]) if rows else None


def channel_names(conn: apsw.Connection, channel_ids: list[int]) -> dict[int, str]:
    """Return `{id: name}` of the channels among `channel_ids` that exist.

    The ids go in as one JSON array, so one query reads any number of them
    without reaching SQLite's limit on bound parameters.
    """
    rows = _rows(
        conn,
        "SELECT id, name FROM channels WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(channel_ids),),
    )
    return {channel_id: name for channel_id, name in rows}


def list_channels_for(conn: apsw.Connection, user_id: int) -> list[dict[str, Any]]:
    """Return the public channels and the private ones `user_id` belongs to, by id."""
    rows = _rows(
        conn,
        f"SELECT {_CHANNEL_COLUMNS} FROM channels AS c "
        "WHERE c.private = 0 OR EXISTS ("
        "SELECT 1 FROM channel_members AS cm "
        "WHERE cm.channel_id = c.id AND cm.user_id = ?) "
        "ORDER BY c.id",
        (user_id,),
    )
    return [_channel(row) for row in rows]


def is_member(conn: apsw.Connection, channel_id: int, user_id: int) -> bool:
    """Return whether `user_id` is a member of `channel_id`."""
    rows = _rows(
        conn,
        "SELECT 1 FROM channel_members WHERE channel_id = ? AND user_id = ?",
        (channel_id, user_id),
    )
    return bool(rows)


def messages_after(
    conn: apsw.Connection, channel_id: int, after_id: int, limit: int
) -> list[dict[str, Any]]:
    """Return up to `limit` messages of a channel with id above `after_id`.

    Messages come oldest first. Pass `after_id=0` to read from the first one.
    """
    if limit <= 0:
        return []
    rows = _rows(
        conn,
        _MESSAGE_SELECT + "WHERE m.channel_id = ? AND m.id > ? ORDER BY m.id LIMIT ?",
        (channel_id, after_id, limit),
    )
    return [_message(row) for row in rows]


def earliest_message_id(conn: apsw.Connection, channel_id: int) -> int | None:
    """Return the id of the oldest stored message of a channel, or None if empty."""
    rows = _rows(
        conn, "SELECT min(id) FROM messages WHERE channel_id = ?", (channel_id,)
    )
    value = rows[0][0] if rows else None
    return None if value is None else int(value)


def replay_window(
    conn: apsw.Connection,
    channel_id: int,
    *,
    after_id: int | None = None,
    after_seq: int | None = None,
    limit: int,
) -> dict[str, Any]:
    """Return what a join must replay after a client's last seen message.

    Exactly one of `after_id` and `after_seq` is given. The result, read in one
    transaction so that its parts agree, is:

    - `messages`: the newest `limit` messages after it, oldest first.
    - `complete`: whether `messages` contains every message after it, that is
      no more than `limit` are stored and retention deleted none of them.
    - `pruned`: whether retention deleted messages after it.
    - `last_seq`: the channel's newest seq (0 without messages).
    - `earliest_id` and `earliest_seq`: the oldest stored message, or None.
    """
    if (after_id is None) == (after_seq is None):
        raise ValueError("replay_window needs exactly one of after_id and after_seq")
    column, after = ("id", after_id) if after_id is not None else ("seq", after_seq)
    with conn:
        channel = _rows(
            conn,
            "SELECT last_seq, pruned_seq, pruned_id FROM channels WHERE id = ?",
            (channel_id,),
        )
        if not channel:
            raise LookupError(f"channel {channel_id} not found")
        last_seq, pruned_seq, pruned_id = channel[0]
        rows = _rows(
            conn,
            _MESSAGE_SELECT + f"WHERE m.channel_id = ? AND m.{column} > ? "
            f"ORDER BY m.{column} DESC LIMIT ?",
            (channel_id, after, limit + 1),
        )
        earliest = _rows(
            conn,
            "SELECT id, seq FROM messages WHERE channel_id = ? ORDER BY seq LIMIT 1",
            (channel_id,),
        )
    pruned = (pruned_id if column == "id" else pruned_seq) > after
    messages = [_message(row) for row in reversed(rows[:limit])]
    return {
        "messages": messages,
        "complete": len(rows) <= limit and not pruned,
        "pruned": pruned,
        "last_seq": int(last_seq),
        "earliest_id": earliest[0][0] if earliest else None,
        "earliest_seq": earliest[0][1] if earliest else None,
    }


def channel_retention(conn: apsw.Connection, channel_id: int) -> dict[str, Any] | None:
    """Return a channel's own retention limits (None where unset), or None."""
    rows = _rows(
        conn,
        "SELECT retention_max_messages, retention_max_age FROM channels WHERE id = ?",
        (channel_id,),
    )
    if not rows:
        return None
    max_messages, max_age = rows[0]
    return {"max_messages": max_messages, "max_age": max_age}


def is_token_revoked(conn: apsw.Connection, jti: str) -> bool:
    """Return whether the token id `jti` was recorded by `revoke_token`."""
    rows = _rows(conn, "SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,))
    return bool(rows)


def token_revocation(
    conn: apsw.Connection,
    jti: str,
    family_id: str | None,
    user_id: int,
    issued_at: int,
) -> str | None:
    """Return why a token was revoked, or None if it was not.

    The reasons are `revoked` (its `jti`), `family_revoked` (its refresh token
    family, after a reuse) and `revoked_all` (issued before a `revoke_all`
    cutoff of `user_id` or of every user).
    """
    rows = _rows(
        conn,
        "SELECT 'revoked' FROM revoked_tokens WHERE jti = ? "
        "UNION ALL SELECT 'family_revoked' FROM revoked_families "
        "WHERE family_id = ? "
        "UNION ALL SELECT 'revoked_all' FROM token_cutoffs "
        "WHERE user_id IN (0, ?) AND not_before > ? "
        "LIMIT 1",
        (jti, family_id, user_id, issued_at),
    )
    return str(rows[0][0]) if rows else None


class ReadPool:
    """Read-only connections lent to one worker thread at a time.

    At most `size` queries run at once. A call that is cancelled still waits
    for its thread to finish, so a connection is never used by two threads.
    """

    def __init__(self, connections: list[apsw.Connection]) -> None:
        if not connections:
            raise ValueError("ReadPool needs at least one connection")
        self.size = len(connections)
        self._idle_send, self._idle = trio.open_memory_channel[Any](self.size)
        for conn in connections:
            self._idle_send.send_nowait(conn)
        # Threads have their own limiter so that pools larger than trio's
        # default thread limit still run `size` queries at once.
        self._threads = trio.CapacityLimiter(self.size)
        self._closed = False
        DB_POOL_CONNECTIONS.inc(self.size)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in a worker thread with a borrowed connection."""
        try:
            conn = await self._idle.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("read pool is closed") from None
        DB_POOL_IN_USE.inc()
        start = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(fn, conn, *args, limiter=self._threads)
        finally:
            DB_QUERY_DURATION.labels(kind="read").observe(time.perf_counter() - start)
            DB_POOL_IN_USE.dec()
            if self._closed:
                conn.close()
            else:
                self._idle_send.send_nowait(conn)

    def close(self) -> None:
        """Close the idle connections now and borrowed ones when they come back."""
        if not self._closed:
            DB_POOL_CONNECTIONS.dec(self.size)
        self._closed = True
        self._idle_send.close()
        while True:
            try:
                conn = self._idle.receive_nowait()
            except trio.EndOfChannel:
                break
            conn.close()


@asynccontextmanager
async def open_read_pool(
    path: Path | str, size: int, *, busy_timeout_ms: int = 5000
) -> AsyncIterator[ReadPool]:
    """Open `size` read-only connections to `path` and yield them as a ReadPool.

    Raises StorageError if the database cannot be opened (see
    `open_read_connection`).
    """
    connections: list[apsw.Connection] = []
    try:
        for _ in range(size):
            conn = await trio.to_thread.run_sync(
                lambda: open_read_connection(path, busy_timeout_ms=busy_timeout_ms)
            )
            connections.append(conn)
    except BaseException:
        for conn in connections:
            conn.close()
        raise

    pool = ReadPool(connections)
    try:
        yield pool
    finally:
        pool.close()
