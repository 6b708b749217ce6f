"""Periodic message retention of the DB writer.

`run_retention` sends `prune_messages` (deeperhub/storage/retention.py) to this
DB writer's own socket every `retention.interval` seconds. Each request deletes
at most `retention.batch` messages in one group-commit transaction, and the
next batch follows at once while the previous one reported more to delete. So
a large backlog is deleted in many short transactions, and other writes are
committed between them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from deeperhub.errors import ProtocolError
from deeperhub.ipc import RemoteError, open_rpc_client

if TYPE_CHECKING:
    from deeperhub.config import Settings

__all__ = ["run_retention"]

log = logging.getLogger("deeperhub.db_writer")

# Seconds one prune request may wait for its reply.
PRUNE_TIMEOUT = 60.0


async def run_retention(settings: Settings) -> None:
    """Delete messages beyond the retention limits, forever."""
    interval = float(settings["retention.interval"])
    path = settings.socket_path("db")
    args = {
        "max_messages": int(settings["retention.max_messages"]),
        "max_age": int(settings["retention.max_age"]),
        "limit": int(settings["retention.batch"]),
    }
    while True:
        await trio.sleep(interval)
        deleted = 0
        try:
            deleted = await _prune(path, args)
        # The IPC client's nursery wraps errors in exception groups.
        except* (
            OSError,
            RemoteError,
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as group:
            log.warning("message retention pass failed: %s", group.exceptions[0])
        if deleted:
            log.info("message retention deleted %d messages", deleted)


async def _prune(path: object, args: dict[str, int]) -> int:
    """Run batches until one reports nothing more to delete; return the total."""
    total = 0
    async with open_rpc_client(str(path)) as client:
        while True:
            with trio.fail_after(PRUNE_TIMEOUT):
                result = await client.call("prune_messages", **args)
            total += int(result["deleted"])
            if not result["more"]:
                return total
