"""Telling this database's `-wal` file from one left over by a replaced file.

SQLite replays any `-wal` file next to a database when it opens it, and a WAL
records page images without naming the database file they belong to. After
DeeperHub was killed, `deeper_hub.db-wal` still contains commits. If an
operator then restores a backup over `deeper_hub.db` by hand, replaying that
WAL would write pages of the old file into the restored one and corrupt it.

The DB writer therefore checkpoints the WAL itself (automatic checkpoints are
off) and, after each checkpoint, records a fingerprint of the main file in
`<database>-walstate`: size, modification time in nanoseconds and a hash of
the 100-byte header. Between checkpoints only the WAL changes, so the main
file keeps that fingerprint. A restore changes it: writing the file sets a new
modification time, and a backup's header differs from the live file's. Copies
that keep modification times (`cp -a`, `rsync -a`) keep the fingerprint, so
moving a data directory after a crash still replays its WAL. At start, a
non-empty `-wal` whose main file does not match the recorded fingerprint is
moved aside, together with `-shm`, instead of being replayed.

Before a checkpoint the state file records `checkpointing`. A crash in the
middle of a checkpoint leaves that state, and the WAL is then trusted. With no
state file (a database from an older version, or copied without it) the WAL is
trusted too, as SQLite would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import apsw

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "DEFAULT_CHECKPOINT_PAGES",
    "STATE_SUFFIX",
    "checkpoint",
    "file_fingerprint",
    "install",
    "set_aside_foreign_wal",
]

log = logging.getLogger("deeperhub.db_writer")

DEFAULT_CHECKPOINT_PAGES = 1000  # SQLite's own default for automatic checkpoints
STATE_SUFFIX = "-walstate"
# A WAL file of this size or less has a header and no frames: nothing to replay.
_WAL_HEADER_BYTES = 32
_CHECKPOINTING = {"checkpointing": True}


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Return the identity of the main database file as it is now."""
    info = os.stat(path)
    with open(path, "rb") as handle:
        header = handle.read(100)
    return {
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "header_sha256": hashlib.sha256(header).hexdigest(),
    }


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically and durably."""
    target = _sibling(path, STATE_SUFFIX)
    temporary = _sibling(path, STATE_SUFFIX + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(state).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(_sibling(path, STATE_SUFFIX).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", _sibling(path, STATE_SUFFIX), exc)
        return None
    return state if isinstance(state, dict) else None


def set_aside_foreign_wal(path: Path) -> Path | None:
    """Move a `-wal` (and `-shm`) that does not belong to `path` aside.

    Must run before any connection to `path` is open. Returns the new name of
    the WAL file, or None when there was nothing to move.
    """
    wal = _sibling(path, "-wal")
    try:
        wal_size = wal.stat().st_size
    except FileNotFoundError:
        return None
    if wal_size <= _WAL_HEADER_BYTES or not path.exists():
        return None

    state = _read_state(path)
    if state is None:
        log.info("no %s next to %s: replaying its WAL", STATE_SUFFIX, path)
        return None
    if state.get("checkpointing") or state == file_fingerprint(path):
        return None

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = _sibling(path, f"-wal.foreign-{stamp}")
    os.replace(wal, moved)
    shm = _sibling(path, "-shm")
    if shm.exists():
        os.replace(shm, _sibling(path, f"-shm.foreign-{stamp}"))
    log.warning(
        "database %s was replaced since its WAL was written (a restore?): moved "
        "the old WAL of %d bytes to %s instead of replaying it; delete it once "
        "the database is verified",
        path,
        wal_size,
        moved,
    )
    return moved


def checkpoint(conn: apsw.Connection, path: Path, mode: int) -> bool:
    """Checkpoint the WAL with `mode` and record the new fingerprint.

    Returns False, after logging, when the checkpoint or the state file
    failed. Nothing is checkpointed when the `checkpointing` state cannot be
    written, because a later start could then distrust a valid WAL.
    """
    try:
        _write_state(path, _CHECKPOINTING)
    except OSError as exc:
        log.error("skipping WAL checkpoint of %s: cannot write state: %s", path, exc)
        return False
    try:
        conn.wal_checkpoint(mode=mode)
    except apsw.Error as exc:
        log.error("WAL checkpoint of %s failed: %s", path, exc)
        return False
    try:
        _write_state(path, file_fingerprint(path))
    except OSError as exc:
        log.error("cannot record the state of %s after a checkpoint: %s", path, exc)
        return False
    return True


def install(conn: apsw.Connection, path: Path, checkpoint_pages: int) -> None:
    """Take over checkpoints of the DB writer's connection `conn` to `path`.

    Checkpoints now and after each commit that leaves `checkpoint_pages` or
    more pages in the WAL. Checkpoints are PASSIVE: they copy what no reader
    still needs and never wait, so a restarted DB writer does not wait for
    the acceptors' open read transactions.
    """
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    # A failure is logged. The WAL then keeps its pages until a later
    # checkpoint succeeds, and the state file never claims a wrong fingerprint.
    checkpoint(conn, path, apsw.SQLITE_CHECKPOINT_PASSIVE)

    def after_commit(_conn: apsw.Connection, _name: str, pages: int) -> int:
        # Runs inside COMMIT on the writer's thread. The commit has happened
        # already, so a failed checkpoint must not turn it into an error.
        if pages >= checkpoint_pages:
            checkpoint(conn, path, apsw.SQLITE_CHECKPOINT_PASSIVE)
        return apsw.SQLITE_OK

    conn.set_wal_hook(after_commit)
