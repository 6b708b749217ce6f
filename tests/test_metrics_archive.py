"""Folding the metric files of exited processes keeps every scraped value.

Each "worker" here is a real child process that imports `deeperhub.metrics`
with `PROMETHEUS_MULTIPROC_DIR` set, records samples and exits, so the files
have exactly the layout the daemon's workers leave behind. Scrapes also run
in child processes, because prometheus-client picks its storage at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from deeperhub import metrics_archive

if TYPE_CHECKING:
    from pathlib import Path

WORKER = """
import sys
from deeperhub import metrics
up, delivered, batch, connections = (float(value) for value in sys.argv[1:5])
metrics.WORKER_UP.labels(worker="acceptor-1").set(up)
metrics.MESSAGES_DELIVERED.inc(delivered)
metrics.DB_BATCH_SIZE.observe(batch)
metrics.WS_CONNECTIONS_ACTIVE.set(connections)
metrics.SECURITY_BLOCKS_ACTIVE.set(batch)
"""

SCRAPE = """
import sys
from deeperhub.metrics import render_metrics
sys.stdout.write(render_metrics().decode())
"""

WATCHED = (
    "deeperhub_worker_up",
    "deeperhub_messages_delivered_total",
    "deeperhub_db_batch_size_count",
    "deeperhub_db_batch_size_sum",
    "deeperhub_ws_connections_active",
    "deeperhub_security_blocks_active",
)


def worker(directory: Path, *values: float) -> int:
    """Run a worker that records `values` and exits, and return its pid."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, *map(str, values)], env=env
    )
    assert process.wait(timeout=30) == 0
    return process.pid


def scrape(directory: Path) -> dict[str, float]:
    """Return the watched samples as `/metrics` renders them from `directory`."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    text = subprocess.run(
        [sys.executable, "-c", SCRAPE],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in WATCHED
    }


def process_files(directory: Path) -> list[str]:
    return sorted(
        name
        for name in os.listdir(directory)
        if name.endswith(".db") and metrics_archive.ARCHIVE not in name
    )


def test_fold_keeps_the_scraped_totals(tmp_path: Path) -> None:
    first = worker(tmp_path, 1, 5, 10, 3)
    second = worker(tmp_path, 0, 7, 30, 4)
    before = scrape(tmp_path)
    assert before["deeperhub_messages_delivered_total"] == 12
    assert before["deeperhub_db_batch_size_count"] == 2
    assert before["deeperhub_db_batch_size_sum"] == 40
    assert before["deeperhub_worker_up"] == 1

    folded = metrics_archive.dead_pids(tmp_path, lambda pid: False)
    # The scrape process leaves files of its own too.
    assert {first, second} <= set(folded)
    for pid in folded:
        assert metrics_archive.fold_dead_process(tmp_path, pid) > 0

    assert process_files(tmp_path) == []
    after = scrape(tmp_path)
    # Live gauges of dead processes disappear. Everything else is unchanged.
    expected = {
        name: value
        for name, value in before.items()
        if name != "deeperhub_ws_connections_active"
    }
    assert after.get("deeperhub_ws_connections_active", 0) == 0
    after.pop("deeperhub_ws_connections_active", None)
    assert after == expected

    # A later process adds to the archive instead of replacing it.
    third = worker(tmp_path, 0, 1, 2, 0)
    metrics_archive.fold_dead_process(tmp_path, third)
    again = scrape(tmp_path)
    assert again["deeperhub_messages_delivered_total"] == 13
    assert again["deeperhub_db_batch_size_count"] == 3
    assert again["deeperhub_worker_up"] == 1
    # A `mostrecent` gauge shows the value of the process that set it last.
    assert again["deeperhub_security_blocks_active"] == 2


def test_dead_pids_skips_living_processes(tmp_path: Path) -> None:
    for name in ("counter_11.db", "gauge_livesum_12.db", "histogram_13.db"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "counter_archive.db").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a metric file")
    assert metrics_archive.dead_pids(tmp_path, lambda pid: pid == 12) == [11, 13]


def test_unreadable_file_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "counter_21.db").write_bytes(b"")
    (tmp_path / "gauge_all_21.db").write_bytes(b"")
    assert metrics_archive.fold_dead_process(tmp_path, 21) == 1
    assert not (tmp_path / "counter_21.db").exists()
    # `all` gauges label samples with the pid, so there is nothing to fold into.
    assert (tmp_path / "gauge_all_21.db").exists()


def test_fold_waits_for_scrapes(tmp_path: Path) -> None:
    pid = worker(tmp_path, 1, 1, 1, 1)
    finished = threading.Event()

    def fold() -> None:
        metrics_archive.fold_dead_process(tmp_path, pid)
        finished.set()

    with metrics_archive.scrape_lock(tmp_path):
        thread = threading.Thread(target=fold)
        thread.start()
        assert not finished.wait(0.3)
        assert process_files(tmp_path) != []
    assert finished.wait(10)
    thread.join()
    assert process_files(tmp_path) == []
