"""Time one /metrics render as the number of processes' metric files grows.

Every worker restart leaves the files of the exited process behind (their
counters keep counting), so a long-running daemon with many restarts has more
files to merge per scrape. This script writes the files of N short-lived
processes that each touch every labelled series the way a busy acceptor does,
then times `render_metrics` with the scrape-time collector of this process.

    .venv/bin/python bench/metrics_scrape.py [PROCESSES ...]

Prints one line per process count: files, exposition size and the median and
maximum render time of 20 renders.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a child process with PROMETHEUS_MULTIPROC_DIR set: creates the
# series a busy acceptor and DB writer have, with realistic label sets.
_WRITER = """
from deeperhub import metrics
routes = ["/api/auth/login", "/api/auth/register", "/api/channels",
          "/api/channels/<int:channel_id>", "/health", "/metrics", "unmatched"]
for route in routes:
    for status in ("200", "201", "401", "404", "422", "503"):
        metrics.HTTP_REQUESTS.labels("GET", route, status).inc()
    metrics.HTTP_DURATION.labels("GET", route).observe(0.01)
for code in ("1000", "1001", "1006", "1008", "other"):
    metrics.WS_CONNECTIONS_CLOSED.labels(code=code).inc()
for op in ("insert_message", "register_user", "store_refresh_token"):
    metrics.DB_WRITES.labels(op=op, outcome="ok").inc()
metrics.DB_QUERY_DURATION.labels(kind="read").observe(0.001)
metrics.MESSAGE_DELIVERY_SECONDS.observe(0.002)
metrics.WS_CONNECTIONS_ACTIVE.inc()
"""


def write_processes(directory: Path, count: int) -> None:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    for _ in range(count):
        subprocess.run([sys.executable, "-c", _WRITER], env=env, cwd=ROOT, check=True)


def time_renders(directory: Path, renders: int = 20) -> tuple[int, list[float]]:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    sys.path.insert(0, str(ROOT))
    from deeperhub import __version__
    from deeperhub.metrics import render_metrics
    from deeperhub.process_metrics import SystemCollector

    collector = SystemCollector(
        {"supervisor": os.getppid(), "acceptor-1": os.getpid()},
        directory / "hub.db",
        __version__,
    )
    size = 0
    timings = []
    for _ in range(renders):
        start = time.perf_counter()
        size = len(render_metrics(collector))
        timings.append(time.perf_counter() - start)
    return size, timings


def main() -> None:
    counts = [int(arg) for arg in sys.argv[1:]] or [5, 50, 200]
    for count in counts:
        with tempfile.TemporaryDirectory() as folder:
            directory = Path(folder)
            write_processes(directory, count)
            files = len(list(directory.glob("*.db")))
            # Each measurement runs in a fresh interpreter, so that the
            # multiprocess mode is chosen before prometheus-client loads.
            result = subprocess.run(
                [sys.executable, __file__, "--measure", folder],
                capture_output=True,
                text=True,
                check=True,
            )
            size, median, worst = result.stdout.split()
            median_ms, worst_ms = float(median) * 1000, float(worst) * 1000
            print(
                f"{count:4d} processes, {files:4d} files, {int(size):6d} bytes: "
                f"median {median_ms:6.1f} ms, max {worst_ms:6.1f} ms"
            )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        size, timings = time_renders(Path(sys.argv[2]))
        print(size, statistics.median(timings), max(timings))
    else:
        main()
