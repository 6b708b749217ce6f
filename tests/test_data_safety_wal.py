"""Start-up with a `-wal` left by a crash: replayed when it belongs to the file,
moved aside when the file was replaced (a manual restore)."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

from deeperhub.storage.database import check_integrity, open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.wal_guard import STATE_SUFFIX

if TYPE_CHECKING:
    from pathlib import Path

    import apsw


def _add_users(conn: apsw.Connection, names: list[str]) -> None:
    for name in names:
        conn.execute(
            "INSERT INTO users (username, email, password_hash, inserted_at) "
            "VALUES (?, ?, 'h', 't')",
            (name, f"{name}@example.com"),
        )


def _users(conn: apsw.Connection) -> list[str]:
    rows = conn.execute("SELECT username FROM users ORDER BY id").fetchall()
    return [str(row[0]) for row in rows]


def _crash_image(path: Path, target_dir: Path) -> Path:
    """Copy the database with its `-wal`, `-shm` and state file while it is open.

    The copy is what a kill -9 leaves on disk: nothing checkpointed at close.
    """
    target_dir.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm", STATE_SUFFIX):
        source = path.with_name(path.name + suffix)
        if source.exists():
            shutil.copy2(source, target_dir / source.name)
    return target_dir / path.name


def _live_database(tmp_path: Path) -> tuple[Path, apsw.Connection]:
    path = tmp_path / "live" / "deeper_hub.db"
    conn = open_write_connection(path)
    apply_migrations(conn)
    _add_users(conn, ["before"])
    return path, conn


def test_own_wal_is_replayed(tmp_path: Path) -> None:
    path, conn = _live_database(tmp_path)
    _add_users(conn, ["in_wal"])
    crashed = _crash_image(path, tmp_path / "crashed")
    conn.close()
    assert crashed.with_name(crashed.name + "-wal").stat().st_size > 32

    reopened = open_write_connection(crashed)
    try:
        assert _users(reopened) == ["before", "in_wal"]
    finally:
        reopened.close()
    assert not list(crashed.parent.glob("*.foreign-*"))


def test_foreign_wal_is_set_aside(tmp_path: Path) -> None:
    path, conn = _live_database(tmp_path)
    # The "backup": a consistent copy with one user.
    backup = tmp_path / "backup.db"
    conn.execute(f"VACUUM INTO '{backup}'")
    # Many later commits sit in the WAL when the process is killed.
    _add_users(conn, [f"later{index}" for index in range(200)])
    crashed = _crash_image(path, tmp_path / "crashed")
    conn.close()

    # The manual restore: the backup is copied over the database file, and
    # the stale -wal and -shm of the killed process stay next to it.
    shutil.copyfile(backup, crashed)

    reopened = open_write_connection(crashed)
    try:
        check_integrity(reopened, crashed, pragma="integrity_check")
        assert _users(reopened) == ["before"]
    finally:
        reopened.close()
    moved = list(crashed.parent.glob("deeper_hub.db-wal.foreign-*"))
    assert len(moved) == 1
    assert moved[0].stat().st_size > 32


def test_missing_state_file_trusts_wal(tmp_path: Path) -> None:
    path, conn = _live_database(tmp_path)
    _add_users(conn, ["in_wal"])
    crashed = _crash_image(path, tmp_path / "crashed")
    conn.close()
    crashed.with_name(crashed.name + STATE_SUFFIX).unlink()

    reopened = open_write_connection(crashed)
    try:
        assert _users(reopened) == ["before", "in_wal"]
    finally:
        reopened.close()


def test_checkpoint_updates_state(tmp_path: Path) -> None:
    path = tmp_path / "db" / "deeper_hub.db"
    conn = open_write_connection(path, checkpoint_pages=100)
    apply_migrations(conn)
    state_path = path.with_name(path.name + STATE_SUFFIX)
    first = json.loads(state_path.read_text())
    # Enough rows to pass 100 WAL pages, which triggers a checkpoint.
    conn.execute("CREATE TABLE filler (x BLOB)")
    for _ in range(150):
        conn.execute("INSERT INTO filler VALUES (zeroblob(4000))")
    second = json.loads(state_path.read_text())
    conn.close()
    assert first != second
    assert second["size"] > first["size"]
    assert "checkpointing" not in second
