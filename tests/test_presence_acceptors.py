"""Presence and fan-out over two acceptor processes of one real daemon.

The kernel spreads connections over the acceptors (SO_REUSEPORT), so each test
opens connections for several users and asks the acceptors, through the
supervisor's control socket, which connection landed where.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Phoenix, PresenceView, acceptor_of_users, register, worker_call

if TYPE_CHECKING:
    from collections.abc import Iterator

USERS = 12
ENV = {
    "DEEPERHUB_ACCEPTORS": "2",
    "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "100000",
    "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "100000",
}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, list[dict[str, Any]]]]:
    daemon = Daemon(tmp_path_factory.mktemp("acceptors") / "var", env=ENV)
    daemon.start()
    try:
        users = [register(daemon.base_url, f"user{n}") for n in range(USERS)]
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


def one_per_acceptor(
    daemon: Daemon, users: list[dict[str, Any]]
) -> tuple[list[Phoenix], list[dict[str, Any]]]:
    """Connect every user and return one client (and user) on each acceptor."""
    clients = {user["id"]: Phoenix(daemon.port, user["access_token"]) for user in users}
    placed = acceptor_of_users(daemon.var_dir, 2)
    chosen: dict[str, int] = {}
    for user_id, worker in placed.items():
        chosen.setdefault(worker, user_id)
    assert len(chosen) == 2, f"all {USERS} connections landed on {set(chosen)}"
    for user_id, client in clients.items():
        if user_id not in chosen.values():
            client.close()
    by_id = {user["id"]: user for user in users}
    ids = [chosen["acceptor-1"], chosen["acceptor-2"]]
    return [clients[i] for i in ids], [by_id[i] for i in ids]


def test_presence_spans_acceptors(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    (a, b), (alice, bob) = one_per_acceptor(daemon, users)
    create_channel(daemon, alice, "span")
    try:
        assert a.join("channel:span")["status"] == "ok"
        view_a = PresenceView(a, "channel:span")
        view_a.wait_for({str(alice["id"])})

        assert b.join("channel:span")["status"] == "ok"
        view_b = PresenceView(b, "channel:span")
        # Alice's meta is in the state, or follows as a diff once relayed.
        view_b.wait_for({str(alice["id"]), str(bob["id"])})
        view_a.wait_for({str(alice["id"]), str(bob["id"])})
        bob_refs = [ref for ref, user in view_a.metas.items() if user == str(bob["id"])]
        assert len(bob_refs) == 1

        assert b.call("channel:span", "phx_leave", {})["status"] == "ok"
        view_a.wait_for({str(alice["id"])})
        assert bob_refs[0] not in view_a.metas
    finally:
        a.close()
        b.close()


def test_messages_same_order_everywhere(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    (a, b), (alice, _) = one_per_acceptor(daemon, users)
    channel_id = create_channel(daemon, alice, "order")
    try:
        assert a.join("channel:order")["status"] == "ok"
        assert b.join("channel:order")["status"] == "ok"
        # Both push without waiting for replies, so the DB writer interleaves
        # messages of both acceptors.
        for n in range(40):
            a.push("channel:order", "new_msg", {"body": f"a{n}"})
            b.push("channel:order", "new_msg", {"body": f"b{n}"})
        http = httpx.post(
            f"{daemon.base_url}/api/channels/{channel_id}/messages",
            json={"body": "via http"},
            headers={"authorization": f"Bearer {alice['access_token']}"},
        )
        assert http.status_code == 201

        seen_a = [a.next("new_msg")[4] for _ in range(81)]
        seen_b = [b.next("new_msg")[4] for _ in range(81)]
        assert [m["id"] for m in seen_a] == [m["id"] for m in seen_b]
        assert [m["seq"] for m in seen_a] == list(range(1, 82))
        assert {m["body"] for m in seen_a} >= {"a0", "b39", "via http"}
    finally:
        a.close()
        b.close()


def test_presence_survives_db_writer_restart(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    (a, b), (alice, bob) = one_per_acceptor(daemon, users)
    create_channel(daemon, alice, "resync")
    try:
        assert a.join("channel:resync")["status"] == "ok"
        assert b.join("channel:resync")["status"] == "ok"

        os.kill(daemon.worker_pid("db_writer"), signal.SIGKILL)
        time.sleep(0.5)
        daemon.wait_healthy()

        # Each acceptor sends its metas again after it resubscribed; poll until
        # the presence state of a new joiner contains both.
        deadline = time.monotonic() + 20
        while True:
            with_both = False
            probe = Phoenix(daemon.port, users[-1]["access_token"])
            try:
                if probe.join("channel:resync")["status"] == "ok":
                    state = probe.next("presence_state")[4]
                    with_both = {str(alice["id"]), str(bob["id"])} <= set(state)
            finally:
                probe.close()
            if with_both:
                break
            assert time.monotonic() < deadline, (
                f"presence after restart: {state}; acceptors: "
                + str(
                    [
                        worker_call(
                            daemon.var_dir, w, "presence", topic="channel:resync"
                        )
                        for w in ("acceptor-1", "acceptor-2")
                    ]
                )
            )
            time.sleep(0.2)

        # Messages flow again on both acceptors.
        assert a.call("channel:resync", "new_msg", {"body": "back"})["status"] == "ok"
        assert b.next("new_msg", timeout=10)[4]["body"] == "back"
    finally:
        a.close()
        b.close()


def test_dead_acceptor_presence_removed(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    (a, b), (alice, bob) = one_per_acceptor(daemon, users)
    create_channel(daemon, alice, "crash")
    try:
        assert a.join("channel:crash")["status"] == "ok"
        assert b.join("channel:crash")["status"] == "ok"
        view = PresenceView(b, "channel:crash")
        everyone = {str(alice["id"]), str(bob["id"])}
        view.wait_for(everyone)

        os.kill(daemon.worker_pid("acceptor-1"), signal.SIGKILL)
        # The DB writer detects the end of acceptor-1's bus connection and
        # relays leaves for its metas.
        view.wait_for({str(bob["id"])}, timeout=10)
    finally:
        a.close()
        b.close()
    daemon.wait_healthy()
