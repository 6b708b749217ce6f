"""Per-channel seq, replay on rejoin, and retention, on a real daemon."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Phoenix, register

if TYPE_CHECKING:
    from collections.abc import Iterator

REPLAY_LIMIT = 50


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, dict[str, Any], dict[str, Any]]]:
    root = tmp_path_factory.mktemp("replay")
    config = root / "deeperhub.toml"
    config.write_text(
        f"[websocket]\nreplay_limit = {REPLAY_LIMIT}\n"
        "[retention]\ninterval = 0.1\nbatch = 4\n"
    )
    env = {
        "DEEPERHUB_CONFIG_FILE": str(config),
        "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "100000",
        "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "100000",
    }
    daemon = Daemon(root / "var", env=env)
    daemon.start()
    try:
        alice = register(daemon.base_url, "alice")
        bob = register(daemon.base_url, "bob")
        yield daemon, alice, bob
    finally:
        daemon.stop()


def bearer(user: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {user['access_token']}"}


def create_channel(daemon: Daemon, user: dict[str, Any], name: str) -> int:
    response = httpx.post(
        daemon.base_url + "/api/channels", json={"name": name}, headers=bearer(user)
    )
    assert response.status_code == 201, response.text
    return int(response.json()["channel"]["id"])


def publish(daemon: Daemon, user: dict[str, Any], channel_id: int, body: str) -> Any:
    response = httpx.post(
        f"{daemon.base_url}/api/channels/{channel_id}/messages",
        json={"body": body},
        headers=bearer(user),
    )
    assert response.status_code == 201, response.text
    return response.json()["message"]


def history(
    daemon: Daemon, user: dict[str, Any], channel_id: int, after_id: int = 0
) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{daemon.base_url}/api/channels/{channel_id}/messages",
        params={"after_id": after_id, "limit": 500},
        headers=bearer(user),
    )
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


def test_seq_counts_per_channel(server: Any) -> None:
    daemon, alice, _ = server
    first = create_channel(daemon, alice, "seq-a")
    second = create_channel(daemon, alice, "seq-b")
    client = Phoenix(daemon.port, alice["access_token"])
    try:
        assert client.join("channel:seq-a")["status"] == "ok"
        for n in range(3):
            publish(daemon, alice, first, f"a{n}")
            publish(daemon, alice, second, f"b{n}")
        pushed = client.call("channel:seq-a", "new_msg", {"body": "ws"})
        assert pushed["status"] == "ok"
        seqs = [client.next("new_msg")[4]["seq"] for _ in range(4)]
        assert seqs == [1, 2, 3, 4]
        assert [m["seq"] for m in history(daemon, alice, second)] == [1, 2, 3]
    finally:
        client.close()


@pytest.mark.parametrize("key", ["last_seen_id", "last_seen_seq"])
def test_rejoin_replays_missed(server: Any, key: str) -> None:
    daemon, alice, bob = server
    name = f"missed-{key}"
    channel_id = create_channel(daemon, alice, name)
    seen = publish(daemon, alice, channel_id, "seen")
    missed = [publish(daemon, alice, channel_id, f"m{n}")["id"] for n in range(5)]
    client = Phoenix(daemon.port, bob["access_token"])
    try:
        value = seen["id"] if key == "last_seen_id" else seen["seq"]
        reply = client.join(f"channel:{name}", {key: value})
        assert reply["response"] == {"channel_id": channel_id, "recovered": True}
        assert [client.next("new_msg")[4]["id"] for _ in missed] == missed
        live = publish(daemon, alice, channel_id, "live")
        assert client.next("new_msg")[4]["id"] == live["id"]
    finally:
        client.close()


def test_rejoin_beyond_limit_replays_newest(server: Any) -> None:
    daemon, alice, bob = server
    channel_id = create_channel(daemon, alice, "beyond")
    seen = publish(daemon, alice, channel_id, "seen")
    missed = [
        publish(daemon, alice, channel_id, f"m{n}")["id"]
        for n in range(REPLAY_LIMIT + 7)
    ]
    client = Phoenix(daemon.port, bob["access_token"])
    try:
        reply = client.join("channel:beyond", {"last_seen_id": seen["id"]})
        assert reply["response"] == {
            "channel_id": channel_id,
            "recovered": False,
            "reason": "replay_limit",
            "replayed_from": missed[7],
            "earliest_available": seen["id"],
        }
        replayed = [client.next("new_msg")[4]["id"] for _ in range(REPLAY_LIMIT)]
        assert replayed == missed[7:]
        live = publish(daemon, alice, channel_id, "live")
        assert client.next("new_msg")[4]["id"] == live["id"]
        # What was skipped is in the history, between the two ids.
        gap = [m["id"] for m in history(daemon, bob, channel_id, seen["id"])]
        assert gap[:7] == missed[:7]
    finally:
        client.close()


def test_rejoin_while_publishing_no_gap(server: Any) -> None:
    daemon, alice, bob = server
    channel_id = create_channel(daemon, alice, "busy")
    seen = publish(daemon, alice, channel_id, "seen")
    published: list[int] = []
    stop = threading.Event()

    def publisher() -> None:
        with httpx.Client(base_url=daemon.base_url, headers=bearer(alice)) as http:
            for n in range(400):
                if stop.is_set():
                    return
                response = http.post(
                    f"/api/channels/{channel_id}/messages", json={"body": f"p{n}"}
                )
                published.append(int(response.json()["message"]["id"]))

    thread = threading.Thread(target=publisher)
    thread.start()
    client = Phoenix(daemon.port, bob["access_token"])
    try:
        while len(published) < 20:
            time.sleep(0.005)
        reply = client.join("channel:busy", {"last_seen_id": seen["id"]})
        assert reply["response"]["recovered"] is True
        thread.join(30)
        received: list[int] = []
        while not received or received[-1] != published[-1]:
            received.append(client.next("new_msg")[4]["id"])
        assert received == published
    finally:
        stop.set()
        thread.join(30)
        client.close()


def set_retention(
    daemon: Daemon, user: dict[str, Any], channel_id: int, **limits: Any
) -> httpx.Response:
    return httpx.put(
        f"{daemon.base_url}/api/channels/{channel_id}/retention",
        json=limits,
        headers=bearer(user),
    )


def wait_for_history(
    daemon: Daemon, user: dict[str, Any], channel_id: int, count: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        messages = history(daemon, user, channel_id)
        if len(messages) == count:
            return messages
        assert time.monotonic() < deadline, f"{len(messages)} messages stored"
        time.sleep(0.05)


def test_retention_count_reported_on_rejoin(server: Any) -> None:
    daemon, alice, bob = server
    channel_id = create_channel(daemon, alice, "pruned")
    response = set_retention(daemon, alice, channel_id, max_messages=3)
    assert response.status_code == 200, response.text
    assert response.json()["retention"] == {
        "max_messages": 3,
        "max_age": None,
        "effective": {"max_messages": 3, "max_age": 0},
    }
    sent = [publish(daemon, alice, channel_id, f"m{n}") for n in range(10)]
    kept = wait_for_history(daemon, bob, channel_id, 3)
    assert [m["id"] for m in kept] == [m["id"] for m in sent[-3:]]

    client = Phoenix(daemon.port, bob["access_token"])
    try:
        reply = client.join("channel:pruned", {"last_seen_seq": sent[1]["seq"]})
        assert reply["response"] == {
            "channel_id": channel_id,
            "recovered": False,
            "reason": "retention",
            "replayed_from": sent[-3]["id"],
            "earliest_available": sent[-3]["id"],
        }
        replayed = [client.next("new_msg")[4]["id"] for _ in range(3)]
        assert replayed == [m["id"] for m in sent[-3:]]
    finally:
        client.close()

    # A client that saw everything still kept recovers.
    client = Phoenix(daemon.port, bob["access_token"])
    try:
        reply = client.join("channel:pruned", {"last_seen_id": sent[-2]["id"]})
        assert reply["response"]["recovered"] is True
    finally:
        client.close()


def test_retention_by_age(server: Any) -> None:
    """The DB writer deletes messages older than max_age, and only those."""
    daemon, alice, bob = server
    channel_id = create_channel(daemon, alice, "aged")
    for n in range(2):
        publish(daemon, alice, channel_id, f"old-{n}")
    time.sleep(2.2)
    fresh = [publish(daemon, alice, channel_id, f"fresh-{n}")["id"] for n in range(2)]
    assert set_retention(daemon, alice, channel_id, max_age=2).status_code == 200
    # Two messages stay, the two newest: a count limit cannot have chosen
    # them, because none is set.
    kept = wait_for_history(daemon, bob, channel_id, 2)
    assert [message["id"] for message in kept] == fresh
    # Without new messages, the fresh ones go too once they are 2 s old.
    assert wait_for_history(daemon, bob, channel_id, 0) == []


def test_retention_route_checks(server: Any) -> None:
    daemon, alice, bob = server
    channel_id = create_channel(daemon, alice, "rules")
    assert set_retention(daemon, bob, channel_id, max_messages=1).status_code == 403
    invalid = set_retention(daemon, alice, channel_id, max_messages=-1)
    assert invalid.status_code == 422
    assert set_retention(daemon, alice, 999_999, max_age=5).status_code == 404
    shown = httpx.get(
        f"{daemon.base_url}/api/channels/{channel_id}/retention", headers=bearer(bob)
    )
    assert shown.status_code == 200
    assert shown.json()["retention"]["effective"] == {"max_messages": 0, "max_age": 0}
