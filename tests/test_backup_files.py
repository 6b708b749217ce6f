"""create_backup and restore_backup on real SQLite files, without a daemon."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from typing import TYPE_CHECKING

import apsw
import pytest

from deeperhub.errors import StorageError
from deeperhub.storage.backup import create_backup, list_backups, restore_backup
from deeperhub.storage.database import open_write_connection
from deeperhub.storage.migrations import apply_migrations

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Path, apsw.Connection]]:
    """A migrated database with one user, kept open like the DB writer keeps it."""
    path = tmp_path / "db" / "deeper_hub.db"
    conn = open_write_connection(path)
    apply_migrations(conn)
    _add_user(conn, "first")
    yield path, conn
    conn.close()


def _add_user(conn: apsw.Connection, name: str) -> None:
    conn.execute(
        "INSERT INTO users (username, email, password_hash, inserted_at) "
        "VALUES (?, ?, 'h', 't')",
        (name, f"{name}@example.com"),
    )


def _users(path: Path) -> list[str]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT username FROM users ORDER BY id").fetchall()
    finally:
        conn.close()
    return [str(row[0]) for row in rows]


def test_backup_is_private_checked_gzip(
    live: tuple[Path, apsw.Connection], tmp_path: Path
) -> None:
    path, _ = live
    result = create_backup(path, tmp_path / "backups", keep=3)
    backup = tmp_path / "backups" / os.path.basename(result.path)
    assert backup.name.startswith("deeper_hub-")
    assert backup.name.endswith(".db.gz")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "backups").stat().st_mode) == 0o700
    assert result.compressed_bytes == backup.stat().st_size

    plain = tmp_path / "plain.db"
    with gzip.open(backup, "rb") as source, plain.open("wb") as target:
        shutil.copyfileobj(source, target)
    assert _users(plain) == ["first"]
    # Only the finished backup is left in the folder.
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == [backup.name]


def test_backup_keeps_newest(
    live: tuple[Path, apsw.Connection], tmp_path: Path
) -> None:
    path, _ = live
    made = [create_backup(path, tmp_path / "b", keep=2).path for _ in range(4)]
    kept = [str(p) for p in list_backups(tmp_path / "b")]
    assert kept == made[-2:]


def test_backup_sees_committed_writes_only(
    live: tuple[Path, apsw.Connection], tmp_path: Path
) -> None:
    path, conn = live
    conn.execute("BEGIN IMMEDIATE")
    _add_user(conn, "uncommitted")
    result = create_backup(path, tmp_path / "b", keep=1)
    conn.execute("ROLLBACK")
    restored = tmp_path / "restored" / "deeper_hub.db"
    restore_backup(tmp_path / "b" / os.path.basename(result.path), restored)
    assert _users(restored) == ["first"]


def test_restore_moves_current_aside(
    live: tuple[Path, apsw.Connection], tmp_path: Path
) -> None:
    path, conn = live
    result = create_backup(path, tmp_path / "b", keep=1)
    _add_user(conn, "second")
    conn.close()

    restored = restore_backup(tmp_path / "b" / os.path.basename(result.path), path)
    assert _users(path) == ["first"]
    assert restored.previous is not None
    assert _users(path.with_name(os.path.basename(restored.previous))) == [
        "first",
        "second",
    ]
    assert restored.schema_version >= 3


@pytest.mark.parametrize("kind", ["truncated", "not_sqlite", "not_deeperhub"])
def test_restore_rejects_bad_file(
    live: tuple[Path, apsw.Connection], tmp_path: Path, kind: str
) -> None:
    path, conn = live
    good = create_backup(path, tmp_path / "b", keep=1).path
    bad = tmp_path / f"{kind}.db.gz"
    if kind == "truncated":
        data = (tmp_path / "b" / os.path.basename(good)).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "not_sqlite":
        bad.write_bytes(gzip.compress(b"hello" * 1000))
    else:
        other = apsw.Connection(str(tmp_path / "other.db"))
        other.execute("CREATE TABLE t (x)")
        other.close()
        bad.write_bytes(gzip.compress((tmp_path / "other.db").read_bytes()))
    conn.close()

    with pytest.raises(StorageError) as caught:
        restore_backup(bad, path)
    assert str(bad) in caught.value.message
    # The live database is untouched and nothing is left behind.
    assert _users(path) == ["first"]
    assert not list(path.parent.glob(".*restoring*"))


def test_restore_rejects_newer_schema(
    live: tuple[Path, apsw.Connection], tmp_path: Path
) -> None:
    path, conn = live
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) "
        "VALUES (999, 'future', 't')"
    )
    result = create_backup(path, tmp_path / "b", keep=1)
    with pytest.raises(StorageError, match="schema version 999"):
        restore_backup(tmp_path / "b" / os.path.basename(result.path), path)


def test_backup_of_missing_database_fails(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        create_backup(tmp_path / "none.db", tmp_path / "b", keep=1)


def test_backup_deletes_stale_partials(
    live: tuple[Path, apsw.Connection], tmp_path: Path
) -> None:
    path, _ = live
    dest = tmp_path / "b"
    dest.mkdir()
    stale = dest / ".deeper_hub-20200101T000000.000000Z.db.gz.partial"
    fresh = dest / ".deeper_hub-20200101T000001.000000Z.db.gz.partial"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (0, 0))

    create_backup(path, dest, keep=1)
    assert not stale.exists()
    assert fresh.exists()
