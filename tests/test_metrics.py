"""Metric helpers, /proc readers and the scrape-time collector, without a daemon."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deeperhub import metrics
from deeperhub.process_metrics import (
    ErrorCountHandler,
    SystemCollector,
    read_host_stats,
    read_process_stats,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LINUX = sys.platform.startswith("linux")


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_close_code_label_known_codes() -> None:
    assert metrics.close_code_label(1000) == "1000"
    assert metrics.close_code_label(1006) == "1006"
    assert metrics.close_code_label(1012) == "1012"


def test_close_code_label_other_codes() -> None:
    # Codes a client chooses freely must not create a series each.
    assert metrics.close_code_label(4321) == "other"
    assert metrics.close_code_label(3000) == "other"
    assert metrics.close_code_label(1016) == "other"


def test_message_origin_parses_inserted_at() -> None:
    origin = metrics.message_origin({"inserted_at": "2026-12-04T15:40:00.250000Z"})
    assert origin == pytest.approx(1796398800.25)


@pytest.mark.parametrize("value", [None, 17, "", "yesterday"])
def test_message_origin_invalid(value: object) -> None:
    assert metrics.message_origin({"inserted_at": value}) is None


def test_sweep_folds_dead_processes_only(tmp_path: Path) -> None:
    exited = dead_pid()
    alive = os.getpid()
    files = {
        "dead_live": tmp_path / f"gauge_livesum_{exited}.db",
        "dead_max": tmp_path / f"gauge_max_{exited}.db",
        "dead_counter": tmp_path / f"counter_{exited}.db",
        "alive_live": tmp_path / f"gauge_livesum_{alive}.db",
        "alive_counter": tmp_path / f"counter_{alive}.db",
    }
    for path in files.values():
        path.write_bytes(b"")

    assert metrics.sweep_dead_processes(str(tmp_path)) == [exited]

    # tests/test_metrics_archive.py checks that the values survive the fold.
    assert not files["dead_live"].exists()
    assert not files["dead_max"].exists()
    assert not files["dead_counter"].exists()
    assert files["alive_live"].exists()
    assert files["alive_counter"].exists()


def test_sweep_without_directory_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert metrics.sweep_dead_processes() == []


@pytest.mark.skipif(not LINUX, reason="reads /proc, which only Linux has")
def test_read_process_stats_own_process(tmp_path: Path) -> None:
    before = read_process_stats(os.getpid())
    assert before is not None
    handles = [(tmp_path / f"f{i}").open("w") for i in range(5)]
    try:
        after = read_process_stats(os.getpid())
    finally:
        for handle in handles:
            handle.close()
    assert after is not None
    assert after.open_fds >= before.open_fds + 5
    assert after.resident_bytes > 1_000_000
    assert after.virtual_bytes >= after.resident_bytes
    assert after.cpu_seconds > 0
    assert after.max_fds is None or after.max_fds >= after.open_fds
    # Started before now, and not before the test run could have begun.
    assert time.time() - 86400 < after.start_time <= time.time()


def test_read_process_stats_exited_process() -> None:
    assert read_process_stats(dead_pid()) is None


def fake_proc(root: Path, pid: int, command: str) -> Path:
    """Write a minimal /proc tree for `pid` whose command name is `command`."""
    proc = root / "proc"
    (proc / str(pid) / "fd").mkdir(parents=True)
    for fd in range(3):
        (proc / str(pid) / "fd" / str(fd)).write_text("")
    # 52 fields as in proc(5): utime=200 stime=100 starttime=500 vsize=8192
    # rss=3 pages. Fields after the command start at field 3.
    after_comm = ["S"] + ["0"] * 49
    after_comm[11], after_comm[12] = "200", "100"
    after_comm[19], after_comm[20], after_comm[21] = "500", "8192", "3"
    (proc / str(pid) / "stat").write_text(f"{pid} ({command}) {' '.join(after_comm)}\n")
    (proc / str(pid) / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max open files            1024                 4096                 files\n"
    )
    (proc / "stat").write_text(
        "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 100 5 50 800 20 1 2 3 0 0\n"
        "btime 1700000000\n"
    )
    (proc / "meminfo").write_text(
        "MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     400 kB\n"
    )
    return proc


def test_read_process_stats_command_with_parens(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, "odd) name (x")
    stats = read_process_stats(4242, proc)
    assert stats is not None
    ticks = os.sysconf("SC_CLK_TCK")
    assert stats.cpu_seconds == pytest.approx(300 / ticks)
    assert stats.virtual_bytes == 8192
    assert stats.resident_bytes == 3 * os.sysconf("SC_PAGE_SIZE")
    assert stats.open_fds == 3
    assert stats.max_fds == 1024
    assert stats.start_time == pytest.approx(1700000000 + 500 / ticks)


def test_read_host_stats_fake_proc(tmp_path: Path) -> None:
    host = read_host_stats(fake_proc(tmp_path, 1, "init"))
    assert host is not None
    ticks = os.sysconf("SC_CLK_TCK")
    assert host.cpu_seconds["idle"] == pytest.approx(800 / ticks)
    assert host.cpu_seconds["steal"] == pytest.approx(3 / ticks)
    assert set(host.cpu_seconds) == {
        "user",
        "nice",
        "system",
        "idle",
        "iowait",
        "irq",
        "softirq",
        "steal",
    }
    assert host.memory_total_bytes == 1000 * 1024
    assert host.memory_available_bytes == 400 * 1024


def test_read_host_stats_without_proc(tmp_path: Path) -> None:
    assert read_host_stats(tmp_path / "missing") is None


Samples = dict[str, list[tuple[dict[str, str], float]]]


def collect(collector: SystemCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_system_collector_series(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, "python")
    db = tmp_path / "db" / "hub.db"
    db.parent.mkdir()
    db.write_bytes(b"x" * 5000)
    collector = SystemCollector(
        {"db_writer": 4242, "acceptor-1": 999999}, db, "9.9.9", proc=proc
    )
    samples = collect(collector)

    assert samples["deeperhub_build_info"] == [({"version": "9.9.9"}, 1.0)]
    # The process that cannot be read (pid 999999) is left out.
    assert [labels for labels, _ in samples["deeperhub_process_cpu_seconds_total"]] == [
        {"worker": "db_writer"}
    ]
    assert samples["deeperhub_process_max_fds"] == [({"worker": "db_writer"}, 1024.0)]
    assert samples["deeperhub_host_memory_available_bytes"] == [({}, 400 * 1024.0)]
    assert len(samples["deeperhub_host_cpu_seconds_total"]) == 8
    assert samples["deeperhub_db_size_bytes"] == [({}, 5000.0)]
    assert samples["deeperhub_db_wal_size_bytes"] == [({}, 0.0)]
    total = samples["deeperhub_disk_total_bytes"][0][1]
    available = samples["deeperhub_disk_available_bytes"][0][1]
    assert 0 < available <= total


@pytest.fixture
def error_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("deeperhub.test_metrics")
    handler = ErrorCountHandler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def error_count(worker: str) -> float:
    value = REGISTRY.get_sample_value("deeperhub_errors_total", {"worker": worker})
    return value or 0.0


def test_error_handler_counts_errors(
    error_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPERHUB_WORKER_ID", "db_writer")
    before = error_count("db_writer")

    error_logger.error("storage failed")
    error_logger.critical("storage failed badly")
    error_logger.warning("only a warning")

    assert error_count("db_writer") == before + 2


def test_error_handler_supervisor_label(
    error_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPERHUB_WORKER_ID", raising=False)
    before = error_count("supervisor")
    error_logger.error("child failed")
    assert error_count("supervisor") == before + 1
