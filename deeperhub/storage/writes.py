"""Write operations of the DB writer, run in batches on one connection (sans-I/O).

`WriteExecutor.execute_batch` runs a list of `(op, args)` requests in one
`BEGIN IMMEDIATE` transaction (group commit). Each op runs inside its own
savepoint, so an op that fails is rolled back alone and the others still
commit. `execute_batch` does not raise for a failing op or a failed commit:
each failure becomes a `WriteOutcome` with an error code from the IPC contract
(`conflict`, `not_found`, `forbidden`, `invalid`, `reused`, `storage`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import apsw

from ..errors import StorageError
from .security_ops import SECURITY_WRITE_OPS, SecurityOp

__all__ = ["WRITE_OPS", "WriteExecutor", "WriteOutcome", "format_timestamp"]

log = logging.getLogger("deeperhub.db_writer")

WRITE_OPS = frozenset(
    {
        "register_user",
        "create_channel",
        "delete_channel",
        "add_member",
        "remove_member",
        "insert_message",
        "store_refresh_token",
        "use_refresh_token",
        "revoke_token",
        # Ops of token_writes.py.
        "update_password_hash",
        "revoke_all",
        "purge_expired_tokens",
        # Ops of security_ops.py.
        "security_block",
        "security_unblock",
        "security_save_scores",
        "security_record_alert",
        "alert_delivered",
        "alert_failed",
        "security_prune",
        # Ops of retention.py.
        "set_channel_retention",
        "prune_messages",
    }
)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UNIQUE_COLUMN = re.compile(r"UNIQUE constraint failed: \w+\.(\w+)")


def format_timestamp(moment: datetime) -> str:
    """Format `moment` as ISO 8601 UTC with microseconds and `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class WriteOutcome:
    """Outcome of one op: `result` on success, else `error` as (code, message).

    `events` are the bus events to publish once the batch has committed.
    """

    result: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    events: tuple[dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        """Outcome label for metrics: `ok` or the error code."""
        return "ok" if self.error is None else self.error[0]

    def to_reply(self, request_id: int) -> dict[str, Any]:
        """Build the IPC reply to request `request_id`."""
        if self.error is None:
            return {"id": request_id, "ok": True, "result": self.result}
        code, message = self.error
        return {
            "id": request_id,
            "ok": False,
            "error": {"code": code, "message": message},
        }


class _KeepChanges(StorageError):
    """An op error whose writes must still commit (refresh token reuse)."""


class _TransactionLost(Exception):
    """SQLite rolled back the whole transaction after a failed statement."""


class WriteExecutor:
    """Runs write ops on the DB writer's connection.

    The connection must have `foreign_keys=ON` and be used by one thread at a
    time. `clock` returns the current time for `inserted_at` (tests pass a fixed
    one).
    """

    def __init__(
        self, conn: apsw.Connection, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.conn = conn
        self.clock = clock
        self._ops: dict[str, Callable[[Mapping[str, Any]], WriteOutcome]] = {
            "register_user": self.register_user,
            "create_channel": self.create_channel,
            "delete_channel": self.delete_channel,
            "add_member": self.add_member,
            "remove_member": self.remove_member,
            "insert_message": self.insert_message,
            "store_refresh_token": self.store_refresh_token,
            "use_refresh_token": self.use_refresh_token,
            "revoke_token": self.revoke_token,
        }
        from . import token_writes  # imports this module, so not at the top

        for name, handler in token_writes.TOKEN_OPS.items():
            self._ops[name] = partial(handler, self)
        from .retention import RETENTION_OPS

        for name, handler in RETENTION_OPS.items():
            self._ops[name] = partial(handler, self)
        for name, op in SECURITY_WRITE_OPS.items():
            self._ops[name] = partial(self._run_security_op, op)

    def _run_security_op(self, op: SecurityOp, args: Mapping[str, Any]) -> WriteOutcome:
        return WriteOutcome(result=op(self.conn, args, self._now()))

    # Batches and savepoints.

    def execute_batch(
        self, requests: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[WriteOutcome]:
        """Run `(op, args)` requests in one transaction, one outcome per request.

        If the transaction cannot start, or SQLite rolls it back, or COMMIT
        fails (for example SQLITE_FULL), every request gets a `storage` error
        and no events, because nothing of the batch was committed.
        """
        if not requests:
            return []
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except apsw.Error as exc:
            return _all_failed(len(requests), f"cannot start a transaction: {exc}")

        outcomes: list[WriteOutcome] = []
        try:
            for op, args in requests:
                outcomes.append(self._run_in_savepoint(op, args))
        except (_TransactionLost, apsw.Error) as exc:
            # A savepoint could not be created or rolled back: give up the batch
            # rather than commit a transaction in an unknown state.
            self._rollback_if_open()
            return _all_failed(len(requests), f"transaction rolled back: {exc}")

        try:
            self.conn.execute("COMMIT")
        except apsw.Error as exc:
            self._rollback_if_open()
            return _all_failed(len(requests), f"commit failed: {exc}")
        return outcomes

    def _run_in_savepoint(self, op: str, args: Mapping[str, Any]) -> WriteOutcome:
        """Run one op in a savepoint, rolling back to it when the op fails."""
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error("invalid", f"unknown op {op}")
        if not isinstance(args, Mapping):
            return _error("invalid", f"invalid args for {op}: expected an object")

        self.conn.execute("SAVEPOINT op")
        try:
            outcome = handler(args)
        except _KeepChanges as exc:
            outcome = _error(exc.code, exc.message)
        except StorageError as exc:
            self._rollback_savepoint(op)
            return _error(exc.code, exc.message)
        except apsw.ConstraintError as exc:
            self._rollback_savepoint(op)
            return _constraint_outcome(exc)
        except apsw.Error as exc:
            self._rollback_savepoint(op)
            return _error("storage", f"{op} failed: {exc}")
        except Exception:
            # A bug must not stop the writer: report it and keep the batch going.
            log.exception("write op %s raised an unexpected error", op)
            self._rollback_savepoint(op)
            return _error("storage", f"{op} failed with an internal error")
        self.conn.execute("RELEASE op")
        return outcome

    def _rollback_savepoint(self, op: str) -> None:
        # SQLite rolls back the whole transaction after some errors (SQLITE_FULL,
        # SQLITE_IOERR, SQLITE_NOMEM), which also removes the savepoint.
        if self.conn.getautocommit():
            raise _TransactionLost(f"SQLite ended the transaction during {op}")
        self.conn.execute("ROLLBACK TO op")
        self.conn.execute("RELEASE op")

    def _rollback_if_open(self) -> None:
        if self.conn.getautocommit():
            return
        try:
            self.conn.execute("ROLLBACK")
        except apsw.Error as exc:
            log.error("rollback after a failed commit failed: %s", exc)

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # fetchall() runs every statement to completion, so none stays in
        # progress and blocks RELEASE or COMMIT.
        return self.conn.execute(sql, params).fetchall()

    def _row(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _insert(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run an `INSERT ... RETURNING id` and return the new id."""
        row = self._row(sql, params)
        if row is None:
            raise StorageError("storage", "INSERT returned no row")
        return int(row[0])

    def _now(self) -> str:
        return format_timestamp(self.clock())

    def _require_user(self, user_id: int) -> str:
        """Return the username of `user_id`, or raise `not_found`."""
        row = self._row("SELECT username FROM users WHERE id = ?", (user_id,))
        if row is None:
            raise StorageError("not_found", f"user {user_id} not found")
        return str(row[0])

    def _require_channel(self, channel_id: int) -> tuple[str, int]:
        """Return the name and owner id of `channel_id`, or raise `not_found`."""
        row = self._row(
            "SELECT name, owner_id FROM channels WHERE id = ?", (channel_id,)
        )
        if row is None:
            raise StorageError("not_found", f"channel {channel_id} not found")
        return str(row[0]), int(row[1])

    # Ops. Each validates its args, then raises StorageError for a failure.

    def register_user(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Insert a user. A taken username or email is a `conflict` naming it."""
        username = _str_arg(args, "username")
        email = _str_arg(args, "email")
        password_hash = _str_arg(args, "password_hash")

        # The columns compare with NOCASE, so these checks ignore ASCII case.
        if self._row("SELECT 1 FROM users WHERE username = ?", (username,)):
            raise StorageError("conflict", "username already taken")
        if self._row("SELECT 1 FROM users WHERE email = ?", (email,)):
            raise StorageError("conflict", "email already taken")

        inserted_at = self._now()
        user_id = self._insert(
            "INSERT INTO users (username, email, password_hash, inserted_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (username, email, password_hash, inserted_at),
        )
        user = {
            "id": user_id,
            "username": username,
            "email": email,
            "inserted_at": inserted_at,
        }
        return WriteOutcome(result={"user": user})

    def create_channel(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Insert a channel and make its owner a member."""
        name = _str_arg(args, "name")
        owner_id = _int_arg(args, "owner_id")
        private = _bool_arg(args, "private")

        self._require_user(owner_id)
        if self._row("SELECT 1 FROM channels WHERE name = ?", (name,)):
            raise StorageError("conflict", "channel name already taken")

        inserted_at = self._now()
        channel_id = self._insert(
            "INSERT INTO channels (name, owner_id, private, inserted_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (name, owner_id, int(private), inserted_at),
        )
        self._rows(
            "INSERT INTO channel_members (channel_id, user_id, inserted_at) "
            "VALUES (?, ?, ?)",
            (channel_id, owner_id, inserted_at),
        )
        channel = {
            "id": channel_id,
            "name": name,
            "owner_id": owner_id,
            "private": private,
            "inserted_at": inserted_at,
        }
        return WriteOutcome(result={"channel": channel})

    def delete_channel(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Delete a channel with its members and messages, if `user_id` owns it.

        The `channel_deleted` bus event makes every acceptor end the joins of
        the channel's topic.
        """
        channel_id = _int_arg(args, "channel_id")
        user_id = _int_arg(args, "user_id")

        name, owner_id = self._require_channel(channel_id)
        if owner_id != user_id:
            raise StorageError(
                "forbidden", f"only the owner can delete channel {channel_id}"
            )
        self._rows("DELETE FROM channels WHERE id = ?", (channel_id,))
        event = {
            "event": "channel_deleted",
            "channel_id": channel_id,
            "topic": f"channel:{name}",
        }
        return WriteOutcome(result={}, events=(event,))

    def add_member(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Add a user to a channel. Adding a member again changes nothing."""
        channel_id = _int_arg(args, "channel_id")
        user_id = _int_arg(args, "user_id")

        self._require_channel(channel_id)
        self._require_user(user_id)
        self._rows(
            "INSERT INTO channel_members (channel_id, user_id, inserted_at) "
            "VALUES (?, ?, ?) ON CONFLICT (channel_id, user_id) DO NOTHING",
            (channel_id, user_id, self._now()),
        )
        return WriteOutcome(result={})

    def remove_member(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Remove a user from a channel. Removing a non-member changes nothing."""
        channel_id = _int_arg(args, "channel_id")
        user_id = _int_arg(args, "user_id")

        self._require_channel(channel_id)
        self._require_user(user_id)
        self._rows(
            "DELETE FROM channel_members WHERE channel_id = ? AND user_id = ?",
            (channel_id, user_id),
        )
        return WriteOutcome(result={})

    def insert_message(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Store a message with the channel's next seq and return its bus event.

        Membership is not checked here: the acceptor authorizes the sender.
        """
        channel_id = _int_arg(args, "channel_id")
        user_id = _int_arg(args, "user_id")
        body = _str_arg(args, "body", allow_empty=True)

        username = self._require_user(user_id)
        row = self._row(
            "UPDATE channels SET last_seq = last_seq + 1 WHERE id = ? "
            "RETURNING last_seq, name",
            (channel_id,),
        )
        if row is None:
            raise StorageError("not_found", f"channel {channel_id} not found")
        seq, channel_name = row

        inserted_at = self._now()
        message_id = self._insert(
            "INSERT INTO messages (channel_id, seq, user_id, body, inserted_at) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            (channel_id, seq, user_id, body, inserted_at),
        )
        message = {
            "id": message_id,
            "seq": seq,
            "channel_id": channel_id,
            "channel": channel_name,
            "user_id": user_id,
            "username": username,
            "body": body,
            "inserted_at": inserted_at,
        }
        event = {
            "event": "message",
            "topic": f"channel:{channel_name}",
            "message": message,
        }
        return WriteOutcome(result={"message": message}, events=(event,))

    def store_refresh_token(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Record a newly issued refresh token of a token family."""
        jti = _str_arg(args, "jti")
        user_id = _int_arg(args, "user_id")
        family_id = _str_arg(args, "family_id")
        expires_at = _int_arg(args, "expires_at")

        self._require_user(user_id)
        if self._row("SELECT 1 FROM refresh_tokens WHERE jti = ?", (jti,)):
            raise StorageError("conflict", "refresh token jti already stored")
        # A reuse may have revoked the family while this token was being issued.
        if self._row(
            "SELECT 1 FROM revoked_families WHERE family_id = ?", (family_id,)
        ):
            raise StorageError("invalid", "refresh token family revoked")
        self._rows(
            "INSERT INTO refresh_tokens (jti, user_id, family_id, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (jti, user_id, family_id, expires_at),
        )
        return WriteOutcome(result={})

    def use_refresh_token(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Mark a refresh token used, once.

        A token presented a second time is `reused`, and every token of its
        family is revoked, because two parties then have the same token and
        one of them stole it. The revoked family goes to `revoked_families` and
        on the bus, so that access tokens of the family stop working too.
        Unknown, revoked and expired tokens are `invalid`, and so is a token
        whose optional `issued_at` is before a `revoke_all` cutoff of its user.
        A token presented again less than the optional `reuse_grace` seconds
        after its first use is `invalid` without revoking anything: that is a
        client sending concurrent refreshes, of which only the first wins.
        """
        jti = _str_arg(args, "jti")
        now = _int_arg(args, "now")
        issued_at = _int_arg(args, "issued_at") if "issued_at" in args else None
        reuse_grace = _int_arg(args, "reuse_grace") if "reuse_grace" in args else 0

        row = self._row(
            "SELECT user_id, family_id, expires_at, used_at, revoked_at "
            "FROM refresh_tokens WHERE jti = ?",
            (jti,),
        )
        if row is None:
            raise StorageError("invalid", "unknown or expired refresh token")
        user_id, family_id, expires_at, used_at, revoked_at = row

        if used_at is not None:
            if now - used_at < reuse_grace:
                raise StorageError("invalid", "refresh token already used")
            return self._revoke_family(family_id, now)
        revoked = self._row("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,))
        if revoked_at is not None or revoked:
            raise StorageError("invalid", "refresh token revoked")
        if issued_at is not None and self._row(
            "SELECT 1 FROM token_cutoffs WHERE user_id IN (0, ?) AND not_before > ?",
            (user_id, issued_at),
        ):
            raise StorageError("invalid", "refresh token revoked")
        if expires_at <= now:
            raise StorageError("invalid", "unknown or expired refresh token")

        self._rows("UPDATE refresh_tokens SET used_at = ? WHERE jti = ?", (now, jti))
        return WriteOutcome(result={"user_id": user_id, "family_id": family_id})

    def _revoke_family(self, family_id: str, now: int) -> WriteOutcome:
        """Revoke every token of a refresh token family after a reuse.

        Returns the `reused` error with its bus event, and the savepoint keeps
        the changes because this is a normal return.
        """
        self._rows(
            "UPDATE refresh_tokens SET revoked_at = ? "
            "WHERE family_id = ? AND revoked_at IS NULL",
            (now, family_id),
        )
        row = self._row(
            "SELECT max(expires_at) FROM refresh_tokens WHERE family_id = ?",
            (family_id,),
        )
        expires_at = int(row[0]) if row and row[0] is not None else now
        self._rows(
            "INSERT INTO revoked_families (family_id, expires_at) VALUES (?, ?) "
            "ON CONFLICT (family_id) DO UPDATE "
            "SET expires_at = max(expires_at, excluded.expires_at)",
            (family_id, expires_at),
        )
        event = {"event": "revoked", "families": [family_id]}
        return WriteOutcome(
            error=("reused", "refresh token already used"), events=(event,)
        )

    def revoke_token(self, args: Mapping[str, Any]) -> WriteOutcome:
        """Record a revoked token id until `expires_at`.

        Revoking the same jti again keeps one row with the later `expires_at`.
        """
        jti = _str_arg(args, "jti")
        expires_at = _int_arg(args, "expires_at")

        self._rows(
            "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) "
            "ON CONFLICT (jti) DO UPDATE "
            "SET expires_at = max(expires_at, excluded.expires_at)",
            (jti, expires_at),
        )
        return WriteOutcome(result={}, events=({"event": "revoked", "jtis": [jti]},))


def _error(code: str, message: str) -> WriteOutcome:
    return WriteOutcome(error=(code, message))


def _all_failed(count: int, message: str) -> list[WriteOutcome]:
    return [_error("storage", message) for _ in range(count)]


def _constraint_outcome(exc: apsw.ConstraintError) -> WriteOutcome:
    """Map a constraint error that slipped past the checks to an error outcome."""
    text = str(exc)
    match = _UNIQUE_COLUMN.search(text)
    if match:
        return _error("conflict", f"{match.group(1)} already taken")
    if "FOREIGN KEY" in text:
        return _error("not_found", "a referenced user or channel was not found")
    return _error("conflict", f"constraint failed: {text}")


# Argument checks. Each raises StorageError("invalid", ...) naming the argument.


def _arg(args: Mapping[str, Any], name: str) -> Any:
    if name not in args:
        raise StorageError("invalid", f"missing argument {name}")
    return args[name]


def _wrong_type(name: str, expected: str, value: Any) -> StorageError:
    return StorageError(
        "invalid",
        f"invalid argument {name}: expected {expected}, got {type(value).__name__}",
    )


def _int_arg(args: Mapping[str, Any], name: str) -> int:
    value = _arg(args, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise StorageError(
            "invalid", f"invalid argument {name}: {value} does not fit in 64 bits"
        )
    return value


def _str_arg(args: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = _arg(args, name)
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    if not value and not allow_empty:
        raise StorageError("invalid", f"invalid argument {name}: must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows lone surrogates such as "\ud800", which UTF-8 cannot encode.
        raise StorageError(
            "invalid", f"invalid argument {name}: not valid Unicode text"
        ) from None
    return value


def _bool_arg(args: Mapping[str, Any], name: str) -> bool:
    value = _arg(args, name)
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false", value)
    return value
