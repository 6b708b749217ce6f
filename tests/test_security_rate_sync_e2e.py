"""Rate limits counted over two acceptor processes of one real daemon.

The kernel spreads connections over the acceptors (SO_REUSEPORT). Each test
opens connections until two of them landed on different acceptors, spends
the limit on one, and checks that the other is rejected once the acceptors
synced their usage. With per-process counting the second acceptor would still
allow requests.

The acceptor of a connection is found through /proc: the server side of the
TCP connection is a socket inode, and one acceptor process has a descriptor
for it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import time
from typing import TYPE_CHECKING, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from .security_helpers import open_daemon, register

if TYPE_CHECKING:
    import socket
    from collections.abc import Iterator

    from .daemon import Daemon

pytestmark = pytest.mark.timeout(90)

API_LIMIT = 20
WS_LIMIT = 10
SYNC_INTERVAL = 0.1
# Seconds to wait for the usage to reach the other acceptor. It is many sync
# intervals because the test machine may be loaded.
SYNC_WAIT = 10 * SYNC_INTERVAL
# Connections opened at most while looking for one on each acceptor.
MAX_TRIES = 24
SETTINGS = {
    # Every client is 127.0.0.1, a trusted proxy that forwards a client IP.
    "security.trusted_proxies": ["127.0.0.1"],
    "security.rate_limit_api": API_LIMIT,
    "security.rate_limit_ws": WS_LIMIT,
    "security.rate_sync_interval": SYNC_INTERVAL,
}


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with open_daemon(SETTINGS, env={"DEEPERHUB_ACCEPTORS": "2"}) as started:
        yield started


class AcceptorFinder:
    """Finds the acceptor process that owns the server side of a connection."""

    def __init__(self, daemon: Daemon) -> None:
        self.port = daemon.port
        workers = daemon.status()["workers"]
        self.pids: dict[str, int] = {
            worker_id: int(worker["pid"])
            for worker_id, worker in workers.items()
            if worker_id.startswith("acceptor")
        }
        assert len(self.pids) == 2, workers

    def acceptor_of(self, client: socket.socket) -> str:
        inode = self._server_inode(client.getsockname()[1])
        target = f"socket:[{inode}]"
        for worker_id, pid in self.pids.items():
            folder = f"/proc/{pid}/fd"
            for fd in os.listdir(folder):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{folder}/{fd}") == target:
                        return worker_id
        raise AssertionError(f"no acceptor has a descriptor for {target}")

    def _server_inode(self, client_port: int) -> str:
        """Return the inode of the daemon's end of the connection from `client_port`."""
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                # A closed connection in TIME_WAIT has inode 0.
                inode = fields[9]
                if local_port == self.port and remote_port == client_port:
                    if inode != "0":
                        return inode
        raise AssertionError(f"no server socket for client port {client_port}")


# WebSocket messages per user.


def open_ws(daemon: Daemon, token: str, ip: str) -> ClientConnection:
    url = f"{daemon.ws_url}?token={token}&vsn=2.0.0"
    return connect(url, open_timeout=5, additional_headers={"X-Forwarded-For": ip})


def send_and_reply(ws: ClientConnection, ref: int) -> dict[str, Any]:
    """Push a message on a topic that is not joined and return the reply payload.

    Within the limit the reply is the error "unmatched topic", and over it
    "rate_limited". Neither writes to the database.
    """
    ws.send(json.dumps([None, str(ref), "channel:elsewhere", "ping", {}]))
    while True:
        frame = json.loads(ws.recv(timeout=5))
        if frame[3] == "phx_reply" and frame[1] == str(ref):
            return dict(frame[4]["response"])


def test_ws_limit_counts_across_acceptors(daemon: Daemon) -> None:
    user = register(daemon, "spreader")
    finder = AcceptorFinder(daemon)
    placed: dict[str, ClientConnection] = {}
    with contextlib.ExitStack() as stack:
        # Each upgrade has its own client IP, so none of them reaches the
        # HTTP limit, while the WebSocket limit counts per user.
        for attempt in range(MAX_TRIES):
            ip = f"198.51.100.{attempt + 1}"
            ws = stack.enter_context(open_ws(daemon, user["access_token"], ip))
            placed.setdefault(finder.acceptor_of(ws.socket), ws)
            if len(placed) == 2:
                break
        assert len(placed) == 2, f"{MAX_TRIES} connections landed on {set(placed)}"
        first, second = placed.values()

        for ref in range(1, WS_LIMIT + 1):
            assert send_and_reply(first, ref) == {"reason": "unmatched topic"}
        assert send_and_reply(first, 100) == {"reason": "rate_limited"}
        time.sleep(SYNC_WAIT)

        assert send_and_reply(second, 200) == {"reason": "rate_limited"}


# HTTP requests per IP.


def get_me(connection: http.client.HTTPConnection, ip: str) -> int:
    """Send one request on the keep-alive `connection` and return its status."""
    connection.request("GET", "/api/users/me", headers={"X-Forwarded-For": ip})
    response = connection.getresponse()
    response.read()
    return response.status


def test_http_limit_counts_across_acceptors(daemon: Daemon) -> None:
    ip = "203.0.113.77"
    finder = AcceptorFinder(daemon)
    placed: dict[str, http.client.HTTPConnection] = {}
    opened: list[http.client.HTTPConnection] = []
    try:
        # Without a token the route responds 401, which counts for the limit
        # but not as an anomaly.
        for _ in range(MAX_TRIES):
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
            opened.append(connection)
            assert get_me(connection, ip) == 401
            assert connection.sock is not None
            placed.setdefault(finder.acceptor_of(connection.sock), connection)
            if len(placed) == 2:
                break
        assert len(placed) == 2, f"{MAX_TRIES} connections landed on {set(placed)}"
        first, second = placed.values()
        first_socket, second_socket = first.sock, second.sock

        statuses = [get_me(first, ip) for _ in range(API_LIMIT)]
        assert statuses[-1] == 429, statuses
        time.sleep(SYNC_WAIT)

        assert get_me(second, ip) == 429
        # Both requests used the connections that were placed above.
        assert first.sock is first_socket
        assert second.sock is second_socket
    finally:
        for connection in opened:
            connection.close()
