"""Opening SQLite connections for the DB writer and for readers.

An apsw connection may be used from any thread, but by one thread at a time:
the DB writer has a single writer task, and `ReadPool` lends each read
connection to one call at a time.

The DB writer's connection checkpoints the WAL itself (`wal_guard.py`), which
lets start-up tell a `-wal` file of this database from one left over by the
file a restore replaced.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import apsw

from ..errors import StorageError
from . import wal_guard

__all__ = ["check_integrity", "open_read_connection", "open_write_connection"]

log = logging.getLogger("deeperhub.db_writer")

_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
# Companion files that SQLite keeps next to a database in WAL mode.
_COMPANION_SUFFIXES = ("-wal", "-shm")


def open_write_connection(
    path: Path | str,
    *,
    synchronous: str = "full",
    busy_timeout_ms: int = 5000,
    checkpoint_pages: int = wal_guard.DEFAULT_CHECKPOINT_PAGES,
) -> apsw.Connection:
    """Open the read-write connection of the DB writer, creating the file if needed.

    The connection uses WAL mode, `foreign_keys=ON`, the given `synchronous`
    level (`full` or `normal`, the `database.synchronous` setting) and busy
    timeout, and checkpoints the WAL after `checkpoint_pages` pages. A `-wal`
    file that belongs to another file (see `wal_guard`) is moved aside first.
    A new file and its folder are created readable by the owner only, because
    the database stores password hashes, and an existing file, `-wal` or `-shm`
    that the group or others may access is made owner-only (0600) with a warning.
    Raises StorageError when the file cannot be opened or fails
    `PRAGMA quick_check`.
    """
    path = Path(path)
    level = _SYNCHRONOUS.get(synchronous.lower())
    if level is None:
        raise StorageError(
            "storage",
            f"invalid synchronous level {synchronous!r}: expected full or normal",
        )
    _create_private_file(path)
    for file in (path, *(Path(f"{path}{suffix}") for suffix in _COMPANION_SUFFIXES)):
        _tighten_mode(file)
    wal_guard.set_aside_foreign_wal(path)

    try:
        conn = apsw.Connection(
            str(path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        )
    except apsw.Error as exc:
        raise StorageError("storage", f"cannot open database {path}: {exc}") from exc

    try:
        conn.setbusytimeout(busy_timeout_ms)
        check_integrity(conn, path)
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0]
        if str(mode).lower() != "wal":
            raise StorageError(
                "storage",
                f"cannot switch database {path} to WAL mode (journal_mode is "
                f"{mode}): put the file on a local file system",
            )
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {level}")
        wal_guard.install(conn, path, checkpoint_pages)
    except (apsw.CorruptError, apsw.NotADBError) as exc:
        conn.close()
        raise StorageError(
            "storage",
            f"database {path} is corrupt ({exc}): stop DeeperHub and restore the "
            "file from a backup with `bin/deeperhub restore FILE`, or salvage it "
            "with the sqlite3 shell's `.recover` command",
        ) from exc
    except apsw.Error as exc:
        conn.close()
        raise StorageError("storage", f"cannot open database {path}: {exc}") from exc
    except StorageError:
        conn.close()
        raise
    return conn


def open_read_connection(
    path: Path | str, *, busy_timeout_ms: int = 5000
) -> apsw.Connection:
    """Open a read-only connection (`SQLITE_OPEN_READONLY` and `query_only=ON`).

    Raises StorageError when the file does not exist yet (the DB writer creates
    it at start) or cannot be opened.
    """
    path = Path(path)
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise StorageError(
            "storage",
            f"cannot open database {path} read-only: {exc} (the DB writer creates "
            "it at start)",
        ) from exc

    try:
        conn.setbusytimeout(busy_timeout_ms)
        conn.execute("PRAGMA query_only = ON")
    except apsw.Error as exc:
        conn.close()
        raise StorageError(
            "storage", f"cannot open database {path} read-only: {exc}"
        ) from exc
    return conn


def _create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600, and its folder with 0700, if missing.

    SQLite treats an empty file as an empty database, and gives the `-wal` and
    `-shm` files the permissions of the main file.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(
            "storage", f"cannot create database {path}: {exc.strerror}"
        ) from exc
    os.close(fd)


def _tighten_mode(path: Path) -> None:
    """Make `path` owner-only (at most 0600) when the group or others may access it.

    A database copied into place by hand (a manual restore) gets its mode from
    the copier's umask, often 0644, which lets every local user read the
    password hashes. SQLite gives new `-wal` and `-shm` files the mode of the
    database file, so tightening the database also covers them from then on.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(
            "storage", f"cannot read the permissions of {path}: {exc.strerror}"
        ) from exc
    if not mode & 0o077:
        return
    private = mode & 0o600
    try:
        path.chmod(private)
    except OSError as exc:
        raise StorageError(
            "storage",
            f"database file {path} has mode {mode:04o}, readable by other users, "
            f"and chmod to {private:04o} failed: {exc.strerror}",
        ) from exc
    log.warning(
        "database file %s had mode %04o, open to other users; changed it to %04o",
        path,
        mode,
        private,
    )


def check_integrity(
    conn: apsw.Connection, path: Path | str, *, pragma: str = "quick_check"
) -> None:
    """Raise StorageError unless `PRAGMA quick_check` (or `pragma`) returns ok.

    `pragma` may be `quick_check` or `integrity_check`, which also checks
    index contents and takes longer.
    """
    if pragma not in ("quick_check", "integrity_check"):
        raise ValueError(f"invalid pragma {pragma!r}")
    rows = conn.execute(f"PRAGMA {pragma}").fetchall()
    if [str(row[0]) for row in rows] == ["ok"]:
        return

    # SQLite 3.54 returns the problems as lines of one row under a
    # "*** in database main ***" heading. One row per problem is handled too.
    problems = [
        line
        for row in rows
        for line in str(row[0]).splitlines()
        if line and not line.startswith("***")
    ]
    summary = "; ".join(problems[:3])
    if len(problems) > 3:
        summary += f"; and {len(problems) - 3} more"
    raise StorageError(
        "storage",
        f"database {path} failed PRAGMA {pragma}: {summary}. Stop DeeperHub and "
        "restore the file from a backup with `bin/deeperhub restore FILE`, or "
        "salvage it with the sqlite3 shell's `.recover` command",
    )
