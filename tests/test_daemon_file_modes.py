"""Permissions of the files the daemon writes, on a real daemon.

The database contains password hashes and the logs contain user ids and client IP
addresses, so neither may be readable by other local users.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from deeperhub.storage.database import open_write_connection

from .daemon import Daemon

if TYPE_CHECKING:
    from pathlib import Path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_are_private(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    try:
        db = daemon.var_dir / "db" / "deeper_hub.db"
        private_files = [
            db,
            daemon.var_dir / "log" / "runtime.log",
            daemon.var_dir / "log" / "deeper_hub.log",
        ]
        for path in private_files:
            assert mode_of(path) & 0o077 == 0, (path, oct(mode_of(path)))
        for suffix in ("-wal", "-shm"):
            companion = db.with_name(db.name + suffix)
            if companion.exists():
                assert mode_of(companion) & 0o077 == 0, companion
    finally:
        daemon.stop()


def test_start_tightens_readable_database(tmp_path: Path) -> None:
    """A database copied into place with mode 0644 is made 0600 with a warning."""
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    daemon.stop()

    # A manual restore: the copy gets the copier's umask.
    db = daemon.var_dir / "db" / "deeper_hub.db"
    os.chmod(db, 0o644)
    daemon.start()
    try:
        assert mode_of(db) == 0o600
        log = (daemon.var_dir / "log" / "deeper_hub.log").read_text()
        warnings = [line for line in log.splitlines() if " WARNING " in line]
        assert any(str(db) in line and "0644" in line for line in warnings), warnings
    finally:
        daemon.stop()


def test_open_write_connection_tightens_companions(tmp_path: Path) -> None:
    """The database, -wal and -shm files left world-readable become 0600."""
    db = tmp_path / "hub.db"
    conn = open_write_connection(db)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    companions = [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]
    for path in (db, *companions):
        assert path.exists(), path
        os.chmod(path, 0o644)

    # The first connection keeps the -wal and -shm open, as a crash would.
    second = open_write_connection(db)
    try:
        for path in (db, *companions):
            assert mode_of(path) == 0o600, (path, oct(mode_of(path)))
    finally:
        second.close()
        conn.close()
