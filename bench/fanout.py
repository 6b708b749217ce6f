"""Fan-out throughput and latency: DeeperHub against a `websockets` baseline.

S subscribers join one topic; one publisher pushes M messages of 64-byte
bodies, keeping at most W pushes unacknowledged. The script reports
deliveries per second (from the first push to the last delivery) and the
p50/p99 latency from push to delivery, for DeeperHub and, in the same run,
for `bench/baseline_websockets.py`, and the ratio of the two.

DeeperHub runs as `bin/deeperhub start` on a free loopback port with a
temporary data directory: every subscriber authenticates with an access
token, and every message is stored by the DB writer before it is broadcast.
The load generator (`bench/wsload.py`) runs in this process on raw sockets.

    .venv/bin/python bench/fanout.py                       # S = 200 and 1000
    .venv/bin/python bench/fanout.py --subscribers 200 --messages 2000

The servers and the load generator share the machine's cores, so the
figures measure the whole system under CPU contention; see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsload import raise_file_limit, run_fanout, session_cpu  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Bench-Password-9"
TOPIC_NAME = "bench"

__all__ = ["main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@contextmanager
def baseline_server() -> Iterator[tuple[int, int]]:
    """Run bench/baseline_websockets.py; yield its port and session."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "baseline_websockets.py"),
            "--port",
            str(port),
        ],
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield port, process.pid
    finally:
        stop(process)


def daemon_env(var_dir: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DEEPERHUB_VAR_DIR": str(var_dir),
            "PORT": str(port),
            "GUARDIAN_SECRET_KEY": "bench-signing-key-" + "b" * 40,
            "DEEPER_HUB_LOG_LEVEL": "warning",
            "DEEPERHUB_LOG_STDERR": "0",
            "MAX_CONNECTIONS": "100000",
            "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "1000000",
            "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "1000000",
        }
    )
    env.update(extra)
    return env


@contextmanager
def deeperhub_server(extra_env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """Run `bin/deeperhub start` on a temporary directory; yield port and group."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dh-bench-") as tmp:
        var_dir = Path(tmp) / "var"
        process = subprocess.Popen(
            [sys.executable, "-m", "deeperhub.cli", "start"],
            cwd=ROOT,
            env=daemon_env(var_dir, port, extra_env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield from _run_until_healthy(process, port, var_dir)
        finally:
            stop(process)


def _run_until_healthy(
    process: subprocess.Popen[bytes], port: int, var_dir: Path
) -> Iterator[tuple[int, int]]:
    """Wait for /health, yield; on an error, print the end of the daemon's log."""
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("DeeperHub did not become healthy")
        time.sleep(0.2)
    try:
        yield port, process.pid
    except Exception:
        log = var_dir / "log" / "deeper_hub.log"
        if log.exists():
            print(log.read_text()[-4000:], file=sys.stderr)
        raise


def login(base_url: str, name: str) -> str:
    """Register `name` and return an access token."""
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    response = httpx.post(base_url + "/api/auth/register", json=body, timeout=30)
    if response.status_code not in (201, 409):
        raise RuntimeError(f"register failed: {response.text}")
    response = httpx.post(
        base_url + "/api/auth/login",
        json={"username": name, "password": PASSWORD},
        timeout=30,
    )
    return str(response.json()["access_token"])


def prepare_deeperhub(port: int) -> tuple[str, str]:
    """Create the users and the channel; return subscriber and publisher queries."""
    base_url = f"http://127.0.0.1:{port}"
    publisher = login(base_url, "publisher")
    subscriber = login(base_url, "subscriber")
    httpx.post(
        base_url + "/api/channels",
        json={"name": TOPIC_NAME},
        headers={"authorization": f"Bearer {publisher}"},
        timeout=30,
    )
    return f"token={subscriber}&vsn=2.0.0", f"token={publisher}&vsn=2.0.0"


def session_workers(session: int) -> dict[str, int]:
    """Return {worker module: pid} of the DeeperHub workers in a session."""
    workers: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if int(fields[3]) == session and b"-m" in argv:
            module = argv[argv.index(b"-m") + 1].decode()
            if module.startswith("workers."):
                workers[f"{module.split('.')[1]}-{entry}"] = int(entry)
    return workers


@contextmanager
def profiled(session: int, directory: Path | None, label: str) -> Iterator[None]:
    """Record py-spy profiles of the session's workers while the block runs."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid in session_workers(session).items():
        output = directory / f"{label}-{name}.txt"
        spies.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--output",
                    str(output),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(30)


def measure(
    server: tuple[int, int],
    queries: tuple[str, str],
    subscribers: int,
    options: argparse.Namespace,
) -> dict[str, Any]:
    port, group = server
    result = run_fanout(
        "127.0.0.1",
        port,
        subscriber_query=queries[0],
        publisher_query=queries[1],
        topic=f"channel:{TOPIC_NAME}",
        subscribers=subscribers,
        messages=options.messages,
        window=options.window,
        server_cpu=lambda: session_cpu(group),
    )
    return result.to_dict()


def main() -> None:
    """Run the measurements and print a table and JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument(
        "--acceptors", default="", help="DEEPERHUB_ACCEPTORS (default: one per core)"
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--profile",
        type=Path,
        help="folder for py-spy profiles (raw stacks) of DeeperHub's workers",
    )
    options = parser.parse_args()
    raise_file_limit()

    extra = {"DEEPERHUB_ACCEPTORS": options.acceptors} if options.acceptors else {}
    rows: list[tuple[int, dict[str, Any], dict[str, Any] | None]] = []
    with deeperhub_server(extra) as hub, baseline_server() as base:
        queries = prepare_deeperhub(hub[0])
        for subscribers in options.subscribers:
            baseline = None
            if not options.skip_baseline:
                baseline = measure(
                    base, ("vsn=2.0.0", "vsn=2.0.0"), subscribers, options
                )
                print(json.dumps({"server": "websockets", **baseline}), flush=True)
            with profiled(hub[1], options.profile, f"s{subscribers}"):
                hub_result = measure(hub, queries, subscribers, options)
            print(json.dumps({"server": "deeperhub", **hub_result}), flush=True)
            rows.append((subscribers, hub_result, baseline))

    print()
    print("| S | server | deliveries/s | p50 ms | p99 ms | server CPU | client CPU |")
    print("|---|---|---|---|---|---|---|")
    for subscribers, hub_result, baseline in rows:
        for name, result in (("websockets", baseline), ("DeeperHub", hub_result)):
            if result is None:
                continue
            print(
                f"| {subscribers} | {name} | {result['deliveries_per_second']} "
                f"| {result['p50_ms']} | {result['p99_ms']} "
                f"| {result['server_cpu_percent']}% | {result['client_cpu_percent']}% |"
            )
        if baseline:
            ratio = (
                hub_result["deliveries_per_second"] / baseline["deliveries_per_second"]
            )
            print(f"| {subscribers} | ratio to websockets | {ratio:.2f} | | | | |")


if __name__ == "__main__":
    main()
