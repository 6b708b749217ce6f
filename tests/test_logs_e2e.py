"""Log files: two of them, reopened after logrotate moves them, no secrets."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from pathlib import Path

    from .daemon import Daemon

PASSWORD = "Correct-Horse-9-secret"


def wait_for_text(path: Path, text: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text():
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    return False


def test_runtime_and_application_logs_are_separate(daemon: Daemon) -> None:
    log_dir = daemon.var_dir / "log"
    runtime = (log_dir / "runtime.log").read_text()
    application = (log_dir / "deeper_hub.log").read_text()
    assert "child db_writer of deeperhub started" in runtime
    assert "worker db_writer ready" in application
    assert "worker db_writer ready" not in runtime


def test_moved_log_is_reopened(daemon: Daemon) -> None:
    log_dir = daemon.var_dir / "log"
    (log_dir / "deeper_hub.log").rename(log_dir / "deeper_hub.log.1")
    (log_dir / "runtime.log").rename(log_dir / "runtime.log.1")
    body = {"username": "rotated", "email": "r@example.test", "password": "x"}
    httpx.post(daemon.base_url + "/api/auth/login", json=body)
    # A worker restart writes to both logs.
    os.kill(daemon.worker_pid("alert_dispatcher"), signal.SIGKILL)
    assert wait_for_text(log_dir / "runtime.log", "alert_dispatcher", timeout=10)
    assert wait_for_text(log_dir / "deeper_hub.log", "alert_dispatcher", timeout=10)


def test_secrets_never_logged(daemon: Daemon) -> None:
    base = daemon.base_url
    body = {"username": "secretive", "email": "s@example.test", "password": PASSWORD}
    assert httpx.post(base + "/api/auth/register", json=body).status_code == 201
    tokens = httpx.post(
        base + "/api/auth/login", json={"username": "secretive", "password": PASSWORD}
    ).json()
    httpx.post(
        base + "/api/auth/login",
        json={"username": "secretive", "password": "bad-guess-1"},
    )
    httpx.post(
        base + "/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    httpx.post(
        base + "/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    headers = {"authorization": f"Bearer {tokens['access_token']}"}
    httpx.get(base + "/api/users/me", headers=headers)
    httpx.get(base + "/socket/websocket?token=" + tokens["access_token"])
    time.sleep(0.5)

    logs = daemon.logs()
    for secret in (
        PASSWORD,
        "bad-guess-1",
        tokens["access_token"],
        tokens["refresh_token"],
        daemon.env["GUARDIAN_SECRET_KEY"],
    ):
        assert secret not in logs
