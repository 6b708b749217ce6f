"""A real DeeperHub daemon in a subprocess, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Daemon", "free_port"]


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """`deeperhub start` on a free loopback port with its own data directory."""

    def __init__(self, var_dir: Path, env: dict[str, str] | None = None) -> None:
        self.var_dir = var_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/socket/websocket"
        self.env = dict(os.environ)
        self.env.update(
            {
                "DEEPERHUB_VAR_DIR": str(var_dir),
                "PORT": str(self.port),
                "GUARDIAN_SECRET_KEY": "test-secret-key-of-at-least-32-bytes!!",
                "DEEPER_HUB_LOG_LEVEL": "info",
                "DEEPERHUB_LOG_STDERR": "0",
                # Fast argon2 would change what is tested; keep the defaults.
                # Every test client is 127.0.0.1, so the security limits and
                # blocks would hit unrelated tests. The security tests undo
                # these (tests/security_helpers.py).
                "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "1000000",
                "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "1000000",
                "DEEPER_HUB_SECURITY_ALLOWLIST": "127.0.0.1,::1",
            }
        )
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `bin/deeperhub ARGS` against this daemon's data directory."""
        return subprocess.run(
            [sys.executable, "-m", "deeperhub.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 30) -> None:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.console = (self.var_dir / "test-console.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deeperhub.cli", "start"],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.console,
            stderr=self.console,
            start_new_session=True,
        )
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.process.returncode}:\n{self.logs()}"
                )
            try:
                response = httpx.get(self.base_url + "/health", timeout=2)
                last = response.text
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(
            f"daemon not healthy after {timeout} s: {last}\n{self.logs()}"
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        return dict(json.loads(result.stdout))

    def worker_pid(self, worker_id: str) -> int:
        return int(self.status()["workers"][worker_id]["pid"])

    def logs(self) -> str:
        parts = []
        for name in ("runtime.log", "deeper_hub.log"):
            path = self.var_dir / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text()[-6000:])
        console = self.var_dir / "test-console.log"
        if console.exists():
            parts.append("--- console\n" + console.read_text()[-3000:])
        return "\n".join(parts)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the supervisor and wait; kill the process group if it hangs."""
        if self.process is None:
            return 0
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait(5)
        # Workers share the session; none may outlive the test.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.console.close()
        return code
