"""WebSocket limits of a real daemon: body, frame, joins, topics, connections."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Closed, Phoenix, RawWebSocket, register

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MAX_BODY = 100
MAX_FRAME = 4096
MAX_JOINS = 3
MAX_JOINS_PER_USER = 4
OPEN_LIMITS = {
    "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "100000",
    "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "100000",
}


def write_config(root: Path, text: str) -> dict[str, str]:
    config = root / "deeperhub.toml"
    config.write_text(text)
    return {"DEEPERHUB_CONFIG_FILE": str(config), **OPEN_LIMITS}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("limits")
    env = write_config(
        root,
        "[websocket]\n"
        f"max_body_bytes = {MAX_BODY}\n"
        f"max_frame_size = {MAX_FRAME}\n"
        f"max_joins = {MAX_JOINS}\n"
        f"max_joins_per_user = {MAX_JOINS_PER_USER}\n",
    )
    daemon = Daemon(root / "var", env=env)
    daemon.start()
    try:
        alice = register(daemon.base_url, "alice")
        for name in ("one", "two", "three", "four", "five", "six"):
            response = httpx.post(
                daemon.base_url + "/api/channels",
                json={"name": name},
                headers={"authorization": f"Bearer {alice['access_token']}"},
            )
            assert response.status_code == 201, response.text
        yield daemon, alice
    finally:
        daemon.stop()


def test_body_size_limit(server: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, alice = server
    client = Phoenix(daemon.port, alice["access_token"])
    try:
        assert client.join("channel:one")["status"] == "ok"
        reply = client.call("channel:one", "new_msg", {"body": "x" * (MAX_BODY + 1)})
        assert reply["status"] == "error"
        assert reply["response"]["reason"] == "invalid_body"
        assert str(MAX_BODY) in reply["response"]["message"]
        # Multi-byte characters count in UTF-8 bytes.
        reply = client.call("channel:one", "new_msg", {"body": "é" * 51})
        assert reply["response"]["reason"] == "invalid_body"
        reply = client.call("channel:one", "new_msg", {"body": "x" * MAX_BODY})
        assert reply["status"] == "ok"
    finally:
        client.close()


def test_frame_size_limit(server: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, alice = server
    ws = RawWebSocket(daemon.port, alice["access_token"])
    try:
        ws.send_frame(0x1, b"[" + b" " * (MAX_FRAME - 2) + b"]")
        # A frame at the limit is parsed (and rejected as a Phoenix message).
        assert ws.expect_close()[0] == 1008
    finally:
        ws.close()
    ws = RawWebSocket(daemon.port, alice["access_token"])
    try:
        ws.send_frame(0x1, declared_length=MAX_FRAME + 1)
        assert ws.expect_close()[0] == 1009
    finally:
        ws.close()


def test_joins_per_connection_limit(server: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, alice = server
    client = Phoenix(daemon.port, alice["access_token"])
    try:
        for name in ("one", "two", "three"):
            assert client.join(f"channel:{name}")["status"] == "ok"
        reply = client.join("channel:four")
        assert reply == {"status": "error", "response": {"reason": "too_many_joins"}}
        assert client.call("channel:one", "phx_leave", {})["status"] == "ok"
        assert client.join("channel:four")["status"] == "ok"
    finally:
        client.close()


def test_joins_per_user_limit(server: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, alice = server
    first = Phoenix(daemon.port, alice["access_token"])
    second = Phoenix(daemon.port, alice["access_token"])
    try:
        for name in ("one", "two", "three"):
            assert first.join(f"channel:{name}")["status"] == "ok"
        # The same topic from another tab does not count twice.
        assert second.join("channel:one")["status"] == "ok"
        assert second.join("channel:four")["status"] == "ok"
        reply = second.join("channel:five")
        assert reply == {"status": "error", "response": {"reason": "too_many_joins"}}
    finally:
        first.close()
        second.close()
    # Closed connections release their topics.
    third = Phoenix(daemon.port, alice["access_token"])
    try:
        for name in ("five", "six", "one"):
            assert third.join(f"channel:{name}")["status"] == "ok"
    finally:
        third.close()


def table_counts(daemon: Daemon) -> tuple[int, int]:
    db = sqlite3.connect(f"file:{daemon.var_dir}/db/deeper_hub.db?mode=ro", uri=True)
    try:
        channels = db.execute("SELECT count(*) FROM channels").fetchone()[0]
        messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        db.close()
    return int(channels), int(messages)


@pytest.mark.parametrize(
    "topic",
    [
        "channel:",
        "channel:" + "x" * 65,
        "channel:bad name",
        "channel:ümlaut",
        "channel:a/b",
        "channel:" + "y" * 2000,
    ],
)
def test_invalid_topic_creates_nothing(
    server: tuple[Daemon, dict[str, Any]], topic: str
) -> None:
    daemon, alice = server
    before = table_counts(daemon)
    client = Phoenix(daemon.port, alice["access_token"])
    try:
        reply = client.join(topic)
        assert reply == {"status": "error", "response": {"reason": "invalid_topic"}}
        reply = client.call(topic, "new_msg", {"body": "hi"})
        assert reply["response"] == {"reason": "unmatched topic"}
    finally:
        client.close()
    assert table_counts(daemon) == before


def test_max_connections_across_acceptors(tmp_path: Path) -> None:
    env = {"DEEPERHUB_ACCEPTORS": "2", "MAX_CONNECTIONS": "4", **OPEN_LIMITS}
    daemon = Daemon(tmp_path / "var", env=env)
    daemon.start()
    opened: list[RawWebSocket] = []
    try:
        token = register(daemon.base_url, "crowd")["access_token"]
        statuses = []
        for _ in range(16):
            try:
                ws = RawWebSocket(daemon.port, token)
            except Closed:
                statuses.append(0)
                continue
            statuses.append(ws.status)
            if ws.status == 101:
                opened.append(ws)
            else:
                ws.close()
        # Each acceptor admits 2, so at most 4 are open whatever the spread.
        assert 1 <= len(opened) <= 4
        assert set(statuses) <= {101, 503}
        assert statuses.count(503) == 16 - len(opened)
    finally:
        for ws in opened:
            ws.close()
        daemon.stop()
