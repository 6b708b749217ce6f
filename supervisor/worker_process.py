"""Worker children: OS processes started with `python -m workers.<name>`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import trio

from deeperhub.config import PROJECT_ROOT

from .childspec import ChildSpec, ChildType, Restart

if TYPE_CHECKING:
    from deeperhub.config import Settings
    from deeperhub.ipc import RpcClient

    from .control import ControlServer

__all__ = ["WorkerProcess", "worker_spec"]

log = logging.getLogger("deeperhub.supervisor")


class WorkerProcess:
    """A running worker process, with a liveness task that kills it if it hangs.

    The process is forked from the supervisor's main thread on purpose: Linux
    sends PR_SET_PDEATHSIG when the *thread* that forked a child exits, and
    trio's `open_process` forks from a cached worker thread that ends after a
    few idle seconds, which would stop every worker.
    """

    def __init__(self, worker_id: str, process: subprocess.Popen[bytes]) -> None:
        self.worker_id = worker_id
        self.process = process
        self.pid: int | None = process.pid
        self.peer: RpcClient | None = None
        self.returncode: int | None = None
        self._exited = trio.Event()

    async def reap(self) -> None:
        """Wait for the process to exit (through a pidfd) and collect its status."""
        pidfd = os.pidfd_open(self.process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.returncode = self.process.wait()
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def announce_stop(self, reason: str) -> None:
        if self.peer is not None and not self.peer.closed:
            try:
                await self.peer.notify({"event": "stop", "reason": reason})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        # Until reaped, the pid cannot be reused, so the signal cannot hit
        # another process.
        if self.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def check_liveness(self, interval: float, timeout: float) -> None:
        """Ping the worker every `interval` s; SIGKILL it after `timeout` s silent."""
        while self.returncode is None and self.peer is not None:
            await trio.sleep(interval)
            if self.returncode is not None or self.peer.closed:
                return
            try:
                await self.peer.call("ping", timeout=timeout)
            except trio.TooSlowError:
                log.error(
                    "worker %s (pid %s) did not answer a ping within %g s, killing it",
                    self.worker_id,
                    self.pid,
                    timeout,
                )
                self.kill()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


def worker_spec(
    worker_id: str,
    module: str,
    settings: Settings,
    control: ControlServer,
    nursery: trio.Nursery,
    extra_env: dict[str, str],
) -> ChildSpec:
    """Return the child spec that runs `python -m <module>` as worker `worker_id`."""

    async def start() -> WorkerProcess:
        env = dict(os.environ)
        env.update(settings.to_env())
        env.update(extra_env)
        env["DEEPERHUB_WORKER_ID"] = worker_id
        env["DEEPERHUB_SUPERVISOR_SOCKET"] = str(settings.socket_path("supervisor"))
        process = subprocess.Popen(  # noqa: ASYNC220 (main thread, see WorkerProcess)
            [sys.executable, "-m", module],
            env=env,
            cwd=str(PROJECT_ROOT),
            stdin=subprocess.DEVNULL,
            # A process group of its own: Ctrl-C or a SIGTERM sent to the whole
            # group (as systemd does by default) reaches only the supervisor,
            # which then stops the workers in order.
            process_group=0,
        )
        worker = WorkerProcess(worker_id, process)
        nursery.start_soon(worker.reap)
        timeout = float(settings["supervisor.start_timeout"])
        try:
            worker.peer = await _wait_ready(control, worker, timeout)
        except BaseException:
            worker.kill()
            with trio.CancelScope(shield=True):
                await worker.wait()
            raise
        nursery.start_soon(
            worker.check_liveness,
            float(settings["supervisor.liveness_interval"]),
            float(settings["supervisor.liveness_timeout"]),
        )
        return worker

    return ChildSpec(
        id=worker_id,
        start=start,
        restart=Restart.PERMANENT,
        shutdown=float(settings["supervisor.shutdown_timeout"]),
        type=ChildType.WORKER,
    )


async def _wait_ready(
    control: ControlServer, worker: WorkerProcess, timeout: float
) -> RpcClient:
    """Return the worker's control peer once it is ready; raise if it exits first."""
    assert worker.pid is not None
    peer: RpcClient | None = None
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            nonlocal peer
            peer = await control.wait_ready(worker.worker_id, worker.pid or 0)
            nursery.cancel_scope.cancel()

        async def exited() -> None:
            await worker.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(ready)
        nursery.start_soon(exited)
        with trio.move_on_after(timeout):
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()

    if peer is not None:
        return peer
    if worker.returncode is not None:
        raise RuntimeError(
            f"exited with status {worker.returncode} before reporting ready "
            f"(see the application log)"
        )
    raise RuntimeError(f"did not report ready within {timeout:g} s")
