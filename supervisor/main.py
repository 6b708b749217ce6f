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
import socket
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio

from deeperhub import __version__
from deeperhub.errors import ConfigError, SupervisionError
from deeperhub.ipc import RemoteError, serve_unix

from .childspec import Strategy
from .control import ControlServer
from .nested import supervisor_spec
from .tree import Supervisor
from .worker_process import worker_spec

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from deeperhub.config import Settings

__all__ = [
    "WORKERS",
    "DaemonTree",
    "InstanceLocked",
    "check_bind_address",
    "leaf_workers",
    "run",
]

log = logging.getLogger("deeperhub.supervisor")

# Start order; stop order is the reverse. The acceptors start last, under a
# nested supervisor of their own.
WORKERS = (
    ("db_writer", "workers.db_writer"),
    ("alert_dispatcher", "workers.alert_dispatcher"),
    ("security_monitor", "workers.security_monitor"),
)
# Seconds a forwarded worker request (`worker_call`) may take by default.
WORKER_CALL_TIMEOUT = 5.0

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


def check_bind_address(settings: Settings) -> None:
    """Raise ConfigError unless the acceptors can bind to `server.host`.

    The acceptors bind late, after the other workers started, and a failed
    bind there only shows as restarts. This probe binds a throwaway socket to
    port 0, with the address family the acceptors use. It catches a name that
    does not resolve and an address that is not on this machine, but not a
    port that is in use.
    """
    host = str(settings["server.host"])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"invalid value {host!r} for DEEPERHUB_HOST (server.host): cannot bind "
            f"to it ({reason}); expected an address of this machine, such as "
            "127.0.0.1, or 0.0.0.0 for every IPv4 interface"
        ) from exc


def _prepare_metrics_dir(settings: Settings) -> dict[str, str]:
    directory = settings.run_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return {"PROMETHEUS_MULTIPROC_DIR": str(directory)}


def _acceptor_ids(settings: Settings) -> list[str]:
    return [f"acceptor-{n}" for n in range(1, int(settings["server.acceptors"]) + 1)]


def leaf_workers(status: dict[str, Any]) -> dict[str, Any]:
    """Flatten a tree status into {worker id: state} for worker processes only."""
    flat: dict[str, Any] = {}
    for child_id, child in status.items():
        if child.get("children"):
            flat.update(leaf_workers(child["children"]))
        elif child.get("type") == "worker" or child.get("state") != "running":
            # A nested supervisor that is not running yet has no workers to
            # list; it stands in for them so /health is not 200 too early.
            flat[child_id] = child
    return flat


def _not_started() -> dict[str, Any]:
    return {
        "children": None,
        "state": "starting",
        "pid": None,
        "restarts": 0,
        "started_at": None,
        "uptime": None,
        "last_exit": None,
        "type": "worker",
    }


class DaemonTree:
    """The daemon's supervision tree and the requests its control socket serves.

    ```
    deeperhub (one_for_one)
    ├── db_writer
    ├── alert_dispatcher
    ├── security_monitor
    └── acceptors (one_for_one)
        └── acceptor-1 … acceptor-N
    ```
    """

    def __init__(self, settings: Settings, metrics_env: dict[str, str]) -> None:
        self.settings = settings
        self.metrics_env = metrics_env
        self.started_at = time.time()
        self.control = ControlServer(self.handle_request)
        self.tree: Supervisor | None = None
        self.pids: dict[str, int | None] = {}

    def _supervisor(self, name: str, specs: list[Any]) -> Supervisor:
        from deeperhub import metrics

        def on_restart(child_id: str, status: int) -> None:
            metrics.WORKER_RESTARTS.labels(worker=child_id).inc()

        return Supervisor(
            name=name,
            specs=specs,
            strategy=Strategy.ONE_FOR_ONE,
            intensity=int(self.settings["supervisor.intensity"]),
            period=float(self.settings["supervisor.period"]),
            on_restart=on_restart,
        )

    def build(self, nursery: trio.Nursery) -> Supervisor:
        settings = self.settings

        def worker(worker_id: str, module: str) -> Any:
            return worker_spec(
                worker_id, module, settings, self.control, nursery, self.metrics_env
            )

        def make_acceptors() -> Supervisor:
            specs = [worker(i, "workers.acceptor") for i in _acceptor_ids(settings)]
            return self._supervisor("acceptors", specs)

        specs = [worker(worker_id, module) for worker_id, module in WORKERS]
        specs.append(supervisor_spec("acceptors", make_acceptors, nursery))
        self.tree = self._supervisor("deeperhub", specs)
        return self.tree

    def status(self) -> dict[str, Any]:
        tree = self.tree.status() if self.tree else {}
        workers = leaf_workers(tree)
        # The nested acceptors supervisor lists its children only once all of
        # them started. Until then they are reported as starting, so that
        # /health does not return 200 while an acceptor is still starting.
        for worker_id in _acceptor_ids(self.settings):
            workers.setdefault(worker_id, _not_started())
        return {
            "supervisor": {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": self.started_at,
                "uptime": time.time() - self.started_at,
                "stopping": self.tree.stopping if self.tree else False,
            },
            "workers": workers,
            "tree": tree,
        }

    async def handle_request(self, op: str, args: dict[str, Any]) -> Any:
        if op == "status":
            return self.status()
        if op == "ping":
            return {}
        if op == "stop":
            reason = "restart" if args.get("reason") == "restart" else "shutdown"
            log.info("stop requested over the control socket (%s)", reason)
            assert self.tree is not None
            trio.lowlevel.spawn_system_task(self.tree.shutdown, reason)
            return {}
        if op == "worker_call":
            return await self._worker_call(args)
        raise RemoteError("invalid", f"unknown op {op}")

    async def _worker_call(self, args: dict[str, Any]) -> Any:
        """Forward a request to a worker (for `remote` and the CLI)."""
        worker_id = str(args.get("worker"))
        worker = leaf_workers(self.tree.status() if self.tree else {}).get(worker_id)
        if worker is None or worker.get("pid") is None:
            raise RemoteError("not_found", f"no running worker {worker_id!r}")
        peer = self.control.peer(worker_id, int(worker["pid"]))
        if peer is None:
            raise RemoteError("not_found", f"worker {worker_id!r} is not connected")
        call_args = args.get("args")
        return await peer.call(
            str(args.get("op")),
            timeout=float(args.get("timeout") or WORKER_CALL_TIMEOUT),
            **(call_args if isinstance(call_args, dict) else {}),
        )

    async def publish_worker_up(self) -> None:
        from deeperhub import metrics

        while True:
            for worker_id, worker in self.status()["workers"].items():
                up = 1 if worker["state"] == "running" else 0
                metrics.WORKER_UP.labels(worker=worker_id).set(up)
            metrics.update_supervisor_series(self.status()["workers"])
            await trio.sleep(1)


async def _serve(settings: Settings, metrics_env: dict[str, str]) -> int:
    daemon = DaemonTree(settings, metrics_env)
    exit_code = EXIT_OK
    async with trio.open_nursery() as nursery:
        await nursery.start(
            serve_unix,
            settings.socket_path("supervisor"),
            daemon.control.handle_connection,
        )
        tree = daemon.build(nursery)

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    await tree.shutdown()
                    return

        nursery.start_soon(watch_signals)
        nursery.start_soon(daemon.publish_worker_up)
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
