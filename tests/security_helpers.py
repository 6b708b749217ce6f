"""Helpers for the security end-to-end tests: daemons with a TOML file, receivers.

Each daemon gets its own short temporary folder, because Unix socket paths are
limited to 107 bytes, and a TOML file with the settings under test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from deeperhub.ipc import open_rpc_client
from deeperhub.storage.database import open_read_connection

from .daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "PASSWORD",
    "WebhookReceiver",
    "monitor_call",
    "open_daemon",
    "query_db",
    "register",
    "wait_for",
    "write_toml",
]

PASSWORD = "Correct-Horse-9"
# Settings that keep the security tests fast: scores are recomputed and alert
# groups flushed every 100 ms, and rate limits are far away unless a test
# lowers them.
FAST = {
    "ip_reputation.check_interval": 100,
    "security.rate_limit_api": 100_000,
    "security.rate_limit_ws": 100_000,
    "security_alerts.retry_base_delay": 0.1,
    "security_alerts.retry_max_delay": 0.5,
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def write_toml(path: Path, settings: dict[str, Any]) -> Path:
    """Write `{"section.key": value}` settings as a TOML file."""
    sections: dict[str, list[str]] = {}
    for key, value in settings.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
    text = "".join(
        f"[{section}]\n" + "\n".join(lines) + "\n\n"
        for section, lines in sections.items()
    )
    path.write_text(text)
    return path


@contextmanager
def open_daemon(
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    folder: Path | None = None,
) -> Iterator[Daemon]:
    """Start a daemon with FAST plus `settings`; stop it and clean up after.

    Pass `folder` to reuse a data directory (a restart); it is then kept.
    """
    owned = folder is None
    base = folder or Path(tempfile.mkdtemp(prefix="dh-sec-"))
    merged = {**FAST, **(settings or {})}
    config = write_toml(base / "test.toml", merged)
    all_env = {
        "DEEPERHUB_CONFIG_FILE": str(config),
        # These variables would override the file, so set them to its values.
        "DEEPER_HUB_SECURITY_RATE_LIMIT_API": str(merged["security.rate_limit_api"]),
        "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": str(merged["security.rate_limit_ws"]),
        **(env or {}),
    }
    daemon = Daemon(base / "var", env=all_env)
    # The harness allowlists loopback for the other tests; these use the file.
    if "DEEPER_HUB_SECURITY_ALLOWLIST" not in (env or {}):
        daemon.env.pop("DEEPER_HUB_SECURITY_ALLOWLIST", None)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        if owned:
            shutil.rmtree(base, ignore_errors=True)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Return the first true value of `predicate()`, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def monitor_call(daemon: Daemon, op: str, **args: Any) -> Any:
    """Send one request to the daemon's security monitor and return the result."""
    path = daemon.var_dir / "run" / "security.sock"

    async def call() -> Any:
        with trio.fail_after(10):
            async with open_rpc_client(path) as client:
                return await client.call(op, **args)

    return trio.run(call)


def query_db(daemon: Daemon, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run a read-only query on the daemon's database."""
    conn = open_read_connection(daemon.var_dir / "db" / "deeper_hub.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def register(daemon: Daemon, name: str) -> dict[str, Any]:
    """Register `name`, log in, and return `{id, access_token, ...}`."""
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    registered = httpx.post(daemon.base_url + "/api/auth/register", json=body)
    assert registered.status_code == 201, registered.text
    login = httpx.post(
        daemon.base_url + "/api/auth/login",
        json={"username": name, "password": PASSWORD},
    )
    assert login.status_code == 200, login.text
    return {"id": registered.json()["user"]["id"], **login.json()}


class WebhookReceiver:
    """An HTTP server on loopback that records POSTs and responds with `status`.

    With `delay` set, it waits that many seconds before it responds.
    """

    def __init__(self, port: int, status: int = 204) -> None:
        self.port = port
        self.status = status
        self.delay = 0.0
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/security"

    def received(self) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return list(self.requests)

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received()]

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._lock:
                    receiver.requests.append((headers, body))
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
