"""`bin/deeperhub backup` and `restore` against a real daemon under write load."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import threading
import time
from typing import TYPE_CHECKING

import apsw
import httpx
import pytest

from .daemon import Daemon
from .data_safety_support import login, register

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class Writer:
    """A thread posting messages as fast as the daemon acknowledges them."""

    def __init__(self, daemon: Daemon, token: str, channel_id: int) -> None:
        self.daemon = daemon
        self.token = token
        self.channel_id = channel_id
        self.acknowledged: list[str] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        number = 0
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body = f"load-{number}"
                number += 1
                try:
                    reply = client.post(
                        f"{self.daemon.base_url}/api/channels/"
                        f"{self.channel_id}/messages",
                        json={"body": body},
                        headers={"Authorization": f"Bearer {self.token}"},
                    )
                except httpx.HTTPError:
                    self.failures += 1
                    time.sleep(0.05)
                    continue
                if reply.status_code == 201:
                    self.acknowledged.append(body)
                else:
                    self.failures += 1
                    time.sleep(0.05)


def setup_channel(daemon: Daemon, name: str) -> tuple[str, int]:
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


def message_bodies(db_file: Path) -> list[str]:
    conn = apsw.Connection(str(db_file), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT body FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    return [str(row[0]) for row in rows]


def unpack(backup: Path, target: Path) -> Path:
    with gzip.open(backup, "rb") as source, target.open("wb") as out:
        shutil.copyfileobj(source, out)
    return target


@pytest.fixture
def daemon_with_load(tmp_path: Path) -> Iterator[tuple[Daemon, str, int]]:
    instance = Daemon(tmp_path / "var")
    instance.start()
    try:
        token, channel_id = setup_channel(instance, "loader")
        yield instance, token, channel_id
    finally:
        instance.stop()


@pytest.mark.timeout(120)
def test_backup_cli_under_write_load(
    daemon_with_load: tuple[Daemon, str, int], tmp_path: Path
) -> None:
    daemon, token, channel_id = daemon_with_load
    dest = tmp_path / "backups"
    with Writer(daemon, token, channel_id) as writer:
        time.sleep(0.5)
        results = []
        for _ in range(3):
            result = daemon.cli("backup", "--dest", str(dest), "--keep", "2", "--json")
            assert result.returncode == 0, result.stderr
            results.append(result)
        time.sleep(0.3)
    assert writer.acknowledged, "the write load did not run"

    files = sorted(dest.iterdir())
    assert [path.suffixes[-2:] for path in files] == [[".db", ".gz"]] * 2
    newest = unpack(files[-1], tmp_path / "newest.db")
    conn = apsw.Connection(str(newest))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    in_backup = message_bodies(newest)
    # A consistent snapshot: a prefix of the acknowledged messages, in order.
    assert in_backup == writer.acknowledged[: len(in_backup)]
    assert in_backup


@pytest.mark.timeout(120)
def test_restore_rejected_while_running(
    daemon_with_load: tuple[Daemon, str, int], tmp_path: Path
) -> None:
    daemon, _, _ = daemon_with_load
    made = daemon.cli("backup", "--dest", str(tmp_path / "b"))
    assert made.returncode == 0, made.stderr
    (backup,) = (tmp_path / "b").iterdir()
    result = daemon.cli("restore", str(backup))
    assert result.returncode == 2
    assert "running" in result.stderr
    assert "bin/deeperhub stop" in result.stderr


@pytest.mark.timeout(120)
def test_restore_cli_after_stop(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    try:
        token, channel_id = setup_channel(daemon, "rosa")
        for body in ("kept-1", "kept-2"):
            httpx.post(
                f"{daemon.base_url}/api/channels/{channel_id}/messages",
                json={"body": body},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ).raise_for_status()
        made = daemon.cli("backup", "--dest", str(tmp_path / "b"))
        assert made.returncode == 0, made.stderr
        httpx.post(
            f"{daemon.base_url}/api/channels/{channel_id}/messages",
            json={"body": "after-backup"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).raise_for_status()
    finally:
        daemon.stop()

    (backup,) = (tmp_path / "b").iterdir()
    result = daemon.cli("restore", str(backup))
    assert result.returncode == 0, result.stderr
    db_dir = tmp_path / "var" / "db"
    (aside,) = db_dir.glob("deeper_hub.db.before-restore-*")
    assert "after-backup" in message_bodies(aside)

    daemon.start()
    try:
        reply = httpx.get(
            f"{daemon.base_url}/api/channels/{channel_id}/messages",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert [m["body"] for m in reply.json()["messages"]] == ["kept-1", "kept-2"]
    finally:
        daemon.stop()


@pytest.mark.timeout(120)
def test_manual_restore_after_kill(tmp_path: Path) -> None:
    """Stop by kill -9 (stale -wal and -shm), gunzip over the file, start."""
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    db_file = tmp_path / "var" / "db" / "deeper_hub.db"
    try:
        token, channel_id = setup_channel(daemon, "kim")
        made = daemon.cli("backup", "--dest", str(tmp_path / "b"))
        assert made.returncode == 0, made.stderr
        for number in range(50):
            httpx.post(
                f"{daemon.base_url}/api/channels/{channel_id}/messages",
                json={"body": f"lost-{number}"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ).raise_for_status()
        assert daemon.process is not None
        os.killpg(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(10)
    finally:
        daemon.stop()
    wal = db_file.with_name("deeper_hub.db-wal")
    assert wal.stat().st_size > 32, "the kill left no WAL to test with"

    (backup,) = (tmp_path / "b").iterdir()
    unpack(backup, db_file)  # gunzip -c BACKUP > deeper_hub.db

    daemon.start()
    try:
        reply = httpx.get(
            f"{daemon.base_url}/api/channels/{channel_id}/messages",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert reply.status_code == 200
        assert reply.json()["messages"] == []
    finally:
        daemon.stop()
    conn = apsw.Connection(str(db_file))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    assert list(db_file.parent.glob("deeper_hub.db-wal.foreign-*"))
