"""The real daemon end to end: HTTP API, Phoenix WebSocket, supervision, CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from websockets.sync.client import connect

if TYPE_CHECKING:
    from pathlib import Path

    from .daemon import Daemon

PASSWORD = "Correct-Horse-9"


def register_and_login(daemon: Daemon, name: str) -> dict[str, Any]:
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    registered = httpx.post(daemon.base_url + "/api/auth/register", json=body)
    assert registered.status_code == 201, registered.text
    login = httpx.post(
        daemon.base_url + "/api/auth/login",
        json={"username": name, "password": PASSWORD},
    )
    assert login.status_code == 200, login.text
    tokens = login.json()
    return {"id": registered.json()["user"]["id"], **tokens}


def auth(user: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {user['access_token']}"}


class PhoenixClient:
    """A V2 Phoenix Channels client over a real WebSocket."""

    def __init__(self, url: str, token: str) -> None:
        self._connection = connect(f"{url}?token={token}&vsn=2.0.0", open_timeout=5)
        self.ws = self._connection.__enter__()
        self.ref = 0
        self.inbox: list[list[Any]] = []

    def push(
        self,
        topic: str,
        event: str,
        payload: dict[str, Any],
        join_ref: str | None = None,
    ) -> str:
        self.ref += 1
        ref = str(self.ref)
        self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        return ref

    def receive_until(self, predicate: Any, timeout: float = 5) -> list[Any]:
        for index, frame in enumerate(self.inbox):
            if predicate(frame):
                return self.inbox.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; inbox: {self.inbox}")
            frame = json.loads(self.ws.recv(timeout=remaining))
            if predicate(frame):
                return frame
            self.inbox.append(frame)

    def reply(self, ref: str) -> dict[str, Any]:
        frame = self.receive_until(lambda f: f[3] == "phx_reply" and f[1] == ref)
        return dict(frame[4])

    def join(self, topic: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        ref = self.push(topic, "phx_join", payload or {})
        self.ref_of_join = ref
        return self.reply(ref)

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


def test_health_reports_every_worker(daemon: Daemon) -> None:
    health = daemon.wait_healthy()
    assert set(health["workers"]) >= {
        "db_writer",
        "alert_dispatcher",
        "security_monitor",
        "acceptor-1",
    }


def test_chat_flow_over_websocket(daemon: Daemon) -> None:
    alice = register_and_login(daemon, "alice")
    bob = register_and_login(daemon, "bob")
    created = httpx.post(
        daemon.base_url + "/api/channels", json={"name": "lobby"}, headers=auth(alice)
    )
    assert created.status_code == 201, created.text

    a = PhoenixClient(daemon.ws_url, alice["access_token"])
    b = PhoenixClient(daemon.ws_url, bob["access_token"])
    try:
        assert a.join("channel:lobby")["status"] == "ok"
        assert b.join("channel:lobby")["status"] == "ok"
        ref = a.push("channel:lobby", "new_msg", {"body": "hello"}, a.ref_of_join)
        reply = a.reply(ref)
        assert reply["status"] == "ok"
        message_id = reply["response"]["id"]
        got = b.receive_until(lambda f: f[3] == "new_msg")
        assert got[4]["id"] == message_id
        assert got[4]["body"] == "hello"
        assert got[4]["user_id"] == alice["id"]
        assert got[0] is None
        assert got[1] is None
    finally:
        a.close()
        b.close()

    history = httpx.get(
        daemon.base_url + f"/api/channels/{created.json()['channel']['id']}/messages",
        headers=auth(bob),
    )
    assert [m["body"] for m in history.json()["messages"]] == ["hello"]


def test_websocket_rejects_bad_token(daemon: Daemon) -> None:
    response = httpx.get(
        daemon.ws_url.replace("ws://", "http://") + "?token=nope&vsn=2.0.0",
        headers={
            "connection": "Upgrade",
            "upgrade": "websocket",
            "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "invalid_token"


@pytest.mark.parametrize(
    "worker", ["db_writer", "alert_dispatcher", "security_monitor", "acceptor-1"]
)
def test_killed_worker_is_restarted(daemon: Daemon, worker: str) -> None:
    old_pid = daemon.worker_pid(worker)
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = daemon.status()["workers"]
        if workers[worker]["pid"] not in (None, old_pid) and all(
            w["state"] == "running" for w in workers.values()
        ):
            break
        time.sleep(0.1)
    workers = daemon.status()["workers"]
    assert workers[worker]["pid"] != old_pid
    assert workers[worker]["restarts"] == 1
    daemon.wait_healthy()
    user = register_and_login(daemon, f"after_{worker}")
    me = httpx.get(daemon.base_url + "/api/users/me", headers=auth(user))
    assert me.status_code == 200


def test_sigterm_stops_everything_with_status_zero(daemon: Daemon) -> None:
    pids = [w["pid"] for w in daemon.status()["workers"].values()]
    assert daemon.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_status_exit_codes(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.cli("status").returncode == 0
    supervisor_pid = int(daemon.cli("pid").stdout)
    daemon.stop()
    stopped = daemon.cli("status")
    assert stopped.returncode == 3, stopped.stdout
    # A pidfile left behind by a killed instance: "dead", exit 1.
    (daemon.var_dir / "run" / "deeperhub.pid").write_text(f"{supervisor_pid}\n")
    dead = daemon.cli("status")
    assert dead.returncode == 1, dead.stdout


def test_second_instance_is_rejected(daemon: Daemon) -> None:
    second = daemon.cli("start", timeout=30)
    assert second.returncode == 2
    assert "another DeeperHub instance is running" in second.stderr
    daemon.wait_healthy()


def test_invalid_setting_names_the_variable(tmp_path: Path) -> None:
    from .daemon import Daemon as DaemonClass

    instance = DaemonClass(tmp_path / "var", env={"PORT": "eighty"})
    result = instance.cli("start", timeout=30)
    assert result.returncode == 78
    assert "PORT" in result.stderr
    assert "'eighty'" in result.stderr
    assert "integer from 1 to 65535" in result.stderr


def test_prod_requires_strong_key(tmp_path: Path) -> None:
    from .daemon import Daemon as DaemonClass

    instance = DaemonClass(
        tmp_path / "var", env={"DEEPERHUB_ENV": "prod", "GUARDIAN_SECRET_KEY": "short"}
    )
    result = instance.cli("start", timeout=30)
    assert result.returncode == 78
    assert "GUARDIAN_SECRET_KEY" in result.stderr
    assert "32 bytes" in result.stderr


def test_workers_stay_up_while_idle(daemon: Daemon) -> None:
    """Workers outlive the supervisor's idle helper threads (about 10 s in trio)."""
    before = daemon.status()["workers"]
    time.sleep(12)
    after = daemon.status()["workers"]
    for worker_id, worker in after.items():
        assert worker["restarts"] == 0, worker_id
        assert worker["pid"] == before[worker_id]["pid"], worker_id
