"""The `/metrics` response of an acceptor.

Any acceptor can serve a scrape, and each one returns the same series: the
multiprocess files of every worker plus the scrape-time series of
`deeperhub.process_metrics`. The pids of the other processes come from the
supervisor's `status` reply.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from deeperhub import __version__
from deeperhub.errors import ProtocolError
from deeperhub.ipc import RemoteError
from deeperhub.metrics import render_metrics
from deeperhub.process_metrics import SystemCollector

if TYPE_CHECKING:
    from .services import Services

__all__ = ["render_scrape", "scrape_processes"]

log = logging.getLogger("deeperhub.acceptor.metrics")


async def scrape_processes(services: Services) -> dict[str, int]:
    """Return `{worker label: pid}` for the supervisor and every running worker.

    When the supervisor does not reply within `metrics.supervisor_timeout`
    seconds, only this acceptor is listed.
    """
    processes = {services.worker_id: os.getpid()}
    if services.supervisor is None:
        return processes

    timeout = float(services.settings["metrics.supervisor_timeout"])
    try:
        status = await services.supervisor.call("status", timeout=timeout)
    except trio.TooSlowError:
        log.warning("/metrics: supervisor status timed out after %g s", timeout)
        return processes
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        ProtocolError,
        RemoteError,
    ) as exc:
        log.warning("/metrics: supervisor status request failed: %s", exc)
        return processes

    processes.update(_pids_from_status(status))
    return processes


def _pids_from_status(status: Any) -> dict[str, int]:
    pids: dict[str, int] = {}
    if not isinstance(status, dict):
        return pids
    supervisor = status.get("supervisor")
    if isinstance(supervisor, dict) and isinstance(supervisor.get("pid"), int):
        pids["supervisor"] = supervisor["pid"]
    workers = status.get("workers")
    if isinstance(workers, dict):
        for worker_id, worker in workers.items():
            pid = worker.get("pid") if isinstance(worker, dict) else None
            if isinstance(pid, int):
                pids[str(worker_id)] = pid
    return pids


async def render_scrape(services: Services) -> bytes:
    """Return the body of a `/metrics` response."""
    processes = await scrape_processes(services)
    collector = SystemCollector(processes, services.settings.db_path, __version__)
    # Merging every process's files takes tens of milliseconds, and more
    # after many worker restarts (bench/metrics_scrape.py), so it runs
    # outside the event loop.
    return await trio.to_thread.run_sync(render_metrics, collector)
