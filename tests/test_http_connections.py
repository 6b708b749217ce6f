"""HTTP/1.1 connection handling of the acceptor, over raw sockets to a real daemon.

Covers when the server closes a connection (HTTP/1.0, `Connection: close`, the
keep-alive timeout, an error sent before the request body, a stop), and the
requests the listener rejects with 400 or 431 and a JSON error.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .security_helpers import monitor_call, open_daemon, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .daemon import Daemon

# The server closes idle keep-alive connections after this many seconds here.
KEEP_ALIVE_TIMEOUT = 1.0
# Seconds the server waits for more of a request body here.
BODY_READ_TIMEOUT = 2.0
# Seconds the whole request body may take here.
BODY_TIMEOUT = 3.0
# Seconds a test waits for a response or for the server's close. The server
# lingers up to 1 s after its FIN for the client's, so this leaves margin.
READ_TIMEOUT = 5.0
LOOPBACK_ONLY = {"DEEPER_HUB_SECURITY_ALLOWLIST": "127.0.0.1,::1"}


@pytest.fixture(scope="module")
def running() -> Iterator[Daemon]:
    settings = {
        "server.keep_alive_timeout": KEEP_ALIVE_TIMEOUT,
        "server.read_timeout": BODY_READ_TIMEOUT,
        "server.body_timeout": BODY_TIMEOUT,
    }
    with open_daemon(settings, env=LOOPBACK_ONLY) as daemon:
        yield daemon


def connect(daemon: Daemon) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=READ_TIMEOUT)
    sock.settimeout(READ_TIMEOUT)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response with a Content-Length body and return its parts."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a complete response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the end of the response body"
        rest += chunk
    assert len(rest) == length, f"unexpected bytes after the response: {rest!r}"
    return int(status_line.split()[1]), headers, rest


def wait_closed(sock: socket.socket, timeout: float = READ_TIMEOUT) -> float:
    """Return the seconds until the server closed `sock`, failing on data or timeout."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return time.monotonic() - started
    except TimeoutError:
        pytest.fail(f"connection still open after {timeout} s")
    assert data == b"", f"expected the server's close, got {data!r}"
    return time.monotonic() - started


def error_of(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"}
    return dict(error)


def acceptor_fd_count(daemon: Daemon) -> int:
    workers = daemon.status()["workers"]
    pids = [
        int(w["pid"]) for name, w in workers.items() if name.startswith("acceptor-")
    ]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


# Closing after a response


def test_http10_response_closes_connection(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200
        assert headers["connection"].lower() == "close"
        assert wait_closed(sock) < 2.0


def test_connection_close_header_closes(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200
        assert headers["connection"].lower() == "close"
        assert wait_closed(sock) < 2.0


def test_keep_alive_serves_requests_then_idles_out(running: Daemon) -> None:
    with connect(running) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert status == 200
            assert "connection" not in headers
        idle = wait_closed(sock)
        assert idle >= KEEP_ALIVE_TIMEOUT * 0.8
        assert idle < KEEP_ALIVE_TIMEOUT + 3.0


def test_stalled_body_is_closed(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(
            b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        waited = wait_closed(sock)
        assert waited >= BODY_READ_TIMEOUT * 0.8
        assert waited < BODY_READ_TIMEOUT + 3.0


def test_trickled_body_gets_408(running: Daemon) -> None:
    """A body whose every gap is under read_timeout still ends at body_timeout."""
    with connect(running) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        sock.settimeout(BODY_READ_TIMEOUT / 2)
        data = b""
        while not data and time.monotonic() - started < BODY_TIMEOUT + 3:
            try:
                sock.sendall(b" ")
                data = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
        sock.settimeout(READ_TIMEOUT)
        status, headers, body = read_response(sock)
    assert status == 408
    assert headers["connection"].lower() == "close"
    assert error_of(body)["code"] == "request_timeout"
    assert BODY_TIMEOUT - 0.5 < elapsed < BODY_TIMEOUT + 1.5


def test_http10_requests_free_their_sockets(running: Daemon) -> None:
    before = acceptor_fd_count(running)
    for _ in range(100):
        with connect(running) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            read_response(sock)
            wait_closed(sock)
    # The server closes right after its FIN exchange, so a little slack is
    # enough for sockets still closing and for unrelated files.
    deadline = time.monotonic() + 5
    while acceptor_fd_count(running) > before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert acceptor_fd_count(running) <= before + 10


# Errors sent before the request body


def test_early_413_closes_connection(running: Daemon) -> None:
    size = 1_153_434
    with connect(running) as sock:
        sock.sendall(
            b"POST /api/auth/register HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        status, headers, body = read_response(sock)
        assert status == 413
        assert headers["connection"].lower() == "close"
        assert error_of(body)["code"] == "payload_too_large"
        # The body would only arrive now; the server must not wait for it.
        assert wait_closed(sock) < 3.0


def test_blocked_ip_403_closes_connection() -> None:
    with open_daemon() as daemon:
        blocked = daemon.cli("security", "block", "127.0.0.1", "--for", "10m")
        assert blocked.returncode == 0, blocked.stderr
        # The security monitor pushes the block to the acceptors.
        wait_for(
            lambda: httpx.get(daemon.base_url + "/api/channels").status_code == 403
        )
        body = b'{"username": "someone", "password": "Correct-Horse-9"}'
        with connect(daemon) as sock:
            sock.sendall(
                b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            status, headers, response = read_response(sock)
            assert status == 403
            assert headers["connection"].lower() == "close"
            assert error_of(response)["code"] == "forbidden"
            wait_closed(sock)


# Ambiguous request framing


SMUGGLED = b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
BOTH_LENGTHS = (
    b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
    % len(SMUGGLED)
    + SMUGGLED
)


def test_length_and_chunked_first_request_400(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(BOTH_LENGTHS)
        status, headers, body = read_response(sock)
        assert status == 400
        assert headers["connection"].lower() == "close"
        assert error_of(body)["code"] == "bad_request"
        # The smuggled request gets no response.
        wait_closed(sock)


def test_length_and_chunked_keep_alive_400(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(BOTH_LENGTHS)
        status, headers, body = read_response(sock)
        assert status == 400
        assert headers["connection"].lower() == "close"
        assert error_of(body)["code"] == "bad_request"
        wait_closed(sock)


@pytest.mark.parametrize(
    "lengths",
    [
        [b"Content-Length: 5", b"Content-Length: 6"],
        [b"Content-Length: 5, 6"],
        [b"Content-Length: -5"],
        [b"Content-Length: 5x"],
    ],
)
def test_invalid_content_length_400(running: Daemon, lengths: list[bytes]) -> None:
    with connect(running) as sock:
        sock.sendall(
            b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\n"
            + b"".join(line + b"\r\n" for line in lengths)
            + b"\r\nhello"
        )
        status, headers, body = read_response(sock)
        assert status == 400
        assert headers["connection"].lower() == "close"
        assert error_of(body)["code"] == "bad_request"
        wait_closed(sock)


# Errors of the listener


def test_bare_lf_is_400_at_once(running: Daemon) -> None:
    with connect(running) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\nHost: x\n\n")
        status, headers, body = read_response(sock)
        assert time.monotonic() - started < 2.0
        assert status == 400
        assert headers["connection"].lower() == "close"
        assert error_of(body)["code"] == "bad_request"
        wait_closed(sock)


def test_huge_head_is_431_json(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        assert status == 431
        assert headers["connection"].lower() == "close"
        error = error_of(body)
        assert error["code"] == "headers_too_large"
        assert "16384" in error["message"]


def test_bad_token_upgrade_403_json(running: Daemon) -> None:
    with connect(running) as sock:
        sock.sendall(
            b"GET /socket/websocket?vsn=2.0.0&token=bad HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        assert status == 403
        assert headers["connection"].lower() == "close"
        assert error_of(body)["code"] == "invalid_token"


UPGRADE = (
    b"GET /socket/websocket?vsn=2.0.0&token=bad HTTP/1.1\r\nHost: x\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def test_upgrade_after_first_request_400() -> None:
    """A late upgrade gets a clear 400 and is not counted as a 404."""
    with open_daemon() as daemon:
        for _ in range(3):
            with connect(daemon) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
                sock.sendall(UPGRADE)
                status, headers, body = read_response(sock)
                assert status == 400
                assert headers["connection"].lower() == "close"
                error = error_of(body)
                assert error["code"] == "upgrade_not_first"
                assert "first request" in error["message"]
                wait_closed(sock)

        # One real 404 afterwards costs 2 points. Had the upgrades counted as
        # 404s too, the score would be lower.
        assert httpx.get(daemon.base_url + "/nothing-here").status_code == 404

        def score() -> float:
            reputation = monitor_call(daemon, "reputation", ip="127.0.0.1")
            return float(reputation["reputation"]["score"])

        wait_for(lambda: score() < 100)
        time.sleep(0.5)
        assert score() == pytest.approx(98, abs=0.5)


# Stopping


@pytest.mark.timeout(120)
def test_stop_skips_idle_connections() -> None:
    # A long drain makes a stop that waits for idle connections obvious.
    settings = {"server.drain_timeout": 20.0, "server.acceptors": 2}
    with open_daemon(settings, env=LOOPBACK_ONLY) as daemon:
        idle = []
        for _ in range(6):
            sock = connect(daemon)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            read_response(sock)
            idle.append(sock)
        # Connections that have not sent a byte yet are idle too.
        idle.extend(connect(daemon) for _ in range(2))
        try:
            started = time.monotonic()
            code = daemon.stop(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            for sock in idle:
                sock.close()
        assert code == 0
        assert elapsed < 10.0, f"stop took {elapsed:.1f} s"
