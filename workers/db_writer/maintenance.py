"""Work of the DB writer besides write ops: online backups and token purges.

`BackupHandler` serves the `backup` op. It runs outside the group-commit
batches, on its own read connection in a worker thread, so writes keep being
committed while a backup is copied (see `deeperhub/storage/backup.py`).

`run_token_purge` sends `purge_expired_tokens` to this DB writer's own socket
every `auth.purge_interval` seconds, so the purge is an ordinary write op in
a batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import ProtocolError, StorageError
from deeperhub.ipc import RemoteError, open_rpc_client
from deeperhub.storage.backup import create_backup
from deeperhub.storage.writes import WriteOutcome

if TYPE_CHECKING:
    from collections.abc import Mapping

    from deeperhub.config import Settings

__all__ = ["BackupHandler", "run_token_purge"]

log = logging.getLogger("deeperhub.db_writer")

# Seconds a purge request waits for its reply before the next interval.
PURGE_TIMEOUT = 60.0


class BackupHandler:
    """The `backup` op: `{dest?, keep?}` → the BackupResult as a dict.

    `dest` must be an absolute path; it defaults to `backup.dir`. `keep`
    defaults to `backup.keep`. One backup runs at a time; others wait.
    """

    def __init__(self, settings: Settings) -> None:
        self.db_path = settings.db_path
        self.default_dir = Path(settings["backup.dir"])
        self.default_keep = int(settings["backup.keep"])
        self._lock = trio.Lock()

    async def __call__(self, args: Mapping[str, Any]) -> WriteOutcome:
        dest = args.get("dest")
        keep = args.get("keep", self.default_keep)
        if dest is not None and (not isinstance(dest, str) or not dest.startswith("/")):
            return WriteOutcome(
                error=("invalid", f"invalid dest {dest!r}: expected an absolute path")
            )
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            return WriteOutcome(
                error=("invalid", f"invalid keep {keep!r}: expected an integer >= 1")
            )
        dest_dir = Path(dest) if dest is not None else self.default_dir

        async with self._lock:
            # TODO: a worker thread cannot be cancelled, so a backup in progress
            # delays the DB writer's stop until the copy ends or the supervisor
            # kills it (after supervisor.shutdown_timeout). The next backup
            # deletes the partial files of a killed one after an hour.
            try:
                result = await trio.to_thread.run_sync(
                    lambda: create_backup(self.db_path, dest_dir, keep=keep)
                )
            except StorageError as exc:
                log.error("backup of %s failed: %s", self.db_path, exc.message)
                return WriteOutcome(error=(exc.code, exc.message))
        return WriteOutcome(result=result.to_dict())


async def run_token_purge(settings: Settings) -> None:
    """Purge expired token rows through this DB writer's socket, forever.

    A token fails verification `auth.leeway` seconds after its `exp`, and no
    token lives longer than the longer of the two lifetimes, which sets the
    age after which a `revoke_all` cutoff matters no more.
    """
    interval = float(settings["auth.purge_interval"])
    leeway = int(settings["auth.leeway"])
    longest = max(int(settings["auth.access_ttl"]), int(settings["auth.refresh_ttl"]))
    path = settings.socket_path("db")
    while True:
        await trio.sleep(interval)
        now = int(time.time())
        try:
            with trio.fail_after(PURGE_TIMEOUT):
                async with open_rpc_client(path) as client:
                    result = await client.call(
                        "purge_expired_tokens",
                        expired_before=now - leeway,
                        cutoffs_before=now - leeway - longest,
                    )
        except (
            OSError,
            RemoteError,
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
        ) as exc:
            log.warning("purge of expired tokens failed: %s", exc)
            continue
        deleted = result.get("deleted", {}) if isinstance(result, dict) else {}
        if any(deleted.values()):
            log.info("purged expired token rows: %s", deleted)
