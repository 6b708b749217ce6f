"""Deleting a channel ends its joins on every acceptor of a real daemon.

The kernel spreads connections over the two acceptors (SO_REUSEPORT), so the
tests open one connection per user and ask the acceptors, through the
supervisor's control socket, which connection landed where.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .test_channels_replay import bearer, create_channel
from .wsraw import Phoenix, PresenceView, acceptor_of_users, register, worker_call

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

USERS = 8
ACCEPTORS = ("acceptor-1", "acceptor-2")
ENV = {"DEEPERHUB_ACCEPTORS": "2"}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, list[dict[str, Any]]]]:
    daemon = Daemon(tmp_path_factory.mktemp("deletes") / "var", env=ENV)
    daemon.start()
    try:
        users = [register(daemon.base_url, f"user{n}") for n in range(USERS)]
        yield daemon, users
    finally:
        daemon.stop()


def delete_channel(daemon: Daemon, user: dict[str, Any], channel_id: int) -> None:
    response = httpx.delete(
        f"{daemon.base_url}/api/channels/{channel_id}", headers=bearer(user)
    )
    assert response.status_code == 204, response.text


def one_per_acceptor(
    daemon: Daemon, users: list[dict[str, Any]]
) -> tuple[list[Phoenix], list[dict[str, Any]]]:
    """Connect every user and return one client (and user) on each acceptor."""
    clients = {user["id"]: Phoenix(daemon.port, user["access_token"]) for user in users}
    placed = acceptor_of_users(daemon.var_dir, len(ACCEPTORS))
    chosen: dict[str, int] = {}
    for user_id, worker in placed.items():
        chosen.setdefault(worker, user_id)
    assert set(chosen) == set(ACCEPTORS), f"all connections landed on {set(chosen)}"
    for user_id, client in clients.items():
        if user_id not in chosen.values():
            client.close()
    by_id = {user["id"]: user for user in users}
    ids = [chosen[worker] for worker in ACCEPTORS]
    return [clients[i] for i in ids], [by_id[i] for i in ids]


def wait_until(
    condition: Callable[[], Any], description: str, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {description}"
        time.sleep(0.05)


def topics_by_user(daemon: Daemon) -> dict[str, list[str]]:
    """Return each user's joined topics as the DB writer counts them."""
    counts = worker_call(daemon.var_dir, "db_writer", "admission")
    return {str(user): topics for user, topics in counts["topics_by_user"].items()}


def presence_everywhere(daemon: Daemon, topic: str) -> list[dict[str, Any]]:
    """Return the presence state of `topic` as each acceptor tracks it."""
    return [
        worker_call(daemon.var_dir, worker, "presence", topic=topic)
        for worker in ACCEPTORS
    ]


def joined_topics(daemon: Daemon) -> dict[int, list[str]]:
    """Return the topics of every open connection, by user id."""
    return {
        int(connection["user_id"]): sorted(connection["topics"])
        for worker in ACCEPTORS
        for connection in worker_call(daemon.var_dir, worker, "connections")
    }


def test_delete_closes_joins_on_both_acceptors(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    """Both acceptors send phx_close and release presence and admission counts."""
    daemon, users = server
    (a, b), (alice, bob) = one_per_acceptor(daemon, users)
    doomed = create_channel(daemon, alice, "doomed")
    create_channel(daemon, alice, "kept")
    try:
        for client in (a, b):
            assert client.join("channel:kept")["status"] == "ok"
            assert client.join("channel:doomed")["status"] == "ok"
        view = PresenceView(a, "channel:doomed")
        view.wait_for({str(alice["id"]), str(bob["id"])})
        both_topics = ["channel:doomed", "channel:kept"]
        wait_until(
            lambda: (
                topics_by_user(daemon)
                == {str(alice["id"]): both_topics, str(bob["id"]): both_topics}
            ),
            "both joins counted",
        )

        delete_channel(daemon, alice, doomed)

        for client in (a, b):
            close = client.next("phx_close", "channel:doomed")
            assert close[0] == client.join_refs["channel:doomed"]
            assert close[1] is None
            assert close[4] == {}
        kept_only = ["channel:kept"]
        wait_until(
            lambda: (
                topics_by_user(daemon)
                == {str(alice["id"]): kept_only, str(bob["id"]): kept_only}
            ),
            "the doomed joins released",
        )
        wait_until(
            lambda: presence_everywhere(daemon, "channel:doomed") == [{}, {}],
            "the doomed metas gone on both acceptors",
        )
        assert joined_topics(daemon) == {alice["id"]: kept_only, bob["id"]: kept_only}

        # The sockets stay open and the other topic still works.
        reply = a.call("channel:kept", "new_msg", {"body": "still here"})
        assert reply["status"] == "ok"
        assert b.next("new_msg", "channel:kept")[4]["body"] == "still here"
        stale = b.call("channel:doomed", "new_msg", {"body": "too late"})
        assert stale == {"status": "error", "response": {"reason": "unmatched topic"}}

        rejoin = b.join("channel:doomed")
        assert rejoin == {"status": "error", "response": {"reason": "not_found"}}
        assert topics_by_user(daemon)[str(bob["id"])] == kept_only
    finally:
        a.close()
        b.close()


def test_recreated_channel_is_a_new_channel(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    """A channel re-created with the same name gets a new id and keeps its joins."""
    daemon, users = server
    (a, b), (alice, bob) = one_per_acceptor(daemon, users)
    first = create_channel(daemon, alice, "again")
    try:
        for client in (a, b):
            assert client.join("channel:again")["status"] == "ok"
        delete_channel(daemon, alice, first)
        for client in (a, b):
            client.next("phx_close", "channel:again")

        # The deleted channel had the highest id, and AUTOINCREMENT never
        # gives it out again.
        second = create_channel(daemon, alice, "again")
        assert second > first
        for client in (a, b):
            reply = client.join("channel:again")
            assert reply == {"status": "ok", "response": {"channel_id": second}}

        reply = b.call("channel:again", "new_msg", {"body": "new channel"})
        assert reply["status"] == "ok"
        assert a.next("new_msg", "channel:again")[4]["body"] == "new channel"
        assert b.next("new_msg", "channel:again")[4]["body"] == "new channel"
        topics = joined_topics(daemon)
        assert topics[alice["id"]] == ["channel:again"]
        assert topics[bob["id"]] == ["channel:again"]
        assert all(message[3] != "phx_close" for message in a.inbox + b.inbox)
    finally:
        a.close()
        b.close()
