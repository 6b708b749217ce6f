"""Child specifications, as in OTP: what to start and how to treat its exits."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["ChildHandle", "ChildSpec", "ChildType", "Restart", "Strategy"]


class Restart(enum.Enum):
    """When an exited child is started again."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # unless it exited normally (status 0)
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which children restart when one exits (OTP meanings)."""

    ONE_FOR_ONE = "one_for_one"  # only the exited child
    ONE_FOR_ALL = "one_for_all"  # every child
    REST_FOR_ONE = "rest_for_one"  # the exited child and those started after it


class ChildType(enum.Enum):
    WORKER = "worker"
    SUPERVISOR = "supervisor"


class ChildHandle(Protocol):
    """A started child: an OS process, or a nested supervisor in this process."""

    pid: int | None

    async def wait(self) -> int:
        """Return the exit status: 0 normal, >0 error, -N killed by signal N."""
        ...

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM for a process)."""
        ...

    def kill(self) -> None:
        """Stop the child at once (SIGKILL for a process)."""
        ...

    async def announce_stop(self, reason: str) -> None:
        """Tell the child why it is about to be stopped ("shutdown" or "restart")."""
        ...


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child and what to do when it exits.

    `start` returns only once the child is ready (for a worker: once it reported
    ready over the supervisor socket) and raises if it cannot start. `shutdown`
    is the time in seconds between terminate and kill; None means brutal kill.
    """

    id: str
    start: Callable[[], Awaitable[ChildHandle]]
    restart: Restart = Restart.PERMANENT
    shutdown: float | None = 5.0
    type: ChildType = ChildType.WORKER
