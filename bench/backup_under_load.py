"""Backups of a live, busy DeeperHub: the sqlite3 shell versus the DB writer.

Starts a daemon on a loopback port with a temporary data directory, fills the
database with `--rows` messages, then keeps `--writers` HTTP clients posting
messages while it takes, one after the other:

1. `sqlite3 DB ".backup FILE"` followed by gzip, the classic cron job;
2. `sqlite3 DB "VACUUM INTO 'FILE'"` followed by gzip;
3. `bin/deeperhub backup`, which the DB writer takes online.

For each it reports whether it finished within `--timeout` seconds, how long
it took and how many messages per second were acknowledged meanwhile. Run
from the repository root (needs /usr/bin/sqlite3):

    .venv/bin/python bench/backup_under_load.py

Figures depend on the machine, its disk and its load.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon  # noqa: E402

PASSWORD = "correct horse battery"


def seed(db_file: Path, channel_id: int, user_id: int, rows: int) -> None:
    """Insert `rows` messages straight into the stopped daemon's database."""
    conn = apsw.Connection(str(db_file))
    body = "x" * 200
    with conn:
        conn.executemany(
            "INSERT INTO messages (channel_id, seq, user_id, body, inserted_at) "
            "VALUES (?, ?, ?, ?, '2026-01-01T00:00:00.000000Z')",
            ((channel_id, seq, user_id, body) for seq in range(1, rows + 1)),
        )
        conn.execute(
            "UPDATE channels SET last_seq = ? WHERE id = ?", (rows, channel_id)
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


class Load:
    """HTTP clients posting messages until stopped; counts acknowledgements."""

    def __init__(self, daemon: Daemon, token: str, channel_id: int, threads: int):
        self.url = f"{daemon.base_url}/api/channels/{channel_id}/messages"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.acknowledged = 0
        self.failed = 0
        self.last_failure = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    reply = client.post(
                        self.url, json={"body": "load"}, headers=self.headers
                    )
                    ok = reply.status_code == 201
                    failure = "" if ok else f"{reply.status_code} {reply.text[:100]}"
                except httpx.HTTPError as exc:
                    ok = False
                    failure = repr(exc)
                with self._lock:
                    if ok:
                        self.acknowledged += 1
                    else:
                        self.failed += 1
                        self.last_failure = failure


def timed(
    label: str, command: list[str], load: Load, timeout: float, env: dict[str, str]
) -> None:
    before = load.acknowledged
    started = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        finished = result.returncode == 0
        detail = result.stderr.strip()[-200:]
    except subprocess.TimeoutExpired:
        finished = False
        detail = f"still running after {timeout:g} s, killed"
    seconds = time.perf_counter() - started
    rate = (load.acknowledged - before) / seconds
    state = "finished" if finished else "FAILED"
    print(f"{label:<28} {state:<8} {seconds:7.2f} s  {rate:7.0f} writes/s  {detail}")


def gzip_file(path: Path) -> None:
    with path.open("rb") as source, gzip.open(f"{path}.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dh-bench-"))
    daemon = Daemon(work / "var")
    db_file = work / "var" / "db" / "deeper_hub.db"
    out = work / "out"
    out.mkdir()
    try:
        daemon.start()
        httpx.post(
            daemon.base_url + "/api/auth/register",
            json={"username": "bench", "email": "b@example.com", "password": PASSWORD},
        ).raise_for_status()
        token = httpx.post(
            daemon.base_url + "/api/auth/login",
            json={"login": "bench", "password": PASSWORD},
        ).json()["access_token"]
        channel = httpx.post(
            daemon.base_url + "/api/channels",
            json={"name": "bench"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()["channel"]
        daemon.stop()
        seed(db_file, channel["id"], channel["owner_id"], args.rows)
        daemon.start()
        size = db_file.stat().st_size
        print(f"database {size / 1e6:.1f} MB, {args.rows} seeded messages")

        load = Load(daemon, token, channel["id"], args.writers)
        load.start()
        time.sleep(2)

        shell_copy = out / "shell.db"
        timed(
            "sqlite3 .backup",
            ["sqlite3", str(db_file), f".backup '{shell_copy}'"],
            load,
            args.timeout,
            daemon.env,
        )
        if shell_copy.exists():
            gzip_file(shell_copy)
        vacuum_copy = out / "vacuum.db"
        timed(
            "sqlite3 VACUUM INTO",
            ["sqlite3", str(db_file), f"VACUUM INTO '{vacuum_copy}'"],
            load,
            args.timeout,
            daemon.env,
        )
        timed(
            "bin/deeperhub backup",
            [sys.executable, "-m", "deeperhub.cli", "backup", "--dest", str(out)],
            load,
            args.timeout,
            daemon.env,
        )
        load.stop()
        print(f"acknowledged {load.acknowledged} writes, {load.failed} failed")
        if load.failed:
            print(f"last failure: {load.last_failure}")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
