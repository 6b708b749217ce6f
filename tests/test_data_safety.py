"""Data safety of a real daemon: corrupt files, killed DB writers, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import apsw
import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .daemon import ROOT, Daemon
from .data_safety_support import PhoenixClient, eventually, login, register

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

DB_WRITER_KILLS = 4


def _post(daemon: Daemon, token: str, channel_id: int, body: str) -> httpx.Response:
    return httpx.post(
        f"{daemon.base_url}/api/channels/{channel_id}/messages",
        json={"body": body},
        headers={"Authorization": f"Bearer {token}"},
        timeout=15,
    )


def _channel(daemon: Daemon, name: str) -> tuple[str, int]:
    register(daemon, name)
    token = login(daemon, name)["access_token"]
    reply = httpx.post(
        daemon.base_url + "/api/channels",
        json={"name": f"{name}-room"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    return token, int(reply.json()["channel"]["id"])


@pytest.mark.timeout(120)
def test_corrupt_database_stops_start(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    daemon.stop()
    db_file = tmp_path / "var" / "db" / "deeper_hub.db"
    with db_file.open("r+b") as handle:
        for offset in range(4096, db_file.stat().st_size, 4096):
            handle.seek(offset)
            handle.write(b"\xff" * 64)

    result = subprocess.run(
        [sys.executable, "-m", "deeperhub.cli", "start"],
        cwd=ROOT,
        env={**daemon.env, "DEEPERHUB_LOG_STDERR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"database {db_file} is corrupt" in result.stderr
    assert "bin/deeperhub restore" in result.stderr
    log = (tmp_path / "var" / "log" / "deeper_hub.log").read_text()
    assert f"DB writer db_writer cannot start: database {db_file}" in log


class Pusher:
    """A WebSocket client pushing `new_msg` and recording acknowledged bodies.

    It reconnects after errors, because a killed DB writer may end a push with
    an error reply and the acceptor may be restarted as well.
    """

    def __init__(self, daemon: Daemon, token: str, topic: str, name: str) -> None:
        self.daemon = daemon
        self.token = token
        self.topic = topic
        self.name = name
        self.acknowledged: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            try:
                client = PhoenixClient(self.daemon, self.token)
            except (OSError, InvalidHandshake, TimeoutError):
                self.errors += 1
                time.sleep(0.1)
                continue
            try:
                if client.join(self.topic)["status"] != "ok":
                    self.errors += 1
                    continue
                while not self._stop.is_set():
                    body = f"{self.name}-{number}"
                    number += 1
                    reply = client.reply(
                        client.push(self.topic, "new_msg", {"body": body})
                    )
                    if reply["status"] == "ok":
                        self.acknowledged.append(body)
                    else:
                        self.errors += 1
                        time.sleep(0.02)
            except (ConnectionClosed, OSError, TimeoutError):
                self.errors += 1
            finally:
                client.close()


@pytest.mark.timeout(180)
def test_kill_db_writer_loses_no_acknowledged_message(tmp_path: Path) -> None:
    # Up to DB_WRITER_KILLS restarts inside the window must not make the
    # supervisor give up.
    daemon = Daemon(
        tmp_path / "var",
        {
            "DEEPERHUB_CONFIG_FILE": str(
                _write(tmp_path, "[supervisor]\nintensity = 20\n")
            )
        },
    )
    daemon.start()
    try:
        token, channel_id = _channel(daemon, "pat")
        acknowledged_http: list[str] = []
        stop = threading.Event()

        def post_loop() -> None:
            number = 0
            while not stop.is_set():
                body = f"http-{number}"
                number += 1
                try:
                    reply = _post(daemon, token, channel_id, body)
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if reply.status_code == 201:
                    acknowledged_http.append(body)
                else:
                    time.sleep(0.02)

        poster = threading.Thread(target=post_loop, daemon=True)
        with Pusher(daemon, token, "channel:pat-room", "ws") as pusher:
            poster.start()
            for _ in range(DB_WRITER_KILLS):
                time.sleep(1.0)
                old_pid = daemon.worker_pid("db_writer")
                os.kill(old_pid, signal.SIGKILL)
                eventually(lambda old=old_pid: _running_pid(daemon, old), timeout=30)
            time.sleep(1.0)
            stop.set()
            poster.join(30)
    finally:
        daemon.stop()

    acknowledged = acknowledged_http + pusher.acknowledged
    assert len(acknowledged_http) > 10
    assert len(pusher.acknowledged) > 10
    db_file = tmp_path / "var" / "db" / "deeper_hub.db"
    conn = apsw.Connection(str(db_file))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        counts = dict(
            conn.execute("SELECT body, count(*) FROM messages GROUP BY body").fetchall()
        )
    finally:
        conn.close()
    missing = [body for body in acknowledged if counts.get(body) != 1]
    assert missing == []
    assert all(count == 1 for count in counts.values())


def _running_pid(daemon: Daemon, old_pid: int) -> bool:
    try:
        worker = daemon.status()["workers"]["db_writer"]
    except (KeyError, ValueError, json.JSONDecodeError):
        return False
    return worker.get("state") == "running" and worker.get("pid") not in (None, old_pid)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "safety.toml"
    path.write_text(text)
    return path


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for the test and unmounted after it."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(mount_point: Path, leave_bytes: int) -> Path:
    filler = mount_point / "filler"
    free = shutil.disk_usage(mount_point).free
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler


@pytest.mark.timeout(120)
def test_disk_full_rejects_writes_then_recovers(small_mount: Path) -> None:
    var_dir = small_mount.parent / "var"
    daemon = Daemon(var_dir, {"DEEPER_HUB_DB_PATH": str(small_mount / "hub.db")})
    daemon.start()
    try:
        token, channel_id = _channel(daemon, "fay")
        assert _post(daemon, token, channel_id, "before").status_code == 201
        filler = _fill(small_mount, 64 * 1024)

        statuses: list[int] = []
        for number in range(200):
            reply = _post(daemon, token, channel_id, f"fill-{number}-" + "x" * 8000)
            statuses.append(reply.status_code)
            if reply.status_code != 201:
                failed = reply
                break
        assert statuses[-1] == 503, statuses
        assert failed.json()["error"]["code"] == "service_unavailable"

        # Reads keep working, and the refused message is not stored.
        history = httpx.get(
            f"{daemon.base_url}/api/channels/{channel_id}/messages?limit=500",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert history.status_code == 200
        bodies = [message["body"] for message in history.json()["messages"]]
        assert bodies[0] == "before"
        assert not any(body.startswith(f"fill-{len(statuses) - 1}-") for body in bodies)
        log = (var_dir / "log" / "deeper_hub.log").read_text()
        assert "full" in log

        filler.unlink()
        assert _post(daemon, token, channel_id, "after").status_code == 201
    finally:
        daemon.stop()
