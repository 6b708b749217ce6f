"""The top of the tree: one supervisor process running the four workers.

`run(settings)` holds the instance lock, writes the pidfile, serves the control
socket, starts the workers in order and stops them in reverse on SIGTERM or
SIGINT. It returns the process exit code.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

from deeperhub import __version__
from deeperhub.errors import SupervisionError
from deeperhub.ipc import serve_unix

from .childspec import Strategy
from .control import ControlServer
from .tree import Supervisor
from .worker_process import worker_spec

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from deeperhub.config import Settings

__all__ = ["WORKERS", "InstanceLocked", "run"]

log = logging.getLogger("deeperhub.supervisor")

# Start order; stop order is the reverse.
WORKERS = (
    ("db_writer", "workers.db_writer"),
    ("alert_dispatcher", "workers.alert_dispatcher"),
    ("security_monitor", "workers.security_monitor"),
    ("acceptor", "workers.acceptor"),
)

EXIT_OK = 0
EXIT_GAVE_UP = 1
EXIT_ALREADY_RUNNING = 2


class InstanceLocked(Exception):
    """Another supervisor holds the lock of this data directory."""


def lock_path(settings: Settings) -> Path:
    return settings.run_dir / "deeperhub.lock"


def pid_path(settings: Settings) -> Path:
    return settings.run_dir / "deeperhub.pid"


@contextmanager
def instance_lock(settings: Settings) -> Iterator[None]:
    """Hold an exclusive flock on the data directory; write and remove the pidfile.

    The kernel drops the lock when the process dies, so a pidfile left by a
    killed instance never blocks a new start.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    handle = lock_path(settings).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InstanceLocked(str(settings.var_dir)) from None
    pidfile = pid_path(settings)
    pidfile.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        try:
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
        except FileNotFoundError:
            pass
        handle.close()


def _prepare_metrics_dir(settings: Settings) -> dict[str, str]:
    directory = settings.run_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return {"PROMETHEUS_MULTIPROC_DIR": str(directory)}


async def _serve(settings: Settings, metrics_env: dict[str, str]) -> int:
    from deeperhub import metrics

    started_at = time.time()
    tree: Supervisor | None = None

    async def handle_request(op: str, args: dict[str, Any]) -> Any:
        if op == "status":
            return {
                "supervisor": {
                    "pid": os.getpid(),
                    "version": __version__,
                    "started_at": started_at,
                    "uptime": time.time() - started_at,
                    "stopping": tree.stopping if tree else False,
                },
                "workers": tree.status() if tree else {},
            }
        if op == "ping":
            return {}
        from deeperhub.ipc import RemoteError

        raise RemoteError("invalid", f"unknown op {op}")

    control = ControlServer(handle_request)

    def on_restart(child_id: str, status: int) -> None:
        metrics.WORKER_RESTARTS.labels(worker=child_id).inc()

    async with trio.open_nursery() as nursery:
        await nursery.start(
            serve_unix, settings.socket_path("supervisor"), control.handle_connection
        )
        specs = [
            worker_spec(worker_id, module, settings, control, nursery, metrics_env)
            for worker_id, module in WORKERS
        ]
        tree = Supervisor(
            name="deeperhub",
            specs=specs,
            strategy=Strategy.ONE_FOR_ONE,
            intensity=int(settings["supervisor.intensity"]),
            period=float(settings["supervisor.period"]),
            on_restart=on_restart,
        )
        exit_code = EXIT_OK

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    assert tree is not None
                    await tree.shutdown()
                    return

        async def publish_worker_up() -> None:
            while True:
                assert tree is not None
                for child_id, child in tree.children.items():
                    up = 1 if child.state == "running" else 0
                    metrics.WORKER_UP.labels(worker=child_id).set(up)
                await trio.sleep(1)

        nursery.start_soon(watch_signals)
        nursery.start_soon(publish_worker_up)
        try:
            await tree.run()
            log.info("all workers stopped")
        except SupervisionError as exc:
            log.error("supervisor giving up: %s", exc)
            exit_code = EXIT_GAVE_UP
        nursery.cancel_scope.cancel()
    return exit_code


def run(settings: Settings) -> int:
    """Run the supervisor in this process until it stops; return the exit code."""
    try:
        with instance_lock(settings):
            log.info(
                "DeeperHub %s starting (pid %d, data directory %s)",
                __version__,
                os.getpid(),
                settings.var_dir,
            )
            metrics_env = _prepare_metrics_dir(settings)
            code = trio.run(_serve, settings, metrics_env)
            log.info("DeeperHub stopped (exit code %d)", code)
            return code
    except InstanceLocked:
        message = (
            f"another DeeperHub instance is running on data directory "
            f"{settings.var_dir}; stop it first or set DEEPERHUB_VAR_DIR"
        )
        log.error("%s", message)
        print(f"deeperhub: {message}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
