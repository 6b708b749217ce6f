"""Fan-out on a real daemon: slow and vanishing clients, acks, concurrent writers."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Phoenix, RawWebSocket, register

if TYPE_CHECKING:
    from collections.abc import Iterator

SEND_QUEUE_BYTES = 65536


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("fanout")
    config = root / "deeperhub.toml"
    config.write_text(f"[websocket]\nsend_queue_bytes = {SEND_QUEUE_BYTES}\n")
    env = {
        "DEEPERHUB_CONFIG_FILE": str(config),
        "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "1000000",
        "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "1000000",
    }
    daemon = Daemon(root / "var", env=env)
    daemon.start()
    try:
        users = [register(daemon.base_url, f"user{n}") for n in range(4)]
        yield daemon, users
    finally:
        daemon.stop()


def create_channel(daemon: Daemon, user: dict[str, Any], name: str) -> int:
    response = httpx.post(
        daemon.base_url + "/api/channels",
        json={"name": name},
        headers={"authorization": f"Bearer {user['access_token']}"},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["channel"]["id"])


def metric(daemon: Daemon, series: str) -> float:
    text = httpx.get(daemon.base_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


def drops(daemon: Daemon) -> float:
    return metric(daemon, "deeperhub_send_queue_drops_total")


CLOSED_1008 = 'deeperhub_ws_connections_closed_total{code="1008"}'


def test_slow_consumer_closed_others_fed(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    owner, reader = users[0], users[1]
    channel_id = create_channel(daemon, owner, "slow")
    before = drops(daemon)
    closed_before = metric(daemon, CLOSED_1008)

    # A client with a tiny receive window that never reads after its join.
    slow = RawWebSocket(daemon.port, reader["access_token"])
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.send_text('["1","1","channel:slow","phx_join",{}]')
    fast = Phoenix(daemon.port, reader["access_token"])
    try:
        assert fast.join("channel:slow")["status"] == "ok"
        count = 400
        received: list[int] = []

        def read_fast() -> None:
            while len(received) < count:
                received.append(fast.next("new_msg", timeout=20)[4]["id"])

        reader_thread = threading.Thread(target=read_fast)
        reader_thread.start()
        body = "b" * 8000
        sent = []
        with httpx.Client(base_url=daemon.base_url) as http:
            headers = {"authorization": f"Bearer {owner['access_token']}"}
            for _ in range(count):
                response = http.post(
                    f"/api/channels/{channel_id}/messages",
                    json={"body": body},
                    headers=headers,
                )
                sent.append(response.json()["message"]["id"])
        reader_thread.join(30)
        assert received == sent

        deadline = time.monotonic() + 10
        while drops(daemon) < before + 1:
            assert time.monotonic() < deadline, "the slow client was not dropped"
            time.sleep(0.1)
        # The Close frame (1008 "slow consumer") waits behind what the kernel
        # buffered, which this client never reads, so the server drops TCP
        # after its close timeout instead.
        assert slow.wait_tcp_close(timeout=15)
        assert metric(daemon, CLOSED_1008) == closed_before + 1
    finally:
        slow.close()
        fast.close()


def test_vanishing_clients_do_not_stop_delivery(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    owner, reader = users[0], users[2]
    channel_id = create_channel(daemon, owner, "vanish")
    watcher = Phoenix(daemon.port, reader["access_token"])
    assert watcher.join("channel:vanish")["status"] == "ok"
    stop = threading.Event()

    def churn() -> None:
        # Clients that join and reset their TCP connection while messages flow.
        while not stop.is_set():
            client = Phoenix(daemon.port, reader["access_token"])
            client.ws.send_text('["1","1","channel:vanish","phx_join",{}]')
            client.ws.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
            )
            time.sleep(0.01)
            client.close()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        sent = []
        with httpx.Client(base_url=daemon.base_url) as http:
            headers = {"authorization": f"Bearer {owner['access_token']}"}
            for n in range(200):
                response = http.post(
                    f"/api/channels/{channel_id}/messages",
                    json={"body": f"m{n}"},
                    headers=headers,
                )
                sent.append(response.json()["message"]["id"])
    finally:
        stop.set()
        thread.join(10)
    try:
        received = [watcher.next("new_msg", timeout=10)[4]["id"] for _ in sent]
        assert received == sent
    finally:
        watcher.close()
    log = (daemon.var_dir / "log" / "deeper_hub.log").read_text()
    assert "Traceback" not in log
    assert "WebSocket connection failed" not in log


def test_push_acked_after_commit(server: tuple[Daemon, list[dict[str, Any]]]) -> None:
    daemon, users = server
    owner = users[0]
    channel_id = create_channel(daemon, owner, "acked")
    client = Phoenix(daemon.port, owner["access_token"])
    try:
        assert client.join("channel:acked")["status"] == "ok"
        for n in range(20):
            reply = client.call("channel:acked", "new_msg", {"body": f"m{n}"})
            assert reply["status"] == "ok"
            # The acknowledged message is readable at once.
            history = httpx.get(
                f"{daemon.base_url}/api/channels/{channel_id}/messages",
                params={"after_id": reply["response"]["id"] - 1},
                headers={"authorization": f"Bearer {owner['access_token']}"},
            ).json()["messages"]
            assert history[0]["id"] == reply["response"]["id"]
    finally:
        client.close()


def test_concurrent_pushers_all_stored(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    channel_id = create_channel(daemon, users[0], "crowd")
    clients = [Phoenix(daemon.port, user["access_token"]) for user in users]
    per_client = 100
    try:
        for client in clients:
            assert client.join("channel:crowd")["status"] == "ok"
        # Every client pushes without waiting, so writes arrive together.
        refs = {
            id(client): [
                client.push("channel:crowd", "new_msg", {"body": f"c{i}-{n}"})
                for n in range(per_client)
            ]
            for i, client in enumerate(clients)
        }
        ids = []
        for client in clients:
            for ref in refs[id(client)]:
                reply = client.reply(ref, timeout=20)
                assert reply["status"] == "ok", reply
                ids.append(reply["response"]["id"])
        assert len(set(ids)) == len(clients) * per_client
    finally:
        for client in clients:
            client.close()
    log = (daemon.var_dir / "log" / "deeper_hub.log").read_text()
    assert "database is locked" not in log
    history = httpx.get(
        f"{daemon.base_url}/api/channels/{channel_id}/messages",
        params={"limit": 500},
        headers={"authorization": f"Bearer {users[0]['access_token']}"},
    ).json()["messages"]
    assert len(history) == len(clients) * per_client
    # Each client's messages are stored in the order it sent them.
    for i in range(len(clients)):
        bodies = [m["body"] for m in history if m["body"].startswith(f"c{i}-")]
        assert bodies == [f"c{i}-{n}" for n in range(per_client)]
    assert [m["seq"] for m in history] == list(range(1, len(history) + 1))
