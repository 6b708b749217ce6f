"""Supervision with real processes: kills, hangs, supervisor death, leaks."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PASSWORD = "Correct-Horse-9"

FAST_SUPERVISION = """
[supervisor]
intensity = 100
period = 5
liveness_interval = 0.3
liveness_timeout = 2
shutdown_timeout = 5
"""


@pytest.fixture
def fast_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with quick liveness checks and a high restart intensity."""
    config = tmp_path / "deeperhub.toml"
    config.write_text(FAST_SUPERVISION)
    instance = Daemon(tmp_path / "var", env={"DEEPERHUB_CONFIG_FILE": str(config)})
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def login(daemon: Daemon, name: str) -> dict[str, str]:
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    assert (
        httpx.post(daemon.base_url + "/api/auth/register", json=body).status_code == 201
    )
    response = httpx.post(
        daemon.base_url + "/api/auth/login",
        json={"username": name, "password": PASSWORD},
    )
    return {"authorization": f"Bearer {response.json()['access_token']}"}


def wait_for_new_pid(daemon: Daemon, worker: str, old_pid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = daemon.status()["workers"]
        if workers.get(worker, {}).get("pid") not in (None, old_pid) and all(
            w["state"] == "running" for w in workers.values()
        ):
            return dict(workers)
        time.sleep(0.1)
    raise TimeoutError(f"{worker} was not restarted:\n{daemon.logs()}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Publisher(threading.Thread):
    """Posts numbered messages until stopped; records the ones acknowledged."""

    def __init__(self, daemon: Daemon, channel_id: int, headers: dict[str, str]):
        super().__init__(daemon=True)
        self.url = f"{daemon.base_url}/api/channels/{channel_id}/messages"
        self.headers = headers
        self.acknowledged: dict[int, str] = {}
        self.failures = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            n = 0
            while not self.halt.is_set():
                n += 1
                body = f"message {n}"
                try:
                    response = client.post(
                        self.url, json={"body": body}, headers=self.headers
                    )
                except httpx.HTTPError:
                    self.failures += 1
                    time.sleep(0.05)
                    continue
                if response.status_code == 201:
                    self.acknowledged[response.json()["message"]["id"]] = body
                else:
                    self.failures += 1
                    time.sleep(0.05)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "worker", ["db_writer", "acceptor-1", "security_monitor", "alert_dispatcher"]
)
def test_kill_under_load_loses_nothing(fast_daemon: Daemon, worker: str) -> None:
    headers = login(fast_daemon, "writer")
    created = httpx.post(
        fast_daemon.base_url + "/api/channels", json={"name": "load"}, headers=headers
    )
    channel_id = created.json()["channel"]["id"]

    publisher = Publisher(fast_daemon, channel_id, headers)
    publisher.start()
    try:
        time.sleep(1.0)
        old_pid = fast_daemon.worker_pid(worker)
        os.kill(old_pid, signal.SIGKILL)
        workers = wait_for_new_pid(fast_daemon, worker, old_pid)
        assert workers[worker]["restarts"] == 1
        fast_daemon.wait_healthy()
        before = len(publisher.acknowledged)
        deadline = time.monotonic() + 15
        while len(publisher.acknowledged) <= before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(publisher.acknowledged) > before, "publishing did not resume"
    finally:
        publisher.halt.set()
        publisher.join(10)

    stored: dict[int, str] = {}
    after_id = 0
    while True:
        page = httpx.get(
            f"{fast_daemon.base_url}/api/channels/{channel_id}/messages",
            params={"after_id": after_id, "limit": 500},
            headers=headers,
        ).json()["messages"]
        if not page:
            break
        for message in page:
            assert message["id"] not in stored, "message stored twice"
            stored[message["id"]] = message["body"]
        after_id = page[-1]["id"]

    assert publisher.acknowledged, "nothing was acknowledged"
    for message_id, body in publisher.acknowledged.items():
        assert stored.get(message_id) == body
    bodies = list(stored.values())
    assert len(bodies) == len(set(bodies)), "a body was stored twice"


@pytest.mark.timeout(60)
def test_stopped_worker_is_killed_and_restarted(fast_daemon: Daemon) -> None:
    old_pid = fast_daemon.worker_pid("security_monitor")
    os.kill(old_pid, signal.SIGSTOP)
    try:
        workers = wait_for_new_pid(fast_daemon, "security_monitor", old_pid)
    finally:
        if alive(old_pid):
            os.kill(old_pid, signal.SIGKILL)
    assert workers["security_monitor"]["restarts"] == 1
    runtime_log = (fast_daemon.var_dir / "log" / "runtime.log").read_text()
    assert "did not answer a ping" in runtime_log
    assert "signal SIGKILL" in runtime_log


@pytest.mark.timeout(60)
def test_supervisor_kill_leaves_no_workers(daemon: Daemon) -> None:
    pids = [w["pid"] for w in daemon.status()["workers"].values()]
    assert daemon.process is not None
    os.kill(daemon.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    leftovers = [pid for pid in pids if alive(pid)]
    assert leftovers == []
    # The next start reuses the data directory: the stale pidfile and
    # sockets of the killed instance must not block it.
    daemon.process.wait(5)
    daemon.process = None
    daemon.console.close()
    daemon.start()
    assert daemon.cli("status").returncode == 0


@pytest.mark.timeout(240)
def test_start_stop_cycles_leak_nothing(tmp_path: Path) -> None:
    instance = Daemon(tmp_path / "var")
    run_dir = instance.var_dir / "run"
    for cycle in range(20):
        instance.start()
        pids = [w["pid"] for w in instance.status()["workers"].values()]
        assert instance.stop() == 0, f"cycle {cycle}"
        assert [pid for pid in pids if alive(pid)] == [], f"cycle {cycle}"
        assert sorted(p.name for p in run_dir.glob("*.sock")) == [], f"cycle {cycle}"
        assert not (run_dir / "deeperhub.pid").exists(), f"cycle {cycle}"


@pytest.mark.timeout(120)
def test_worker_restarts_do_not_leak_fds(fast_daemon: Daemon) -> None:
    assert fast_daemon.process is not None
    supervisor_fds = f"/proc/{fast_daemon.process.pid}/fd"

    def restart_once() -> None:
        old_pid = fast_daemon.worker_pid("alert_dispatcher")
        os.kill(old_pid, signal.SIGKILL)
        wait_for_new_pid(fast_daemon, "alert_dispatcher", old_pid)

    restart_once()
    baseline = len(os.listdir(supervisor_fds))
    for _ in range(20):
        restart_once()
        time.sleep(0.1)
    assert len(os.listdir(supervisor_fds)) <= baseline + 2


def test_restart_counts_appear_in_metrics(fast_daemon: Daemon) -> None:
    old_pid = fast_daemon.worker_pid("alert_dispatcher")
    os.kill(old_pid, signal.SIGKILL)
    wait_for_new_pid(fast_daemon, "alert_dispatcher", old_pid)
    text = httpx.get(fast_daemon.base_url + "/metrics").text
    assert 'deeperhub_worker_restarts_total{worker="alert_dispatcher"} 1.0' in text
    runtime_log = (fast_daemon.var_dir / "log" / "runtime.log").read_text()
    assert "alert_dispatcher of deeperhub exited with signal SIGKILL" in runtime_log


@pytest.mark.parametrize(("reason", "code"), [("restart", 1012), ("shutdown", 1001)])
def test_stop_closes_websockets_with_reason_code(
    daemon: Daemon, reason: str, code: int
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from deeperhub.cli import _request_stop
    from deeperhub.config import load_settings

    headers = login(daemon, "listener")
    token = headers["authorization"].removeprefix("Bearer ")
    settings = load_settings(daemon.env, create_dev_key=False)
    with connect(f"{daemon.ws_url}?token={token}&vsn=2.0.0") as websocket:
        assert _request_stop(settings, reason)
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == code
    assert daemon.process is not None
    assert daemon.process.wait(30) == 0
