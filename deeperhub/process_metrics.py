"""Series computed at scrape time: processes, host, disk and database files.

These values belong to no single worker, or change without any worker doing
anything, so `/metrics` reads them when it is scraped instead of keeping them
in the multiprocess files: CPU time, memory and open file descriptors of each
process of the tree (from `/proc/<pid>`), host CPU and memory (`/proc/stat`,
`/proc/meminfo`), the filesystem that holds the database (`statvfs`) and the
database and WAL file sizes.

Only Linux has `/proc`. Elsewhere the process and host series are left out and
only the disk and database series remain.

This module imports prometheus-client only inside functions, so logging can
install `ErrorCountHandler` before the supervisor sets
`PROMETHEUS_MULTIPROC_DIR` (see `deeperhub.metrics`).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from prometheus_client.metrics_core import Metric

__all__ = [
    "HOST_CPU_MODES",
    "ErrorCountHandler",
    "HostStats",
    "ProcessStats",
    "SystemCollector",
    "read_host_stats",
    "read_process_stats",
]

# The per-CPU time columns of the `cpu` line in /proc/stat, in order (proc(5)).
# `guest` and `guest_nice` are left out because `user` and `nice` include them.
HOST_CPU_MODES = (
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "irq",
    "softirq",
    "steal",
)

_PROC = Path("/proc")


def _sysconf(name: str, fallback: int) -> int:
    try:
        return int(os.sysconf(name))
    except (AttributeError, ValueError, OSError):
        return fallback


_CLOCK_TICKS = _sysconf("SC_CLK_TCK", 100)
_PAGE_SIZE = _sysconf("SC_PAGE_SIZE", 4096)


@dataclass(frozen=True)
class ProcessStats:
    """Resource use of one process, read from `/proc/<pid>`."""

    cpu_seconds: float  # user + system time since the process started
    resident_bytes: int
    virtual_bytes: int
    open_fds: int
    max_fds: int | None  # soft RLIMIT_NOFILE, or None when unlimited or unknown
    start_time: float  # Unix seconds


@dataclass(frozen=True)
class HostStats:
    """Host-wide CPU and memory, read from `/proc/stat` and `/proc/meminfo`."""

    cpu_seconds: dict[str, float]  # per mode, summed over all CPUs
    cpus: int
    memory_total_bytes: int
    memory_available_bytes: int
    boot_time: float  # Unix seconds


def read_process_stats(pid: int, proc: Path = _PROC) -> ProcessStats | None:
    """Return the resource use of process `pid`, or None if it cannot be read.

    None is the normal result for a process that exited since its pid was
    looked up, and on systems without `/proc`.
    """
    base = proc / str(pid)
    try:
        stat = (base / "stat").read_text()
        open_fds = len(os.listdir(base / "fd"))
        limits = (base / "limits").read_text()
        boot_time = _boot_time(proc)
    except (OSError, ValueError):
        return None

    # The command name (field 2) is in parentheses and may contain spaces or
    # parentheses itself, so the fields are counted from the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5) are utime and stime, 22 starttime, 23 vsize
    # and 24 rss; `fields` starts at field 3.
    utime, stime = int(fields[11]), int(fields[12])
    start_ticks, vsize, rss_pages = int(fields[19]), int(fields[20]), int(fields[21])
    return ProcessStats(
        cpu_seconds=(utime + stime) / _CLOCK_TICKS,
        resident_bytes=rss_pages * _PAGE_SIZE,
        virtual_bytes=vsize,
        open_fds=open_fds,
        max_fds=_max_open_files(limits),
        start_time=boot_time + start_ticks / _CLOCK_TICKS,
    )


def _boot_time(proc: Path) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError(f"no btime line in {proc / 'stat'}")


def _max_open_files(limits: str) -> int | None:
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return int(soft) if soft.isdigit() else None
    return None


def read_host_stats(proc: Path = _PROC) -> HostStats | None:
    """Return host CPU times and memory, or None without a readable `/proc`."""
    try:
        stat = (proc / "stat").read_text()
        meminfo = (proc / "meminfo").read_text()
    except OSError:
        return None

    cpu_seconds: dict[str, float] = {}
    boot_time = 0.0
    for line in stat.splitlines():
        if line.startswith("cpu "):
            ticks = line.split()[1:]
            for mode, value in zip(HOST_CPU_MODES, ticks, strict=False):
                cpu_seconds[mode] = int(value) / _CLOCK_TICKS
        elif line.startswith("btime "):
            boot_time = float(line.split()[1])

    memory: dict[str, int] = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            # Values are in KiB, although the unit column reads "kB".
            memory[name] = int(parts[0]) * 1024
    if not cpu_seconds or "MemTotal" not in memory:
        return None
    # NOTE: these are the host's numbers. Inside a container with a memory
    # limit (cgroup `memory.max`), the limit is reached before they show it.
    return HostStats(
        cpu_seconds=cpu_seconds,
        cpus=os.cpu_count() or 1,
        memory_total_bytes=memory["MemTotal"],
        # MemAvailable exists since Linux 3.14. Older kernels only have MemFree,
        # a lower bound.
        memory_available_bytes=memory.get("MemAvailable", memory.get("MemFree", 0)),
        boot_time=boot_time,
    )


class SystemCollector:
    """prometheus-client collector for the scrape-time series.

    `processes` maps the `worker` label (worker id, or `supervisor`) to a pid.
    `db_path` is the SQLite database file, whose folder also names the
    filesystem reported by the disk series.
    """

    def __init__(
        self,
        processes: Mapping[str, int],
        db_path: Path,
        version: str,
        proc: Path = _PROC,
    ) -> None:
        self.processes = dict(processes)
        self.db_path = db_path
        self.version = version
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        """Yield every scrape-time metric family (the prometheus-client protocol)."""
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily(
            "deeperhub_build_info",
            "Always 1; the label carries the running DeeperHub version.",
            labels=["version"],
        )
        info.add_metric([self.version], 1)
        yield info
        yield from self._process_families()
        yield from self._host_families()
        yield from self._storage_families()

    def _process_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["worker"]
        cpu = CounterMetricFamily(
            "deeperhub_process_cpu_seconds",
            "User and system CPU time of the process.",
            labels=labels,
        )
        resident = GaugeMetricFamily(
            "deeperhub_process_resident_memory_bytes",
            "Resident memory of the process.",
            labels=labels,
        )
        virtual = GaugeMetricFamily(
            "deeperhub_process_virtual_memory_bytes",
            "Virtual memory size of the process.",
            labels=labels,
        )
        open_fds = GaugeMetricFamily(
            "deeperhub_process_open_fds",
            "Open file descriptors of the process (sockets included).",
            labels=labels,
        )
        max_fds = GaugeMetricFamily(
            "deeperhub_process_max_fds",
            "Soft limit of open file descriptors of the process.",
            labels=labels,
        )
        started = GaugeMetricFamily(
            "deeperhub_process_start_time_seconds",
            "Start time of the process in Unix seconds.",
            labels=labels,
        )
        for worker, pid in sorted(self.processes.items()):
            stats = read_process_stats(pid, self.proc)
            if stats is None:
                continue
            cpu.add_metric([worker], stats.cpu_seconds)
            resident.add_metric([worker], stats.resident_bytes)
            virtual.add_metric([worker], stats.virtual_bytes)
            open_fds.add_metric([worker], stats.open_fds)
            if stats.max_fds is not None:
                max_fds.add_metric([worker], stats.max_fds)
            started.add_metric([worker], stats.start_time)
        yield from (cpu, resident, virtual, open_fds, max_fds, started)

    def _host_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        host = read_host_stats(self.proc)
        if host is None:
            return
        cpu = CounterMetricFamily(
            "deeperhub_host_cpu_seconds",
            "CPU time of the host by mode, summed over all CPUs.",
            labels=["mode"],
        )
        for mode, seconds in host.cpu_seconds.items():
            cpu.add_metric([mode], seconds)
        yield cpu
        yield GaugeMetricFamily(
            "deeperhub_host_cpus", "CPUs of the host.", value=host.cpus
        )
        yield GaugeMetricFamily(
            "deeperhub_host_memory_total_bytes",
            "Memory of the host (MemTotal).",
            value=host.memory_total_bytes,
        )
        yield GaugeMetricFamily(
            "deeperhub_host_memory_available_bytes",
            "Memory available for new work without swapping (MemAvailable).",
            value=host.memory_available_bytes,
        )

    def _storage_families(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            disk = os.statvfs(self.db_path.parent)
        except OSError:
            pass
        else:
            yield GaugeMetricFamily(
                "deeperhub_disk_total_bytes",
                "Size of the filesystem that holds the database.",
                value=disk.f_blocks * disk.f_frsize,
            )
            yield GaugeMetricFamily(
                "deeperhub_disk_available_bytes",
                "Space available to DeeperHub on the filesystem of the database.",
                value=disk.f_bavail * disk.f_frsize,
            )
        for name, path, help_text in (
            ("deeperhub_db_size_bytes", self.db_path, "Size of the database file."),
            (
                "deeperhub_db_wal_size_bytes",
                Path(f"{self.db_path}-wal"),
                "Size of the database's write-ahead log (0 when absent).",
            ),
        ):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            except OSError:
                continue
            yield GaugeMetricFamily(name, help_text, value=size)


class ErrorCountHandler(logging.Handler):
    """Logging handler that counts ERROR and CRITICAL records in `deeperhub_errors`.

    It counts only once prometheus-client may be imported safely, that is
    when `PROMETHEUS_MULTIPROC_DIR` is set or the library is already loaded, so
    an error logged by the supervisor before it prepared the metrics folder is
    not counted.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        """Count `record` under this process's worker id."""
        if not (
            os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            or "prometheus_client" in sys.modules
        ):
            return
        try:
            from .metrics import ERRORS

            worker = os.environ.get("DEEPERHUB_WORKER_ID") or "supervisor"
            ERRORS.labels(worker=worker).inc()
        except Exception:
            self.handleError(record)
