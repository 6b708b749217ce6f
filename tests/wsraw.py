"""Blocking WebSocket and Phoenix clients over raw sockets, for end-to-end tests.

`RawWebSocket` writes the frames that a test builds, including frames that
break RFC 6455, and parses what the server sends back. `Phoenix` speaks
Phoenix Channels V2 on top of it. Both use plain blocking sockets with
timeouts, so they run in ordinary (non-trio) tests against a real daemon.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "PASSWORD",
    "Closed",
    "Phoenix",
    "PresenceView",
    "RawWebSocket",
    "acceptor_of_users",
    "login",
    "register",
    "worker_call",
]

PASSWORD = "Correct-Horse-9"
STEP_TIMEOUT = 5.0
# Seconds between heartbeats of PresenceView.wait_for.
KEEPALIVE = 0.3


def register(base_url: str, name: str) -> dict[str, Any]:
    """Register `name`, log in and return `{id, username, access_token, ...}`."""
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    registered = httpx.post(base_url + "/api/auth/register", json=body, timeout=10)
    assert registered.status_code == 201, registered.text
    return {"id": registered.json()["user"]["id"], **login(base_url, name)}


def login(base_url: str, name: str) -> dict[str, Any]:
    response = httpx.post(
        base_url + "/api/auth/login",
        json={"username": name, "password": PASSWORD},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return {"username": name, **response.json()}


class Closed(Exception):
    """The server closed TCP before the expected frame arrived."""


class RawWebSocket:
    """One client connection; frames are masked unless a test turns it off."""

    def __init__(
        self,
        port: int,
        token: str | None,
        *,
        vsn: str | None = "2.0.0",
        host: str = "127.0.0.1",
        source: str | None = None,
    ) -> None:
        self.sock = socket.create_connection(
            (host, port),
            timeout=STEP_TIMEOUT,
            source_address=(source, 0) if source else None,
        )
        query = []
        if token is not None:
            query.append(f"token={token}")
        if vsn is not None:
            query.append(f"vsn={vsn}")
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /socket/websocket?{'&'.join(query)} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buffer = bytearray()
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(f"closed during the upgrade: {bytes(self.buffer)!r}")
            self.buffer += chunk
        end = self.buffer.index(b"\r\n\r\n") + 4
        self.response_head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[:end]
        self.status = int(self.response_head.split(" ", 2)[1])

    # Sending

    def send_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        declared_length: int | None = None,
    ) -> None:
        """Send one frame. `declared_length` puts another length in the header."""
        first = (0x80 if fin else 0) | (rsv << 4) | opcode
        length = len(payload) if declared_length is None else declared_length
        mask_bit = 0x80 if mask else 0
        if length < 126:
            header = bytes((first, mask_bit | length))
        elif length < 0x10000:
            header = bytes((first, mask_bit | 126)) + struct.pack("!H", length)
        else:
            header = bytes((first, mask_bit | 127)) + struct.pack("!Q", length)
        if mask:
            key = os.urandom(4)
            masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            self.sock.sendall(header + key + masked)
        else:
            self.sock.sendall(header + payload)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_close(self, code: int | None = None, reason: bytes = b"") -> None:
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send_frame(0x8, payload)

    # Receiving

    def _fill(self, needed: int, deadline: float) -> None:
        while len(self.buffer) < needed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame within the timeout ({len(self.buffer)})")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed("the server closed TCP")
            self.buffer += chunk

    def recv_frame(self, timeout: float = STEP_TIMEOUT) -> tuple[int, bytes]:
        """Return the next server frame as (opcode, payload)."""
        deadline = time.monotonic() + timeout
        self._fill(2, deadline)
        first, second = self.buffer[0], self.buffer[1]
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        offset = 2
        if length == 126:
            self._fill(4, deadline)
            (length,) = struct.unpack_from("!H", self.buffer, 2)
            offset = 4
        elif length == 127:
            self._fill(10, deadline)
            (length,) = struct.unpack_from("!Q", self.buffer, 2)
            offset = 10
        self._fill(offset + length, deadline)
        payload = bytes(self.buffer[offset : offset + length])
        del self.buffer[: offset + length]
        assert first & 0x80, "server frames are never fragmented"
        return first & 0x0F, payload

    def expect_close(self, timeout: float = STEP_TIMEOUT) -> tuple[int | None, str]:
        """Read until a Close frame and return its code (None if empty) and reason."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if opcode != 0x8:
                continue
            if not payload:
                return None, ""
            (code,) = struct.unpack_from("!H", payload)
            return code, payload[2:].decode()

    def wait_tcp_close(self, timeout: float = STEP_TIMEOUT) -> bool:
        """Return True once the server closes TCP, False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class Phoenix:
    """Phoenix Channels V2 over a `RawWebSocket`."""

    def __init__(
        self, port: int, token: str, *, ws: RawWebSocket | None = None, **options: Any
    ) -> None:
        """Connect, or speak Phoenix over `ws` when given, a connection already open."""
        self.ws = ws if ws is not None else RawWebSocket(port, token, **options)
        assert self.ws.status == 101, self.ws.response_head
        self.ref = 0
        self.join_refs: dict[str, str] = {}
        # Messages read while waiting for something else, oldest first.
        self.inbox: list[list[Any]] = []

    def push(self, topic: str, event: str, payload: Any) -> str:
        self.ref += 1
        ref = str(self.ref)
        join_ref = self.join_refs.get(topic)
        self.ws.send_text(json.dumps([join_ref, ref, topic, event, payload]))
        return ref

    def receive(self, timeout: float = STEP_TIMEOUT) -> list[Any]:
        while True:
            opcode, payload = self.ws.recv_frame(timeout)
            if opcode == 0x1:
                return list(json.loads(payload))
            if opcode == 0x8:
                raise Closed(f"close frame {payload!r}")

    def next(
        self, event: str, topic: str | None = None, timeout: float = STEP_TIMEOUT
    ) -> list[Any]:
        """Return the first message with `event` (on `topic`), keeping others."""
        for index, message in enumerate(self.inbox):
            if message[3] == event and topic in (None, message[2]):
                return self.inbox.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message[3] == event and topic in (None, message[2]):
                return message
            self.inbox.append(message)

    def reply(self, ref: str, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """Return the payload of the `phx_reply` to `ref`."""
        for index, message in enumerate(self.inbox):
            if message[3] == "phx_reply" and message[1] == ref:
                return dict(self.inbox.pop(index)[4])
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if message[3] == "phx_reply" and message[1] == ref:
                return dict(message[4])
            self.inbox.append(message)

    def join(self, topic: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Join `topic` and return the reply payload `{status, response}`."""
        self.join_refs[topic] = str(self.ref + 1)
        return self.reply(self.push(topic, "phx_join", payload or {}))

    def call(self, topic: str, event: str, payload: Any) -> dict[str, Any]:
        return self.reply(self.push(topic, event, payload))

    def close(self) -> None:
        self.ws.close()


class PresenceView:
    """phx_ref -> user id of one client's topic, built from state and diffs."""

    def __init__(self, client: Phoenix, topic: str) -> None:
        self.client = client
        self.topic = topic
        self.metas: dict[str, str] = {}
        state = client.next("presence_state", topic)
        self.apply(state[4], {})

    def apply(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        for entry in leaves.values():
            for meta in entry["metas"]:
                self.metas.pop(meta["phx_ref"], None)
        for user_id, entry in joins.items():
            for meta in entry["metas"]:
                self.metas[meta["phx_ref"]] = user_id

    def users(self) -> set[str]:
        return set(self.metas.values())

    def count(self, user_id: object) -> int:
        """Return how many metas (connections) `user_id` has."""
        return list(self.metas.values()).count(str(user_id))

    def wait_for(
        self,
        users: set[str],
        timeout: float = 10,
        keepalive: tuple[Phoenix, ...] = (),
    ) -> None:
        """Apply diffs until exactly `users` are present."""
        self.wait_until(lambda: self.users() == users, timeout, keepalive)

    def wait_until(
        self,
        condition: Callable[[], bool],
        timeout: float = 10,
        keepalive: tuple[Phoenix, ...] = (),
    ) -> None:
        """Apply diffs until `condition()` is true.

        Heartbeats go to the clients in `keepalive` (and this one) every
        `KEEPALIVE` seconds meanwhile, so a short heartbeat timeout of the
        server does not close them.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"presence now: {self.metas}"
            for client in (self.client, *keepalive):
                client.push("phoenix", "heartbeat", {})
            try:
                diff = self.client.next(
                    "presence_diff", self.topic, timeout=min(remaining, KEEPALIVE)
                )
            except TimeoutError:
                continue
            self.apply(diff[4]["joins"], diff[4]["leaves"])


def worker_call(var_dir: Any, worker: str, op: str, **args: Any) -> Any:
    """Send `op` to one worker through the supervisor's control socket."""
    import trio

    from deeperhub.ipc import open_rpc_client

    async def call() -> Any:
        path = f"{var_dir}/run/supervisor.sock"
        async with open_rpc_client(path) as client:
            with trio.fail_after(STEP_TIMEOUT):
                return await client.call("worker_call", worker=worker, op=op, args=args)

    return trio.run(call)


def acceptor_of_users(var_dir: Any, acceptors: int) -> dict[int, str]:
    """Return {user id: acceptor id} for every open WebSocket connection."""
    placed: dict[int, str] = {}
    for number in range(1, acceptors + 1):
        worker = f"acceptor-{number}"
        for connection in worker_call(var_dir, worker, "connections"):
            placed[int(connection["user_id"])] = worker
    return placed
