"""A supervisor as the child of another supervisor, in the same process."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from deeperhub.errors import SupervisionError

from .childspec import ChildSpec, ChildType, Restart

if TYPE_CHECKING:
    from collections.abc import Callable

    from .tree import Supervisor

__all__ = ["NestedSupervisor", "supervisor_spec"]

log = logging.getLogger("deeperhub.supervisor")


class NestedSupervisor:
    """ChildHandle for a Supervisor running as a task of its parent.

    `wait` returns 0 after a requested stop and 1 when the nested supervisor
    gave up (restart intensity exceeded), which the parent treats as a crash.
    """

    def __init__(self, tree: Supervisor) -> None:
        self.tree = tree
        self.pid: int | None = os.getpid()
        self._done = trio.Event()
        self._status = 0
        self._reason = "shutdown"

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        started = False

        def mark_started(_: object = None) -> None:
            nonlocal started
            started = True
            task_status.started()

        status = _TaskStatus(mark_started)
        try:
            await self.tree.run(task_status=status)  # type: ignore[arg-type]
        except SupervisionError as exc:
            if not started:
                raise
            log.error("nested supervisor %s gave up: %s", self.tree.name, exc)
            self._status = 1
        finally:
            self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        return self._status

    async def announce_stop(self, reason: str) -> None:
        self._reason = reason

    def terminate(self) -> None:
        trio.lowlevel.spawn_system_task(self.tree.shutdown, self._reason)

    def kill(self) -> None:
        # Children of a nested supervisor still get their own shutdown time.
        self.terminate()


class _TaskStatus:
    """Adapter so the nested tree's `started()` reaches the parent's nursery.start."""

    def __init__(self, callback: Callable[[object], None]) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback(value)


def supervisor_spec(
    child_id: str,
    make_tree: Callable[[], Supervisor],
    nursery: trio.Nursery,
) -> ChildSpec:
    """Return a child spec that runs `make_tree()` as a nested supervisor."""

    async def start() -> NestedSupervisor:
        handle = NestedSupervisor(make_tree())
        await nursery.start(handle.run)
        return handle

    # Shutdown None would mean "brutal kill"; a nested supervisor always stops
    # its own children in order, so its parent waits for it without a limit.
    return ChildSpec(
        id=child_id,
        start=start,
        restart=Restart.PERMANENT,
        shutdown=float("inf"),
        type=ChildType.SUPERVISOR,
    )
