"""Helpers for the token, backup and data safety tests against a real daemon."""

from __future__ import annotations

import json
import secrets
import socket
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import jwt
from websockets.sync.client import connect

from deeperhub.auth.keys import key_id

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from websockets.sync.client import ClientConnection

    from .daemon import Daemon

__all__ = [
    "DAEMON_KEY",
    "PASSWORD",
    "PhoenixClient",
    "craft_token",
    "eventually",
    "login",
    "register",
    "upgrade_status",
    "write_config",
]

# The key tests/daemon.py gives every daemon.
DAEMON_KEY = "test-secret-key-of-at-least-32-bytes!!"
PASSWORD = "correct horse battery"


def write_config(var_dir: Path, text: str) -> dict[str, str]:
    """Write a TOML config file under `var_dir`; return the env that selects it."""
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / "test.toml"
    path.write_text(text)
    return {"DEEPERHUB_CONFIG_FILE": str(path)}


def register(daemon: Daemon, name: str) -> dict[str, Any]:
    reply = httpx.post(
        daemon.base_url + "/api/auth/register",
        json={"username": name, "email": f"{name}@example.com", "password": PASSWORD},
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    return dict(reply.json()["user"])


def login(daemon: Daemon, name: str) -> dict[str, Any]:
    reply = httpx.post(
        daemon.base_url + "/api/auth/login",
        json={"login": name, "password": PASSWORD},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def craft_token(
    user_id: int, *, key: str = DAEMON_KEY, algorithm: str = "HS256", **changes: Any
) -> str:
    """Sign access claims for `user_id` with `changes` applied (None removes a claim).

    A `kid` change sets the header instead of a claim.
    """
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "jti": secrets.token_urlsafe(8),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "iss": "deeperhub",
        "aud": "deeperhub",
        "typ": "access",
    }
    kid = changes.pop("kid", key_id(key))
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def upgrade_status(daemon: Daemon, token: str, timeout: float = 10) -> int:
    """Send a WebSocket upgrade with `token` and return the HTTP status code."""
    request = (
        f"GET /socket/websocket?vsn=2.0.0&token={quote(token)} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{daemon.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class PhoenixClient:
    """A blocking Phoenix Channels V2 client over `websockets.sync`."""

    def __init__(self, daemon: Daemon, token: str) -> None:
        self._stack = ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(
            connect(
                f"{daemon.ws_url}?vsn=2.0.0&token={quote(token)}",
                open_timeout=10,
                close_timeout=2,
            )
        )
        self._ref = 0

    def push(self, topic: str, event: str, payload: dict[str, Any]) -> str:
        self._ref += 1
        ref = str(self._ref)
        join_ref = ref if event == "phx_join" else None
        self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        return ref

    def receive(self, timeout: float = 10) -> list[Any]:
        return list(json.loads(self.ws.recv(timeout=timeout)))

    def reply(self, ref: str, timeout: float = 10) -> dict[str, Any]:
        """Return the payload of the `phx_reply` to `ref`, skipping other frames."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.receive(max(0.01, deadline - time.monotonic()))
            if frame[3] == "phx_reply" and frame[1] == ref:
                return dict(frame[4])

    def join(self, topic: str) -> dict[str, Any]:
        return self.reply(self.push(topic, "phx_join", {}))

    def frames_until_close(self, timeout: float = 10) -> list[list[Any]]:
        """Read frames until the server closes; return them."""
        from websockets.exceptions import ConnectionClosed

        frames = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                frames.append(self.receive(max(0.01, deadline - time.monotonic())))
        except ConnectionClosed:
            return frames

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    def close(self) -> None:
        self._stack.close()
