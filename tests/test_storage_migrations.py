"""Schema migrations and the opening of SQLite connections."""

from __future__ import annotations

import re
import stat
from typing import TYPE_CHECKING, Any

import apsw
import pytest

from deeperhub.errors import StorageError
from deeperhub.storage.database import open_read_connection, open_write_connection
from deeperhub.storage.migrations import (
    MIGRATIONS,
    applied_versions,
    apply_migrations,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ALL_VERSIONS = sorted(version for version, _, _ in MIGRATIONS)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "deeper_hub.db"


@pytest.fixture
def conn(db_path: Path) -> Iterator[apsw.Connection]:
    connection = open_write_connection(db_path)
    yield connection
    connection.close()


def _tables(conn: apsw.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
    return {name for (name,) in rows.fetchall()}


def _pragma(conn: apsw.Connection, name: str) -> object:
    return conn.execute(f"PRAGMA {name}").fetchall()[0][0]


def test_migrations_create_schema_and_record_versions(conn: apsw.Connection) -> None:
    """A fresh database gets every table and one ledger row per migration."""
    applied = apply_migrations(conn)

    assert applied == [version for version, _, _ in MIGRATIONS]
    assert {
        "users",
        "channels",
        "channel_members",
        "messages",
        "refresh_tokens",
        "revoked_tokens",
        "schema_migrations",
    } <= _tables(conn)
    rows = conn.execute(
        "SELECT version, name, applied_at FROM schema_migrations"
    ).fetchall()
    assert [(version, name) for version, name, _ in rows] == [
        (version, name) for version, name, _ in MIGRATIONS
    ]
    assert TIMESTAMP.match(rows[0][2])


def test_migrations_second_run_applies_nothing(conn: apsw.Connection) -> None:
    """Applying twice leaves one row per version and changes nothing."""
    apply_migrations(conn)
    schema_before = conn.execute("SELECT sql FROM sqlite_schema").fetchall()

    assert apply_migrations(conn) == []
    assert applied_versions(conn) == ALL_VERSIONS
    assert conn.execute("SELECT sql FROM sqlite_schema").fetchall() == schema_before


def test_migrations_survive_reopening(db_path: Path) -> None:
    """A new connection to a migrated file finds nothing left to apply."""
    first = open_write_connection(db_path)
    apply_migrations(first)
    first.close()

    second = open_write_connection(db_path)
    assert apply_migrations(second) == []
    assert applied_versions(second) == ALL_VERSIONS
    second.close()


def test_failed_migration_keeps_earlier_ones(conn: apsw.Connection) -> None:
    """A failing migration is rolled back alone, and earlier ones stay recorded."""
    migrations = [
        (1, "first", "CREATE TABLE first_table (x INTEGER)"),
        (2, "broken", "CREATE TABLE half_done (x INTEGER); CREATE TABLE broken ("),
    ]

    with pytest.raises(StorageError, match=r"migration 2 \(broken\) failed"):
        apply_migrations(conn, migrations)

    assert applied_versions(conn) == [1]
    assert "first_table" in _tables(conn)
    assert "half_done" not in _tables(conn)
    assert conn.getautocommit()


def test_migrations_reject_newer_database(conn: apsw.Connection) -> None:
    """A database recording an unknown later version is not touched."""
    apply_migrations(conn)
    conn.execute(
        "INSERT INTO schema_migrations VALUES (99, 'from the future', '2030-01-01')"
    )

    with pytest.raises(StorageError, match="schema version 99 is newer"):
        apply_migrations(conn)


def test_schema_enforces_foreign_keys(conn: apsw.Connection) -> None:
    """foreign_keys is on, so a message needs an existing channel."""
    apply_migrations(conn)

    with pytest.raises(apsw.ConstraintError):
        conn.execute(
            "INSERT INTO messages (channel_id, seq, user_id, body, inserted_at) "
            "VALUES (1, 1, 1, 'x', 'now')"
        )


def test_write_connection_pragmas(db_path: Path) -> None:
    """The writer uses WAL, foreign keys, the given synchronous and busy timeout."""
    conn = open_write_connection(db_path, synchronous="normal", busy_timeout_ms=1234)

    assert _pragma(conn, "journal_mode") == "wal"
    assert _pragma(conn, "foreign_keys") == 1
    assert _pragma(conn, "synchronous") == 1  # NORMAL
    assert _pragma(conn, "busy_timeout") == 1234
    conn.close()

    conn = open_write_connection(db_path)
    assert _pragma(conn, "synchronous") == 2  # FULL
    conn.close()


def test_write_connection_creates_private_file(db_path: Path) -> None:
    """A new database file and its folder are readable by the owner only."""
    open_write_connection(db_path).close()

    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


def test_write_connection_rejects_bad_synchronous(db_path: Path) -> None:
    """An unknown synchronous level is an error naming the value."""
    with pytest.raises(StorageError, match="invalid synchronous level 'off'"):
        open_write_connection(db_path, synchronous="off")


def test_write_connection_rejects_non_database(db_path: Path) -> None:
    """A file that is not SQLite fails at open with the file name."""
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"not a database at all " * 100)

    with pytest.raises(StorageError, match=re.escape(str(db_path))):
        open_write_connection(db_path)


def test_write_connection_rejects_corrupt_database(db_path: Path) -> None:
    """A damaged b-tree page fails PRAGMA quick_check, naming the file."""
    conn = open_write_connection(db_path)
    conn.execute("CREATE TABLE t (x TEXT); CREATE INDEX t_x ON t (x)")
    with conn:
        for i in range(2000):
            conn.execute("INSERT INTO t VALUES (?)", (str(i) * 20,))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    page_size = 4096
    with db_path.open("r+b") as handle:
        handle.seek(page_size * 3 + 8)
        handle.write(b"\xff" * 64)

    with pytest.raises(StorageError) as caught:
        open_write_connection(db_path)

    assert "failed PRAGMA quick_check" in caught.value.message
    assert str(db_path) in caught.value.message


def test_read_connection_is_read_only(db_path: Path) -> None:
    """A read connection reads the data but cannot write."""
    writer = open_write_connection(db_path)
    apply_migrations(writer)
    reader = open_read_connection(db_path, busy_timeout_ms=250)

    assert _pragma(reader, "query_only") == 1
    assert _pragma(reader, "busy_timeout") == 250
    assert reader.execute("SELECT count(*) FROM users").fetchall() == [(0,)]
    with pytest.raises(apsw.ReadOnlyError):
        reader.execute("DELETE FROM users")
    reader.close()
    writer.close()


def test_read_connection_missing_file(tmp_path: Path) -> None:
    """Opening a database that does not exist read-only is a StorageError."""
    missing = tmp_path / "missing.db"

    with pytest.raises(StorageError, match="read-only"):
        open_read_connection(missing)
    assert not missing.exists()


def _insert_v4_data(conn: apsw.Connection) -> None:
    """Fill a version 4 database with users, channels, members and messages."""
    conn.execute(
        "INSERT INTO users VALUES (1, 'alice', 'a@example.com', 'h', 't'), "
        "(2, 'bob', 'b@example.com', 'h', 't')"
    )
    conn.execute(
        "INSERT INTO channels (id, name, owner_id, private, last_seq, inserted_at, "
        "retention_max_messages, retention_max_age, pruned_seq, pruned_id) VALUES "
        "(3, 'ops', 1, 0, 2, 't1', NULL, NULL, 0, 0), "
        "(7, 'dev', 2, 1, 1, 't2', 100, 3600, 4, 9), "
        "(9, 'top', 1, 0, 0, 't3', 0, NULL, 0, 0)"
    )
    conn.execute(
        "INSERT INTO channel_members VALUES (3, 1, 't'), (3, 2, 't'), (7, 2, 't'), "
        "(9, 1, 't')"
    )
    conn.execute(
        "INSERT INTO messages (id, channel_id, seq, user_id, body, inserted_at) "
        "VALUES (10, 3, 1, 1, 'a', 't'), (11, 3, 2, 2, 'b', 't'), "
        "(12, 7, 1, 2, 'c', 't')"
    )


def _dump(conn: apsw.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("users", "channels", "channel_members", "messages")
    return {
        table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
        for table in tables
    }


def _schema_details(conn: apsw.Connection) -> dict[str, object]:
    """Return the columns, indexes and foreign keys that the rebuild must keep."""
    indexes = conn.execute(
        "SELECT name, tbl_name, sql FROM sqlite_schema WHERE type = 'index' "
        "ORDER BY name"
    ).fetchall()
    return {
        "columns": conn.execute("PRAGMA table_info(channels)").fetchall(),
        "indexes": indexes,
        "triggers": conn.execute(
            "SELECT name FROM sqlite_schema WHERE type IN ('trigger', 'view')"
        ).fetchall(),
        **{
            f"fk_{table}": conn.execute(f"PRAGMA foreign_key_list({table})").fetchall()
            for table in ("channels", "channel_members", "messages")
        },
    }


def test_channel_autoincrement_migration_keeps_data(conn: apsw.Connection) -> None:
    """Migration 5 keeps rows, indexes and foreign keys, and ids continue above max."""
    apply_migrations(conn, [m for m in MIGRATIONS if m[0] <= 4])
    _insert_v4_data(conn)
    rows_before = _dump(conn)
    schema_before = _schema_details(conn)

    assert apply_migrations(conn) == [5]

    assert _dump(conn) == rows_before
    assert _schema_details(conn) == schema_before
    assert _pragma(conn, "foreign_keys") == 1
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert "channels_autoincrement" not in _tables(conn)
    sql = conn.execute(
        "SELECT sql FROM sqlite_schema WHERE name = 'channels'"
    ).fetchall()[0][0]
    assert "AUTOINCREMENT" in sql

    # The highest id is deleted, and the next channel still gets a new one.
    conn.execute("DELETE FROM channels WHERE id = 9")
    conn.execute(
        "INSERT INTO channels (name, owner_id, inserted_at) VALUES ('n', 1, 't')"
    )
    assert conn.execute("SELECT max(id) FROM channels").fetchall() == [(10,)]

    # The child tables still cascade from the rebuilt table.
    conn.execute("DELETE FROM channels WHERE id = 3")
    assert conn.execute("SELECT count(*) FROM messages").fetchall() == [(1,)]
    members = conn.execute("SELECT channel_id FROM channel_members ORDER BY 1")
    assert members.fetchall() == [(7,)]


def test_migration_with_dangling_reference_fails(conn: apsw.Connection) -> None:
    """A migration that leaves a row without its parent is rolled back."""
    apply_migrations(conn)
    migrations = [
        *MIGRATIONS,
        (6, "orphan", "INSERT INTO channel_members VALUES (99, 99, 't')"),
    ]

    with pytest.raises(
        StorageError, match=r"migration 6 \(orphan\) failed: 2 foreign key"
    ):
        apply_migrations(conn, migrations)

    assert applied_versions(conn) == ALL_VERSIONS
    assert conn.execute("SELECT count(*) FROM channel_members").fetchall() == [(0,)]
    assert _pragma(conn, "foreign_keys") == 1
    assert conn.getautocommit()
