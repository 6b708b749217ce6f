"""/metrics of a real daemon: aggregation across processes, restarts, cardinality."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from .daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PASSWORD = "Correct-Horse-9"
# Rate limits and IP blocking out of the way: the random traffic below comes
# from one IP and user, and would otherwise be blocked as a scan.
QUIET_LIMITS = {
    "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "1000000",
    "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "1000000",
    "DEEPER_HUB_SECURITY_ALLOWLIST": "127.0.0.0/8",
}

# Seconds for the security monitor to save scores and deliver alerts.
SETTLE_SECONDS = 1.5

Series = set[tuple[str, frozenset[tuple[str, str]]]]


def scrape(daemon: Daemon) -> str:
    response = httpx.get(daemon.base_url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def series_of(text: str) -> Series:
    """Return every sample's name and labels in an exposition text."""
    return {
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value_of(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def wait_for_value(
    daemon: Daemon, name: str, expected: float, timeout: float = 10, **labels: str
) -> float | None:
    """Scrape until `name{labels}` equals `expected`; return the last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = value_of(scrape(daemon), name, **labels)
        if value == expected:
            return value
        time.sleep(0.2)
    return value


def login(daemon: Daemon, name: str) -> str:
    """Register `name` and return an access token."""
    body = {"username": name, "email": f"{name}@example.test", "password": PASSWORD}
    registered = httpx.post(daemon.base_url + "/api/auth/register", json=body)
    assert registered.status_code == 201, registered.text
    response = httpx.post(
        daemon.base_url + "/api/auth/login",
        json={"username": name, "password": PASSWORD},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


class Phoenix:
    """A minimal Phoenix Channels V2 client over a real WebSocket."""

    def __init__(self, daemon: Daemon, token: str) -> None:
        url = f"{daemon.ws_url}?token={token}&vsn=2.0.0"
        # Entered at once; close() ends it.
        self.ws = connect(url, open_timeout=5).__enter__()
        self.ref = 0

    def push(self, topic: str, event: str, payload: dict[str, Any]) -> str:
        self.ref += 1
        self.ws.send(json.dumps(["1", str(self.ref), topic, event, payload]))
        return str(self.ref)

    def wait_for(self, event: str, ref: str | None = None) -> list[Any]:
        deadline = time.monotonic() + 5
        while True:
            frame = json.loads(self.ws.recv(timeout=deadline - time.monotonic()))
            if frame[3] == event and (ref is None or frame[1] == ref):
                return list(frame)

    def join(self, topic: str) -> dict[str, Any]:
        ref = self.push(topic, "phx_join", {})
        return dict(self.wait_for("phx_reply", ref)[4])

    def close(self, code: int = 1000) -> None:
        self.ws.close(code=code)


def send_unmasked_frame(daemon: Daemon, token: str) -> bytes:
    """Upgrade over a raw socket, send an unmasked frame, return what came back."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /socket/websocket?token={token}&vsn=2.0.0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{daemon.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(b"\x81\x02hi")  # a text frame without the mask bit
        received = head.split(b"\r\n\r\n", 1)[1]
        while chunk := sock.recv(4096):
            received += chunk
    return received


def drive_traffic(daemon: Daemon, prefix: str = "t") -> None:
    """Exercise every kind of event that creates a labelled series."""
    alice = login(daemon, f"{prefix}alice")
    bob = login(daemon, f"{prefix}bob")
    headers = {"authorization": f"Bearer {alice}"}
    created = httpx.post(
        daemon.base_url + "/api/channels",
        json={"name": f"{prefix}room"},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    channel_id = created.json()["channel"]["id"]
    httpx.get(daemon.base_url + f"/api/channels/{channel_id}", headers=headers)
    httpx.get(daemon.base_url + "/api/channels/987654321", headers=headers)
    httpx.get(daemon.base_url + "/no/such/path")
    httpx.request("BREW", daemon.base_url + "/api/channels")

    # A broadcast from one connection to another: delivery latency is observed.
    sender, receiver = Phoenix(daemon, alice), Phoenix(daemon, bob)
    topic = f"channel:{prefix}room"
    assert sender.join(topic)["status"] == "ok"
    assert receiver.join(topic)["status"] == "ok"
    assert sender.join("channel:missing-" + uuid.uuid4().hex)["status"] == "error"
    sender.push(topic, "new_msg", {"body": "hello"})
    assert receiver.wait_for("new_msg")[4]["body"] == "hello"
    sender.close(4321)
    receiver.close()

    rejected = httpx.get(
        daemon.ws_url.replace("ws://", "http://") + "?token=nope&vsn=2.0.0",
        headers={
            "connection": "Upgrade",
            "upgrade": "websocket",
            "sec-websocket-version": "13",
            "sec-websocket-key": base64.b64encode(os.urandom(16)).decode(),
        },
    )
    assert rejected.status_code == 403
    # A Close frame with code 1002 (protocol error) and a reason, then TCP close.
    closing = send_unmasked_frame(daemon, alice)
    assert closing[:1] == b"\x88"
    assert closing[2:4] == (1002).to_bytes(2, "big")


def random_traffic(daemon: Daemon, token: str, rounds: int) -> None:
    """Send requests whose paths, topics, methods and close codes are random."""
    rng = random.Random(7)
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=daemon.base_url, timeout=10) as client:
        for _ in range(rounds):
            assert client.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}").status_code
            client.get(f"/api/channels/{rng.randrange(10**6, 10**9)}", headers=headers)
            method = "".join(rng.choice("ABCDEFGHIJ") for _ in range(6))
            client.request(method, f"/api/{uuid.uuid4().hex}")
    for _ in range(max(1, rounds // 10)):
        client_ws = Phoenix(daemon, token)
        for _ in range(10):
            topic = f"channel:{uuid.uuid4().hex}"
            assert client_ws.join(topic)["status"] == "error"
            client_ws.push(topic, "new_msg", {"body": "x"})
        client_ws.close(rng.randrange(3000, 5000))


@pytest.fixture
def quiet_daemon(tmp_path: Path) -> Iterator[Daemon]:
    instance = Daemon(tmp_path / "var", env=QUIET_LIMITS)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.mark.timeout(120)
def test_series_count_flat_under_random_traffic(quiet_daemon: Daemon) -> None:
    """Random paths, topics, methods and close codes add no series."""
    # The warm-up creates every series this kind of traffic can create: the
    # request series, and the security monitor's reaction to a scan (events,
    # alerts, score writes saved once per second).
    drive_traffic(quiet_daemon)
    token = login(quiet_daemon, "storm")
    random_traffic(quiet_daemon, token, rounds=150)
    time.sleep(SETTLE_SECONDS)
    # A request is counted after its response, so the first scrape is not in
    # its own output.
    scrape(quiet_daemon)
    before = series_of(scrape(quiet_daemon))

    random_traffic(quiet_daemon, token, rounds=150)
    time.sleep(SETTLE_SECONDS)
    text = scrape(quiet_daemon)
    after = series_of(text)

    assert sorted(after - before) == [], sorted(after - before)
    assert sorted(before - after) == []
    # The traffic was counted, only under fixed label values.
    unmatched = value_of(
        text,
        "deeperhub_http_requests_total",
        method="GET",
        route="unmatched",
        status="404",
    )
    assert unmatched is not None
    assert unmatched >= 300
    assert "/api/channels/<int:channel_id>" in text
    assert 'code="other"' in text
    assert 'method="other"' in text


def test_killed_acceptor_keeps_counters(daemon: Daemon) -> None:
    """Counters survive a SIGKILLed acceptor; its open-connection gauge does not."""
    token = login(daemon, "kim")
    client = Phoenix(daemon, token)
    try:
        assert value_of(scrape(daemon), "deeperhub_ws_connections_active") == 1
        # With several acceptors the connection may be on any of them.
        listed = daemon.cli("remote", "eval", "connections()")
        acceptor = json.loads(listed.stdout)[0]["acceptor"]
        os.kill(daemon.worker_pid(acceptor), signal.SIGKILL)

        deadline = time.monotonic() + 20
        while daemon.status()["workers"][acceptor]["restarts"] < 1:
            assert time.monotonic() < deadline, f"{acceptor} was not restarted"
            time.sleep(0.1)
        daemon.wait_healthy()
        active = wait_for_value(daemon, "deeperhub_ws_connections_active", 0)
        assert active == 0
    finally:
        client.ws.socket.close()

    text = scrape(daemon)
    assert value_of(text, "deeperhub_ws_connections_opened_total") == 1
    restarts = value_of(text, "deeperhub_worker_restarts_total", worker=acceptor)
    assert restarts == 1
    registered = value_of(
        text,
        "deeperhub_http_requests_total",
        method="POST",
        route="/api/auth/register",
        status="201",
    )
    assert registered == 1


def test_two_acceptors_sum_connections(tmp_path: Path) -> None:
    """Any acceptor's /metrics counts the connections of every acceptor."""
    daemon = Daemon(tmp_path / "var", env={"DEEPERHUB_ACCEPTORS": "2", **QUIET_LIMITS})
    daemon.start()
    clients: list[Phoenix] = []
    try:
        deadline = time.monotonic() + 20
        while not all(
            daemon.status()["workers"].get(worker, {}).get("state") == "running"
            for worker in ("acceptor-1", "acceptor-2")
        ):
            assert time.monotonic() < deadline, "acceptor-2 did not start"
            time.sleep(0.1)
        token = login(daemon, "ann")
        clients = [Phoenix(daemon, token) for _ in range(8)]
        for _ in range(6):
            text = scrape(daemon)
            assert value_of(text, "deeperhub_ws_connections_active") == 8
            for worker in ("acceptor-1", "acceptor-2"):
                started = value_of(
                    text, "deeperhub_process_start_time_seconds", worker=worker
                )
                assert started is not None, f"no process series for {worker}"
            assert value_of(text, "deeperhub_process_open_fds", worker="supervisor")
    finally:
        for client in clients:
            client.close()
        daemon.stop()


def test_metrics_disabled_is_404(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "var", env={"DEEPERHUB_METRICS_ENABLED": "false"})
    daemon.start()
    try:
        response = httpx.get(daemon.base_url + "/metrics")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    finally:
        daemon.stop()
