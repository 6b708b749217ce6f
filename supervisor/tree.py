"""A supervisor: starts children in order, restarts them, stops them in reverse.

The logic is independent of OS processes: a child is anything with the
`ChildHandle` interface, so the strategies and restart intensity are tested
with trio's virtual clock.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import SupervisionError

from .childspec import Restart, Strategy

if TYPE_CHECKING:
    from .childspec import ChildHandle, ChildSpec

__all__ = ["ChildState", "Supervisor"]

log = logging.getLogger("deeperhub.supervisor")

# Delay before retrying a child whose start failed, doubled per failure. It
# keeps a child that cannot start from spinning the CPU while the restart
# intensity counts the failures.
_RETRY_DELAY = 0.1
_RETRY_DELAY_MAX = 2.0
# Seconds to wait while telling a child why it stops, before SIGTERM.
_ANNOUNCE_TIMEOUT = 1.0


@dataclass
class ChildState:
    """Runtime state of one child spec."""

    spec: ChildSpec
    handle: ChildHandle | None = None
    state: str = "stopped"  # starting, running, stopping, stopped, failed
    restarts: int = 0
    started_at: float | None = None  # wall clock, for `status`
    generation: int = 0  # increases per start; stale exit reports are ignored
    last_exit: int | None = None

    def describe(self) -> dict[str, Any]:
        nested = getattr(self.handle, "tree", None)
        return {
            "children": nested.status() if nested is not None else None,
            "state": self.state,
            "pid": self.handle.pid if self.handle else None,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "uptime": (time.time() - self.started_at) if self.started_at else None,
            "last_exit": self.last_exit,
            "type": self.spec.type.value,
        }


@dataclass
class _Exit:
    child_id: str
    generation: int
    status: int


@dataclass
class Supervisor:
    """Supervises `specs` with `strategy` and restart intensity/period."""

    name: str
    specs: list[ChildSpec]
    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: int = 3
    period: float = 5.0
    on_restart: Any = None  # callable(child_id, status), e.g. to count a metric
    children: dict[str, ChildState] = field(init=False)
    stopping: bool = field(default=False, init=False)
    # Sent to children before they are stopped: "shutdown", or "restart" when
    # the daemon will come back (the acceptor then closes WebSockets with 1012).
    stop_reason: str = field(default="shutdown", init=False)

    def __post_init__(self) -> None:
        self.children = {spec.id: ChildState(spec) for spec in self.specs}
        self._restart_times: deque[float] = deque()
        self._exits_send, self._exits = trio.open_memory_channel[_Exit](100)
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()

    def status(self) -> dict[str, Any]:
        """Return every child's state, pid, uptime and restart count."""
        return {child_id: child.describe() for child_id, child in self.children.items()}

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every child, then supervise until `shutdown` or too many restarts.

        Raises SupervisionError when a child cannot start at first, or when the
        restart intensity is exceeded; in both cases every child is stopped first.
        """
        error: SupervisionError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for spec in self.specs:
                    await self._start_child(self.children[spec.id], first=True)
                task_status.started(self)
                await self._supervise()
            except SupervisionError as exc:
                # Raised outside the nursery so callers get it without a group.
                error = exc
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_children(list(self.children))
                self.stopping = True
                self._stopped.set()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Stop every child in reverse start order; no restarts from now on."""
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        self._exits_send.close()
        await self._stopped.wait()

    async def _supervise(self) -> None:
        async for exit_report in self._exits:
            child = self.children[exit_report.child_id]
            if exit_report.generation != child.generation or child.state != "running":
                continue
            child.last_exit = exit_report.status
            child.state = "stopped"
            child.handle = None
            log.warning(
                "child %s of %s exited with %s",
                child.spec.id,
                self.name,
                _describe_status(exit_report.status),
            )
            if not self._should_restart(child.spec, exit_report.status):
                continue
            await self._restart(child, exit_report.status)

    def _should_restart(self, spec: ChildSpec, status: int) -> bool:
        if self.stopping:
            return False
        if spec.restart is Restart.PERMANENT:
            return True
        if spec.restart is Restart.TRANSIENT:
            return status != 0
        return False

    def _note_restart(self, child_id: str) -> None:
        """Record one restart; raise SupervisionError past the intensity."""
        now = trio.current_time()
        self._restart_times.append(now)
        while self._restart_times and self._restart_times[0] < now - self.period:
            self._restart_times.popleft()
        if len(self._restart_times) > self.intensity:
            log.error(
                "supervisor %s: child %s crashed repeatedly (more than %d restarts in "
                "%g s), stopping all children",
                self.name,
                child_id,
                self.intensity,
                self.period,
            )
            raise SupervisionError(
                f"child {child_id} of {self.name} crashed repeatedly: more than "
                f"{self.intensity} restarts in {self.period:g} s"
            )

    async def _restart(self, failed: ChildState, status: int) -> None:
        ids = [spec.id for spec in self.specs]
        if self.strategy is Strategy.ONE_FOR_ONE:
            affected = [failed.spec.id]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            affected = ids
        else:
            affected = ids[ids.index(failed.spec.id) :]

        self._note_restart(failed.spec.id)
        # Siblings restart only if they were running; temporary ones never do.
        siblings = [
            child_id
            for child_id in affected
            if child_id != failed.spec.id
            and self.children[child_id].state == "running"
            and self.children[child_id].spec.restart is not Restart.TEMPORARY
        ]
        await self._stop_children([i for i in affected if i != failed.spec.id])
        for child_id in affected:
            if child_id != failed.spec.id and child_id not in siblings:
                continue
            child = self.children[child_id]
            child.restarts += 1
            if self.on_restart is not None:
                self.on_restart(child_id, status)
            await self._start_child(child, first=False)

    async def _start_child(self, child: ChildState, *, first: bool) -> None:
        """Start `child`, retrying on failure unless this is the first start."""
        delay = _RETRY_DELAY
        while True:
            if self.stopping:
                return
            child.state = "starting"
            try:
                handle = await child.spec.start()
            except Exception as exc:
                child.state = "failed"
                log.error(
                    "child %s of %s failed to start: %s", child.spec.id, self.name, exc
                )
                if first:
                    raise SupervisionError(
                        f"child {child.spec.id} failed to start: {exc}"
                    ) from exc
                self._note_restart(child.spec.id)
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_DELAY_MAX)
                continue
            break
        child.handle = handle
        child.generation += 1
        child.state = "running"
        child.started_at = time.time()
        log.info(
            "child %s of %s started (pid %s)", child.spec.id, self.name, handle.pid
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._monitor, child.spec.id, child.generation, handle)

    async def _monitor(
        self, child_id: str, generation: int, handle: ChildHandle
    ) -> None:
        status = await handle.wait()
        try:
            self._exits_send.send_nowait(_Exit(child_id, generation, status))
        except (trio.ClosedResourceError, trio.WouldBlock):
            pass

    async def _stop_children(self, child_ids: list[str]) -> None:
        """Stop the running children among `child_ids`, last started first."""
        for child_id in reversed(child_ids):
            child = self.children[child_id]
            if child.handle is None or child.state not in ("running", "starting"):
                continue
            await self._stop_child(child)

    async def _stop_child(self, child: ChildState) -> None:
        handle = child.handle
        assert handle is not None
        child.state = "stopping"
        child.generation += 1  # its exit is expected, not a crash
        reason = self.stop_reason if self.stopping else "restart"
        announce = getattr(handle, "announce_stop", None)
        if announce is not None:
            with trio.move_on_after(_ANNOUNCE_TIMEOUT):
                await announce(reason)
        timeout = child.spec.shutdown
        if timeout is None:
            handle.kill()
            status = await handle.wait()
        else:
            handle.terminate()
            with trio.move_on_after(timeout) as scope:
                status = await handle.wait()
            if scope.cancelled_caught:
                log.warning(
                    "child %s of %s did not stop within %g s, killing it",
                    child.spec.id,
                    self.name,
                    timeout,
                )
                handle.kill()
                status = await handle.wait()
        child.state = "stopped"
        child.last_exit = status
        child.handle = None
        log.info(
            "child %s of %s stopped (%s)",
            child.spec.id,
            self.name,
            _describe_status(status),
        )


def _describe_status(status: int) -> str:
    if status < 0:
        import signal

        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"
