"""WriteExecutor: the write ops, their errors, and batches with savepoints."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import apsw
import pytest

from deeperhub.storage.database import open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.writes import WriteExecutor, WriteOutcome, format_timestamp

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

NOW = datetime(2026, 12, 4, 15, 40, 0, 123456, tzinfo=UTC)
NOW_TEXT = "2026-12-04T15:40:00.123456Z"


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[apsw.Connection]:
    connection = open_write_connection(tmp_path / "hub.db")
    apply_migrations(connection)
    yield connection
    connection.close()


@pytest.fixture
def executor(conn: apsw.Connection) -> WriteExecutor:
    return WriteExecutor(conn, clock=lambda: NOW)


def run(executor: WriteExecutor, op: str, **args: Any) -> WriteOutcome:
    """Run one op in a batch of its own."""
    (outcome,) = executor.execute_batch([(op, args)])
    return outcome


def ok(executor: WriteExecutor, op: str, **args: Any) -> dict[str, Any]:
    outcome = run(executor, op, **args)
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    return outcome.result


def add_user(executor: WriteExecutor, name: str) -> int:
    result = ok(
        executor,
        "register_user",
        username=name,
        email=f"{name}@example.com",
        password_hash="$argon2id$hash",
    )
    return int(result["user"]["id"])


def add_channel(
    executor: WriteExecutor, name: str, owner_id: int, private: bool = False
) -> int:
    result = ok(
        executor, "create_channel", name=name, owner_id=owner_id, private=private
    )
    return int(result["channel"]["id"])


def count(conn: apsw.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])


def test_format_timestamp_is_utc_with_microseconds() -> None:
    """Timestamps are ISO 8601 UTC with six fraction digits and Z."""
    assert format_timestamp(NOW) == NOW_TEXT


def test_register_user_returns_user(executor: WriteExecutor) -> None:
    """register_user returns the stored user without the password hash."""
    result = ok(
        executor,
        "register_user",
        username="Alice",
        email="alice@example.com",
        password_hash="$argon2id$hash",
    )

    assert result == {
        "user": {
            "id": 1,
            "username": "Alice",
            "email": "alice@example.com",
            "inserted_at": NOW_TEXT,
        }
    }


@pytest.mark.parametrize(
    ("username", "email", "message"),
    [
        ("ALICE", "other@example.com", "username already taken"),
        ("bob", "Alice@Example.COM", "email already taken"),
    ],
)
def test_register_user_conflict_names_field(
    executor: WriteExecutor, username: str, email: str, message: str
) -> None:
    """A username or email taken in any ASCII case is a conflict naming the field."""
    add_user(executor, "alice")

    outcome = run(
        executor, "register_user", username=username, email=email, password_hash="h"
    )

    assert outcome.error == ("conflict", message)
    assert outcome.result is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"email": "a@b.c", "password_hash": "h"}, "missing argument username"),
        (
            {"username": 5, "email": "a@b.c", "password_hash": "h"},
            "invalid argument username: expected a string, got int",
        ),
        (
            {"username": "", "email": "a@b.c", "password_hash": "h"},
            "invalid argument username: must not be empty",
        ),
        (
            {"username": "a\ud800", "email": "a@b.c", "password_hash": "h"},
            "invalid argument username: not valid Unicode text",
        ),
    ],
)
def test_register_user_invalid_args(
    executor: WriteExecutor, args: dict[str, Any], message: str
) -> None:
    """Missing or mistyped arguments are `invalid` naming the argument."""
    (outcome,) = executor.execute_batch([("register_user", args)])

    assert outcome.error == ("invalid", message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"name": "x", "owner_id": True, "private": False},
            "invalid argument owner_id: expected an integer, got bool",
        ),
        (
            {"name": "x", "owner_id": 1.0, "private": False},
            "invalid argument owner_id: expected an integer, got float",
        ),
        (
            {"name": "x", "owner_id": 2**70, "private": False},
            f"invalid argument owner_id: {2**70} does not fit in 64 bits",
        ),
        (
            {"name": "x", "owner_id": 1, "private": 1},
            "invalid argument private: expected true or false, got int",
        ),
    ],
)
def test_create_channel_invalid_args(
    executor: WriteExecutor, args: dict[str, Any], message: str
) -> None:
    """Booleans are not integers, integers are not booleans, ids fit in 64 bits."""
    add_user(executor, "alice")

    (outcome,) = executor.execute_batch([("create_channel", args)])

    assert outcome.error == ("invalid", message)


def test_create_channel_makes_owner_member(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    """create_channel returns `private` as a bool and adds the owner as member."""
    owner = add_user(executor, "alice")

    result = ok(executor, "create_channel", name="ops", owner_id=owner, private=True)

    assert result == {
        "channel": {
            "id": 1,
            "name": "ops",
            "owner_id": owner,
            "private": True,
            "inserted_at": NOW_TEXT,
        }
    }
    members = conn.execute("SELECT channel_id, user_id FROM channel_members")
    assert members.fetchall() == [(1, owner)]


def test_create_channel_errors(executor: WriteExecutor) -> None:
    """A taken name is a conflict, and an unknown owner is not_found."""
    owner = add_user(executor, "alice")
    add_channel(executor, "ops", owner)

    name_taken = run(
        executor, "create_channel", name="ops", owner_id=owner, private=False
    )
    no_owner = run(executor, "create_channel", name="new", owner_id=99, private=False)

    assert name_taken.error == ("conflict", "channel name already taken")
    assert no_owner.error == ("not_found", "user 99 not found")


def test_delete_channel_by_owner_cascades(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    """Only the owner deletes a channel, which removes its members and messages."""
    owner = add_user(executor, "alice")
    other = add_user(executor, "bob")
    channel = add_channel(executor, "ops", owner)
    ok(executor, "add_member", channel_id=channel, user_id=other)
    ok(executor, "insert_message", channel_id=channel, user_id=other, body="hi")

    forbidden = run(executor, "delete_channel", channel_id=channel, user_id=other)
    deleted = run(executor, "delete_channel", channel_id=channel, user_id=owner)
    missing = run(executor, "delete_channel", channel_id=channel, user_id=owner)

    assert forbidden.error == (
        "forbidden",
        f"only the owner can delete channel {channel}",
    )
    assert deleted.result == {}
    assert deleted.events == (
        {"event": "channel_deleted", "channel_id": channel, "topic": "channel:ops"},
    )
    assert forbidden.events == ()
    assert missing.error == ("not_found", f"channel {channel} not found")
    assert count(conn, "channels") == 0
    assert count(conn, "channel_members") == 0
    assert count(conn, "messages") == 0


def test_channel_ids_are_not_reused(executor: WriteExecutor) -> None:
    """A channel created after the highest-id channel was deleted gets a new id."""
    owner = add_user(executor, "alice")
    add_channel(executor, "first", owner)
    newest = add_channel(executor, "second", owner)

    ok(executor, "delete_channel", channel_id=newest, user_id=owner)
    recreated = add_channel(executor, "second", owner)

    assert recreated == newest + 1


def test_message_ids_are_not_reused(executor: WriteExecutor) -> None:
    """A message stored after the newest one was deleted gets a new id."""
    owner = add_user(executor, "alice")
    remaining = add_channel(executor, "remaining", owner)
    dropped = add_channel(executor, "dropped", owner)
    ok(executor, "insert_message", channel_id=remaining, user_id=owner, body="a")
    newest = ok(
        executor, "insert_message", channel_id=dropped, user_id=owner, body="b"
    )["message"]["id"]

    ok(executor, "delete_channel", channel_id=dropped, user_id=owner)
    message = ok(
        executor, "insert_message", channel_id=remaining, user_id=owner, body="c"
    )

    assert message["message"]["id"] == newest + 1


def test_membership_ops_are_idempotent(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    """Adding or removing a member twice gives the same result as once."""
    owner = add_user(executor, "alice")
    other = add_user(executor, "bob")
    channel = add_channel(executor, "ops", owner)

    for _ in range(2):
        assert ok(executor, "add_member", channel_id=channel, user_id=other) == {}
    assert count(conn, "channel_members") == 2

    for _ in range(2):
        assert ok(executor, "remove_member", channel_id=channel, user_id=other) == {}
    assert count(conn, "channel_members") == 1


def test_membership_ops_not_found(executor: WriteExecutor) -> None:
    """Membership ops on an unknown channel or user are not_found."""
    owner = add_user(executor, "alice")
    channel = add_channel(executor, "ops", owner)

    for op in ("add_member", "remove_member"):
        no_channel = run(executor, op, channel_id=42, user_id=owner)
        no_user = run(executor, op, channel_id=channel, user_id=42)
        assert no_channel.error == ("not_found", "channel 42 not found")
        assert no_user.error == ("not_found", "user 42 not found")


def test_insert_message_result_and_event(executor: WriteExecutor) -> None:
    """insert_message returns the message and a bus event carrying the same object."""
    owner = add_user(executor, "alice")
    channel = add_channel(executor, "ops", owner)

    outcome = run(
        executor, "insert_message", channel_id=channel, user_id=owner, body=""
    )

    message = {
        "id": 1,
        "seq": 1,
        "channel_id": channel,
        "channel": "ops",
        "user_id": owner,
        "username": "alice",
        "body": "",
        "inserted_at": NOW_TEXT,
    }
    assert outcome.result == {"message": message}
    assert outcome.events == (
        {"event": "message", "topic": "channel:ops", "message": message},
    )


def test_insert_message_seq_per_channel(executor: WriteExecutor) -> None:
    """Each channel numbers its messages 1, 2, 3... independently of the others."""
    owner = add_user(executor, "alice")
    first = add_channel(executor, "one", owner)
    second = add_channel(executor, "two", owner)

    requests = [
        ("insert_message", {"channel_id": channel, "user_id": owner, "body": "m"})
        for channel in (first, second, first, first, second)
    ]
    outcomes = executor.execute_batch(requests)

    seqs = [(o.result or {})["message"]["seq"] for o in outcomes]
    ids = [(o.result or {})["message"]["id"] for o in outcomes]
    assert seqs == [1, 1, 2, 3, 2]
    assert ids == [1, 2, 3, 4, 5]


def test_insert_message_not_found(executor: WriteExecutor) -> None:
    """An unknown channel or user is not_found and publishes nothing."""
    owner = add_user(executor, "alice")
    channel = add_channel(executor, "ops", owner)

    no_channel = run(executor, "insert_message", channel_id=9, user_id=owner, body="x")
    no_user = run(executor, "insert_message", channel_id=channel, user_id=9, body="x")

    assert no_channel.error == ("not_found", "channel 9 not found")
    assert no_channel.events == ()
    assert no_user.error == ("not_found", "user 9 not found")


def test_refresh_token_rotation(executor: WriteExecutor, conn: apsw.Connection) -> None:
    """A refresh token works once. Reuse is `reused` and revokes its family."""
    user = add_user(executor, "alice")
    ok(
        executor,
        "store_refresh_token",
        jti="a",
        user_id=user,
        family_id="f",
        expires_at=200,
    )
    ok(
        executor,
        "store_refresh_token",
        jti="b",
        user_id=user,
        family_id="f",
        expires_at=200,
    )

    first = run(executor, "use_refresh_token", jti="a", now=100)
    again = run(executor, "use_refresh_token", jti="a", now=101)
    sibling = run(executor, "use_refresh_token", jti="b", now=102)

    assert first.result == {"user_id": user, "family_id": "f"}
    assert again.error == ("reused", "refresh token already used")
    assert sibling.error == ("invalid", "refresh token revoked")
    revoked = conn.execute("SELECT jti, revoked_at FROM refresh_tokens ORDER BY jti")
    assert revoked.fetchall() == [("a", 101), ("b", 101)]


def test_refresh_token_invalid_cases(executor: WriteExecutor) -> None:
    """Unknown, expired and explicitly revoked refresh tokens are `invalid`."""
    user = add_user(executor, "alice")
    ok(
        executor,
        "store_refresh_token",
        jti="old",
        user_id=user,
        family_id="f",
        expires_at=50,
    )
    ok(
        executor,
        "store_refresh_token",
        jti="out",
        user_id=user,
        family_id="g",
        expires_at=500,
    )
    ok(executor, "revoke_token", jti="out", expires_at=500)

    unknown = run(executor, "use_refresh_token", jti="nope", now=100)
    expired = run(executor, "use_refresh_token", jti="old", now=100)
    revoked = run(executor, "use_refresh_token", jti="out", now=100)

    assert unknown.error == ("invalid", "unknown or expired refresh token")
    assert expired.error == ("invalid", "unknown or expired refresh token")
    assert revoked.error == ("invalid", "refresh token revoked")


def test_store_refresh_token_errors(executor: WriteExecutor) -> None:
    """A duplicate jti is a conflict, and an unknown user is not_found."""
    user = add_user(executor, "alice")
    args = {"jti": "a", "user_id": user, "family_id": "f", "expires_at": 10}
    ok(executor, "store_refresh_token", **args)

    duplicate = run(executor, "store_refresh_token", **args)
    no_user = run(executor, "store_refresh_token", **{**args, "jti": "b", "user_id": 7})

    assert duplicate.error == ("conflict", "refresh token jti already stored")
    assert no_user.error == ("not_found", "user 7 not found")


def test_revoke_token_is_idempotent(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    """Revoking again keeps one row with the later expiry."""
    ok(executor, "revoke_token", jti="t", expires_at=300)
    ok(executor, "revoke_token", jti="t", expires_at=200)

    rows = conn.execute("SELECT jti, expires_at FROM revoked_tokens").fetchall()
    assert rows == [("t", 300)]


def test_batch_failing_op_keeps_others(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    """In one batch, a conflicting op is rolled back alone and the rest commit."""
    requests: list[tuple[str, Any]] = [
        ("register_user", {"username": "a", "email": "a@x", "password_hash": "h"}),
        ("register_user", {"username": "A", "email": "b@x", "password_hash": "h"}),
        ("register_user", {"username": "c", "email": "c@x", "password_hash": "h"}),
        ("frobnicate", {}),
        ("register_user", ["not", "an", "object"]),
        (None, {}),
    ]

    outcomes = executor.execute_batch(requests)

    assert [o.label for o in outcomes] == [
        "ok",
        "conflict",
        "ok",
        "invalid",
        "invalid",
        "invalid",
    ]
    assert outcomes[3].error == ("invalid", "unknown op frobnicate")
    assert outcomes[4].error == (
        "invalid",
        "invalid args for register_user: expected an object",
    )
    names = conn.execute("SELECT username FROM users ORDER BY id").fetchall()
    assert names == [("a",), ("c",)]
    assert conn.getautocommit()


def test_batch_statement_full_fails_op(
    executor: WriteExecutor, conn: apsw.Connection
) -> None:
    """SQLITE_FULL in one op fails that op, and what is reported ok is stored.

    SQLite may roll back only the statement or the whole transaction after
    SQLITE_FULL, so the other ops are either all `ok` or all `storage`.
    """
    owner = add_user(executor, "alice")
    channel = add_channel(executor, "ops", owner)
    pages = conn.execute("PRAGMA page_count").fetchall()[0][0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    small = {"channel_id": channel, "user_id": owner, "body": "hi"}
    huge = {"channel_id": channel, "user_id": owner, "body": "x" * 200_000}
    outcomes = executor.execute_batch(
        [("insert_message", small), ("insert_message", huge), ("insert_message", small)]
    )

    labels = [o.label for o in outcomes]
    assert labels in (["ok", "storage", "ok"], ["storage"] * 3)
    assert outcomes[1].events == ()
    assert count(conn, "messages") == labels.count("ok")
    assert conn.getautocommit()


class FullDiskVFS(apsw.VFS):
    """A pass-through VFS whose writes fail with SQLITE_FULL while `full` is set."""

    def __init__(self, name: str) -> None:
        self.full = False
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: Any) -> apsw.VFSFile:  # noqa: N802 (apsw API)
        return FullDiskFile(self, name, flags)


class FullDiskFile(apsw.VFSFile):
    def __init__(self, vfs: FullDiskVFS, name: Any, flags: Any) -> None:
        self.vfs = vfs
        super().__init__("", name, flags)

    def xWrite(self, data: bytes, offset: int) -> None:  # noqa: N802 (apsw API)
        if self.vfs.full:
            raise apsw.FullError("disk full (test VFS)")
        super().xWrite(data, offset)


def test_batch_commit_failure_reports_storage(tmp_path: Path) -> None:
    """When COMMIT fails with SQLITE_FULL, no op is reported committed."""
    vfs = FullDiskVFS("full_disk_test")
    conn = apsw.Connection(str(tmp_path / "full.db"), vfs="full_disk_test")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    apply_migrations(conn)
    executor = WriteExecutor(conn, clock=lambda: NOW)
    owner = add_user(executor, "alice")
    channel = add_channel(executor, "ops", owner)

    # Statements only change cached pages; the first file write is the commit.
    vfs.full = True
    message = {"channel_id": channel, "user_id": owner, "body": "hi"}
    outcomes = executor.execute_batch([("insert_message", message)] * 3)
    vfs.full = False

    assert [o.label for o in outcomes] == ["storage"] * 3
    assert all(o.error and "commit failed" in o.error[1] for o in outcomes)
    assert all(o.events == () for o in outcomes)
    assert count(conn, "messages") == 0
    assert conn.getautocommit()

    # The connection is usable again once the disk has room.
    retry = run(executor, "insert_message", **message)
    assert retry.result is not None
    assert retry.result["message"]["seq"] == 1
    conn.close()
    vfs.unregister()


def test_batch_empty() -> None:
    """An empty batch runs nothing and needs no connection."""
    executor = WriteExecutor(None)  # type: ignore[arg-type]

    assert executor.execute_batch([]) == []


def test_outcome_to_reply() -> None:
    """Outcomes become IPC replies with `result` or `error`."""
    good = WriteOutcome(result={"x": 1})
    bad = WriteOutcome(error=("not_found", "user 3 not found"))

    assert good.to_reply(7) == {"id": 7, "ok": True, "result": {"x": 1}}
    assert bad.to_reply(8) == {
        "id": 8,
        "ok": False,
        "error": {"code": "not_found", "message": "user 3 not found"},
    }
