"""WebSocket limits of a real daemon: body, frame, joins, topics, connections."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Phoenix, RawWebSocket, register, worker_call

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


# Two acceptors with small limits, for the limits that count over acceptors.
ACCEPTORS = ("acceptor-1", "acceptor-2")
PAIR_MAX_CONNECTIONS = 4
PAIR_MAX_JOINS_PER_USER = 2
PAIR_CHANNELS = ("j1", "j2", "j3", "j4", "j5", "j6")
# Attempts to land a connection on a given acceptor. The kernel picks the
# acceptor by a hash of the client's port, so 40 misses are very unlikely.
PLACEMENT_ATTEMPTS = 40


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("pair")
    env = write_config(
        root, f"[websocket]\nmax_joins_per_user = {PAIR_MAX_JOINS_PER_USER}\n"
    )
    env.update(
        {"DEEPERHUB_ACCEPTORS": "2", "MAX_CONNECTIONS": str(PAIR_MAX_CONNECTIONS)}
    )
    daemon = Daemon(root / "var", env=env)
    daemon.start()
    try:
        user = register(daemon.base_url, "juggler")
        for name in PAIR_CHANNELS:
            response = httpx.post(
                daemon.base_url + "/api/channels",
                json={"name": name},
                headers={"authorization": f"Bearer {user['access_token']}"},
            )
            assert response.status_code == 201, response.text
        yield daemon, user
    finally:
        daemon.stop()


def placement(daemon: Daemon) -> dict[str, set[int]]:
    """Return the ids of the connections open on each acceptor."""
    return {
        worker: {c["id"] for c in worker_call(daemon.var_dir, worker, "connections")}
        for worker in ACCEPTORS
    }


def admission_counts(daemon: Daemon) -> dict[str, Any]:
    """Return the DB writer's totals over both acceptors."""
    return dict(worker_call(daemon.var_dir, "db_writer", "admission"))


def wait_for_admission(daemon: Daemon, expected: dict[str, Any]) -> None:
    deadline = time.monotonic() + 10
    while (counts := admission_counts(daemon)) != expected:
        assert time.monotonic() < deadline, f"admission counts: {counts}"
        time.sleep(0.05)


def wait_for_placement(daemon: Daemon, total: int) -> dict[str, set[int]]:
    """Wait until `total` connections are open over both acceptors."""
    deadline = time.monotonic() + 10
    while sum(map(len, (placed := placement(daemon)).values())) != total:
        assert time.monotonic() < deadline, f"connections: {placed}"
        time.sleep(0.05)
    return placed


def open_on(daemon: Daemon, token: str, acceptor: str) -> RawWebSocket:
    """Open a connection on `acceptor`, closing those that land on the other.

    Each attempt must be admitted: the caller keeps the total under the limit.
    """
    before = placement(daemon)
    total = sum(map(len, before.values()))
    for _ in range(PLACEMENT_ATTEMPTS):
        ws = RawWebSocket(daemon.port, token)
        assert ws.status == 101, f"{ws.response_head} with {before} open"
        after = wait_for_placement(daemon, total + 1)
        if after[acceptor] - before[acceptor]:
            return ws
        ws.close()
        wait_for_placement(daemon, total)
    raise AssertionError(f"no connection landed on {acceptor}")


def rejecting_acceptors(daemon: Daemon, pids: dict[int, str]) -> set[str]:
    """Return the acceptors (by pid) that logged an upgrade rejected with 503."""
    log = (daemon.var_dir / "log" / "deeper_hub.log").read_text()
    found = set()
    for line in log.splitlines():
        if "rejecting WebSocket upgrade with 503" in line:
            match = re.search(r"\[(\d+)\]:", line)
            if match is not None and int(match.group(1)) in pids:
                found.add(pids[int(match.group(1))])
    return found


def open_phoenix_on(daemon: Daemon, token: str, acceptor: str) -> Phoenix:
    return Phoenix(daemon.port, token, ws=open_on(daemon, token, acceptor))


def test_max_connections_across_acceptors(pair: tuple[Daemon, dict[str, Any]]) -> None:
    """MAX_CONNECTIONS counts over both acceptors, whatever the spread."""
    daemon, user = pair
    token = user["access_token"]
    opened: list[RawWebSocket] = []
    try:
        # Three on acceptor-1, above a static share of 2, and one on acceptor-2.
        opened.append(open_on(daemon, token, "acceptor-2"))
        for _ in range(3):
            opened.append(open_on(daemon, token, "acceptor-1"))
        assert admission_counts(daemon)["connections"] == PAIR_MAX_CONNECTIONS

        # The fifth is rejected by both acceptors, although acceptor-2 still
        # has room below its static share. Each acceptor logs its first 503.
        pids = {daemon.worker_pid(worker): worker for worker in ACCEPTORS}
        for _ in range(PLACEMENT_ATTEMPTS):
            ws = RawWebSocket(daemon.port, token)
            ws.close()
            assert ws.status == 503, ws.response_head
            if rejecting_acceptors(daemon, pids) == set(ACCEPTORS):
                break
        assert rejecting_acceptors(daemon, pids) == set(ACCEPTORS)
        assert sum(map(len, placement(daemon).values())) == PAIR_MAX_CONNECTIONS

        # Closing one frees a slot for the next upgrade, on either acceptor.
        opened.pop().close()
        wait_for_admission(daemon, {"connections": 3, "topics_by_user": {}})
        ws = RawWebSocket(daemon.port, token)
        opened.append(ws)
        assert ws.status == 101, ws.response_head

        # A restarted DB writer gets the counts again from both acceptors.
        os.kill(daemon.worker_pid("db_writer"), signal.SIGKILL)
        time.sleep(0.5)
        daemon.wait_healthy()
        wait_for_admission(daemon, {"connections": 4, "topics_by_user": {}})
        for _ in range(12):
            ws = RawWebSocket(daemon.port, token)
            ws.close()
            assert ws.status == 503, ws.response_head
    finally:
        for ws in opened:
            ws.close()
    wait_for_admission(daemon, {"connections": 0, "topics_by_user": {}})


def send_join(client: Phoenix, topic: str) -> str:
    """Send a `phx_join` without waiting for its reply; return its ref."""
    client.join_refs[topic] = str(client.ref + 1)
    return client.push(topic, "phx_join", {})


def test_joins_per_user_across_acceptors(pair: tuple[Daemon, dict[str, Any]]) -> None:
    """Simultaneous joins of one user on two acceptors pass only up to the limit."""
    daemon, user = pair
    token = user["access_token"]
    first = open_phoenix_on(daemon, token, "acceptor-1")
    second = open_phoenix_on(daemon, token, "acceptor-2")
    try:
        # Six joins at once, three per acceptor: two distinct topics pass.
        refs = {}
        for client, names in ((first, PAIR_CHANNELS[:3]), (second, PAIR_CHANNELS[3:])):
            for name in names:
                refs[name] = (client, send_join(client, f"channel:{name}"))
        replies = {name: client.reply(ref) for name, (client, ref) in refs.items()}
        passed = sorted(
            name for name, reply in replies.items() if reply["status"] == "ok"
        )
        assert len(passed) == PAIR_MAX_JOINS_PER_USER, replies
        rejected = {"status": "error", "response": {"reason": "too_many_joins"}}
        for name in set(PAIR_CHANNELS) - set(passed):
            assert replies[name] == rejected
        topics = [f"channel:{name}" for name in passed]
        wait_for_admission(
            daemon, {"connections": 2, "topics_by_user": {str(user["id"]): topics}}
        )

        # A topic the user has joined passes on the other acceptor, a new one not.
        held, other = topics
        holder = refs[passed[0]][0]
        peer = second if holder is first else first
        spare = f"channel:{sorted(set(PAIR_CHANNELS) - set(passed))[0]}"
        assert peer.join(held)["status"] == "ok"
        assert peer.join(spare) == rejected
        assert holder.join(spare) == rejected

        # The topic is freed only when both connections left it.
        assert holder.call(held, "phx_leave", {})["status"] == "ok"
        assert holder.join(spare) == rejected
        assert peer.call(held, "phx_leave", {})["status"] == "ok"
        user_key = str(user["id"])
        wait_for_admission(
            daemon, {"connections": 2, "topics_by_user": {user_key: [other]}}
        )
        assert holder.join(spare)["status"] == "ok"
        assert peer.join(held) == rejected

        # A closed connection frees its topics for the other acceptor.
        holder.close()
        left = {user_key: [other]} if refs[passed[1]][0] is peer else {}
        wait_for_admission(daemon, {"connections": 1, "topics_by_user": left})
        assert peer.join(held)["status"] == "ok"
    finally:
        first.close()
        second.close()
    wait_for_admission(daemon, {"connections": 0, "topics_by_user": {}})
