"""Online backups of the database, and restoring one.

`create_backup` copies the live database with SQLite's online backup API in
a single step, which reads one consistent snapshot inside one read
transaction. In WAL mode that transaction does not block the DB writer, and
commits made meanwhile do not restart the copy. The copy is checked with
`PRAGMA integrity_check`, compressed with gzip and renamed into place, so a
file named `deeper_hub-*.db.gz` is always complete. Older backups beyond `keep`
are deleted.

The DB writer runs `create_backup` for its `backup` op (`bin/deeperhub backup`
against a running daemon). The CLI runs it directly when the daemon is stopped.
`restore_backup` replaces the database file and must only run while no
process has the database open.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apsw

from ..errors import StorageError
from .database import check_integrity, open_read_connection
from .migrations import MIGRATIONS, applied_versions

__all__ = [
    "BACKUP_PREFIX",
    "BACKUP_SUFFIX",
    "BackupResult",
    "RestoreResult",
    "create_backup",
    "list_backups",
    "restore_backup",
]

log = logging.getLogger("deeperhub.backup")

BACKUP_PREFIX = "deeper_hub-"
BACKUP_SUFFIX = ".db.gz"
_GZIP_MAGIC = b"\x1f\x8b"
_COPY_CHUNK = 1024 * 1024
# Age after which a partial file is taken as left by a killed backup rather
# than written by one still running.
STALE_PARTIAL_SECONDS = 3600


@dataclass(frozen=True)
class BackupResult:
    """A finished backup: its file, sizes in bytes, duration in seconds."""

    path: str
    compressed_bytes: int
    database_bytes: int
    seconds: float
    pruned: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RestoreResult:
    """A finished restore: the restored file and where the old one was moved."""

    database: str
    previous: str | None
    schema_version: int


def list_backups(dest_dir: Path) -> list[Path]:
    """Return the backups in `dest_dir`, oldest first (their names sort by time)."""
    if not dest_dir.is_dir():
        return []
    return sorted(
        path
        for path in dest_dir.iterdir()
        if path.name.startswith(BACKUP_PREFIX) and path.name.endswith(BACKUP_SUFFIX)
    )


def create_backup(
    db_path: Path, dest_dir: Path, *, keep: int, now: datetime | None = None
) -> BackupResult:
    """Write a checked, compressed backup of `db_path` into `dest_dir`.

    Returns the BackupResult. Raises StorageError naming the file when the
    copy, the check or the compression fails; nothing partial is left under a
    backup name then.
    """
    if keep < 1:
        raise StorageError("invalid", f"invalid keep {keep}: must be at least 1")
    started = time.perf_counter()
    moment = now or datetime.now(UTC)
    try:
        dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            "storage", f"cannot create backup folder {dest_dir}: {exc.strerror}"
        ) from exc

    _delete_stale_partials(dest_dir)
    final = _unused_name(dest_dir, moment)
    raw = dest_dir / f".{final.name}.partial.db"
    packed = dest_dir / f".{final.name}.partial"
    try:
        database_bytes = _copy_database(db_path, raw)
        _check_copy(raw)
        _compress(raw, packed)
        os.replace(packed, final)
        _fsync_directory(dest_dir)
    except OSError as exc:
        raise StorageError(
            "storage", f"backup of {db_path} to {final} failed: {exc}"
        ) from exc
    finally:
        for leftover in ("", "-journal", "-wal", "-shm"):
            Path(f"{raw}{leftover}").unlink(missing_ok=True)
        packed.unlink(missing_ok=True)

    pruned = _prune(dest_dir, keep)
    result = BackupResult(
        path=str(final),
        compressed_bytes=final.stat().st_size,
        database_bytes=database_bytes,
        seconds=round(time.perf_counter() - started, 3),
        pruned=[str(path) for path in pruned],
    )
    log.info(
        "backup of %s written to %s (%d bytes, %.2f s, %d old backups deleted)",
        db_path,
        final,
        result.compressed_bytes,
        result.seconds,
        len(pruned),
    )
    return result


def _delete_stale_partials(dest_dir: Path) -> None:
    """Delete partial files of backups that were killed over an hour ago."""
    horizon = time.time() - STALE_PARTIAL_SECONDS
    for leftover in dest_dir.glob(f".{BACKUP_PREFIX}*.partial*"):
        try:
            if leftover.stat().st_mtime < horizon:
                leftover.unlink()
                log.info("deleted partial file %s of an interrupted backup", leftover)
        except OSError as exc:
            log.warning("cannot delete partial backup file %s: %s", leftover, exc)


def _unused_name(dest_dir: Path, moment: datetime) -> Path:
    """Return `deeper_hub-<UTC time with microseconds>.db.gz`, unused in `dest_dir`.

    The fixed-width time makes names sort in creation order.
    """
    while True:
        stamp = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        candidate = dest_dir / f"{BACKUP_PREFIX}{stamp}{BACKUP_SUFFIX}"
        if not candidate.exists():
            return candidate
        moment += timedelta(microseconds=1)


def _create_private(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)


def _copy_database(db_path: Path, raw: Path) -> int:
    """Copy `db_path` into the new file `raw` in one backup step; return its size."""
    if not db_path.exists():
        raise StorageError("not_found", f"database {db_path} does not exist")
    _create_private(raw)
    source = open_read_connection(db_path)
    try:
        destination = apsw.Connection(str(raw))
        try:
            # One step of every page (-1) copies a single snapshot.
            with destination.backup("main", source, "main") as backup:
                backup.step(-1)
        except apsw.Error as exc:
            raise StorageError(
                "storage", f"online backup of {db_path} failed: {exc}"
            ) from exc
        finally:
            destination.close()
    finally:
        source.close()
    return raw.stat().st_size


def _check_copy(raw: Path) -> None:
    """Raise StorageError unless the copy passes `PRAGMA integrity_check`."""
    conn = apsw.Connection(str(raw), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        check_integrity(conn, raw, pragma="integrity_check")
        # The copy keeps the WAL flag of the live file. Switching it to a
        # rollback journal lets `restore` and the sqlite3 shell open the file
        # even where they cannot create a `-shm` file.
        conn.execute("PRAGMA journal_mode = DELETE")
    except apsw.Error as exc:
        raise StorageError("storage", f"cannot check backup copy {raw}: {exc}") from exc
    finally:
        conn.close()


def _compress(raw: Path, packed: Path) -> None:
    _create_private(packed)
    with raw.open("rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
        shutil.copyfileobj(source, target, _COPY_CHUNK)
    fd = os.open(packed, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(dest_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` backups; return the deleted ones."""
    backups = list_backups(dest_dir)
    doomed = backups[:-keep] if len(backups) > keep else []
    deleted = []
    for path in doomed:
        try:
            path.unlink()
            deleted.append(path)
        except OSError as exc:
            log.warning("cannot delete old backup %s: %s", path, exc)
    return deleted


def restore_backup(source: Path, db_path: Path) -> RestoreResult:
    """Replace `db_path` with the backup `source` (gzip or plain SQLite).

    The backup is unpacked next to the database and checked with
    `PRAGMA integrity_check` and its schema version first. The current
    database, with its `-wal` file, is renamed to
    `<name>.before-restore-<time>` rather than deleted. The caller must make
    sure that no process has the database open. Raises StorageError.
    """
    if not source.is_file():
        raise StorageError("not_found", f"backup file {source} does not exist")
    db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = db_path.with_name(f".{db_path.name}.restoring")
    try:
        _unpack(source, staged)
        version = _check_restorable(source, staged)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        previous = _move_aside(db_path, f".before-restore-{stamp}")
        os.replace(staged, db_path)
        _fsync_directory(db_path.parent)
    except OSError as exc:
        raise StorageError(
            "storage", f"restore of {source} to {db_path} failed: {exc}"
        ) from exc
    finally:
        for leftover in ("", "-journal", "-wal", "-shm"):
            Path(f"{staged}{leftover}").unlink(missing_ok=True)
    log.info("restored %s from %s", db_path, source)
    return RestoreResult(
        database=str(db_path),
        previous=str(previous) if previous else None,
        schema_version=version,
    )


def _unpack(source: Path, staged: Path) -> None:
    with source.open("rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
    _create_private(staged)
    opener = gzip.open if compressed else open
    try:
        with opener(source, "rb") as reader, staged.open("wb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_CHUNK)
            writer.flush()
            os.fsync(writer.fileno())
    except (gzip.BadGzipFile, EOFError) as exc:
        raise StorageError(
            "invalid", f"backup file {source} is not a complete gzip file: {exc}"
        ) from exc


def _check_restorable(source: Path, staged: Path) -> int:
    """Check the unpacked backup; return its schema version."""
    try:
        conn = apsw.Connection(str(staged), flags=apsw.SQLITE_OPEN_READWRITE)
    except apsw.Error as exc:
        raise StorageError(
            "invalid", f"backup file {source} is not an SQLite database: {exc}"
        ) from exc
    try:
        check_integrity(conn, source, pragma="integrity_check")
        versions = applied_versions(conn)
    except apsw.Error as exc:
        raise StorageError(
            "invalid", f"backup file {source} is not a DeeperHub database: {exc}"
        ) from exc
    finally:
        conn.close()
    known = max(version for version, _, _ in MIGRATIONS)
    newest = max(versions, default=0)
    if newest > known:
        raise StorageError(
            "invalid",
            f"backup file {source} has schema version {newest}, newer than this "
            f"DeeperHub (up to {known}): restore it with a newer DeeperHub",
        )
    return newest


def _move_aside(db_path: Path, suffix: str) -> Path | None:
    """Rename the database and its `-wal` to `<name><suffix>`; drop its `-shm`."""
    if not db_path.exists():
        return None
    aside = db_path.with_name(db_path.name + suffix)
    os.replace(db_path, aside)
    wal = Path(f"{db_path}-wal")
    if wal.exists():
        # SQLite finds a WAL by appending -wal to the database name.
        os.replace(wal, Path(f"{aside}-wal"))
    Path(f"{db_path}-shm").unlink(missing_ok=True)
    return aside
