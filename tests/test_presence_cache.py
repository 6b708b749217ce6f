"""The `presence_state` push built from cached JSON: envelope and freshness.

Every test joins a new connection after a change and checks that the state it
receives is the topic's presence at that moment, so a cache entry that missed
an invalidation shows up as a wrong state.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from deeperhub.phoenix.protocol import VSN_1, VSN_2, encode_push
from workers.acceptor.hub import Hub
from workers.acceptor.presence import TopicPresence, encode_state_push

from .test_hub import TOPIC, Client, connect, join, make_settings

if TYPE_CHECKING:
    from pathlib import Path

    from workers.acceptor.hub import Connection


def meta(ref: str, username: str = "remote") -> dict[str, Any]:
    return {"phx_ref": ref, "username": username, "online_at": "2026-12-04T15:40:00Z"}


def remote_event(
    joins: dict[str, list[str]] | None = None,
    leaves: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Return a bus `presence` event. The dicts map user id keys to phx_refs."""

    def grouped(refs_by_key: dict[str, list[str]] | None) -> dict[str, Any]:
        return {
            key: {"metas": [meta(ref) for ref in refs]}
            for key, refs in (refs_by_key or {}).items()
        }

    return {
        "event": "presence",
        "topic": TOPIC,
        "joins": grouped(joins),
        "leaves": grouped(leaves),
    }


def refs(state: dict[str, Any]) -> dict[str, list[str]]:
    """Return the phx_refs of a presence state, by user id key."""
    return {
        key: [item["phx_ref"] for item in entry["metas"]]
        for key, entry in state.items()
    }


async def joined_state(
    hub: Hub, user_id: int, *, vsn: str = VSN_2, join_ref: str = "9"
) -> tuple[Connection, Any]:
    """Join a new connection and return it with the `presence_state` it received."""
    async with trio.open_nursery() as nursery:
        client = Client(connect(hub, user_id, f"user{user_id}", vsn)).start(nursery)
        join(hub, client.connection, join_ref=join_ref)
        await trio.testing.wait_all_tasks_blocked()
        first = client.messages()[0]
        nursery.cancel_scope.cancel()
    return client.connection, first


def state_payload(message: Any) -> dict[str, Any]:
    """Return the payload of a V1 or V2 `presence_state` message."""
    if isinstance(message, list):
        assert message[3] == "presence_state"
        return dict(message[4])
    assert message["event"] == "presence_state"
    return dict(message["payload"])


@pytest.mark.parametrize("vsn", [VSN_1, VSN_2])
@pytest.mark.parametrize("join_ref", ["7", 12, None, 'é"\\'])
def test_state_push_matches_encode_push(vsn: str, join_ref: str | int | None) -> None:
    """The envelope around cached JSON is byte for byte what encode_push makes."""
    payload = {"1": {"metas": [meta("a", 'zoë "q" \u2028')]}, "2": {"metas": []}}
    topic = 'channel:naïve"x'
    expected = encode_push(vsn, join_ref, topic, "presence_state", payload)
    cached = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    assert encode_state_push(vsn, join_ref, topic, cached) == expected


def test_topic_presence_payload_tracks_changes() -> None:
    """Adds, replacements and removals all reach the next payload."""
    presence = TopicPresence()
    assert not presence
    presence.add("1", meta("a"))
    assert json.loads(presence.payload()) == presence.state()

    presence.add("2", meta("b"))
    presence.add("1", meta("c"))
    assert refs(json.loads(presence.payload())) == {"1": ["a", "c"], "2": ["b"]}

    presence.add("1", meta("a", "renamed"))
    assert json.loads(presence.payload())["1"]["metas"][0]["username"] == "renamed"

    presence.remove("1", "a")
    presence.remove("1", "unknown")
    presence.remove("3", "a")
    assert refs(json.loads(presence.payload())) == {"1": ["c"], "2": ["b"]}

    presence.remove("1", "c")
    presence.remove("2", "b")
    assert not presence
    assert presence.payload() == b"{}"


async def test_state_after_local_leave(tmp_path: Path) -> None:
    """A joiner after a leave gets the state without the meta that left."""
    hub = Hub(make_settings(tmp_path))
    alice = connect(hub, 1, "alice")
    bob = connect(hub, 2, "bob")
    join(hub, alice)
    join(hub, bob)
    _, before = await joined_state(hub, 3)
    assert set(state_payload(before)) == {"1", "2"}

    hub.remove_connection(bob)
    _, after = await joined_state(hub, 4)
    assert set(state_payload(after)) == {"1", "3"}
    assert state_payload(after) == {
        key: value for key, value in hub.presence_state(TOPIC).items() if key != "4"
    }


async def test_state_after_one_tab_leaves(tmp_path: Path) -> None:
    """A user's cached entry is encoded again when one of its two tabs leaves."""
    hub = Hub(make_settings(tmp_path))
    tab_one = connect(hub, 1, "alice")
    tab_two = connect(hub, 1, "alice")
    join(hub, tab_one)
    join(hub, tab_two)
    _, before = await joined_state(hub, 2)
    assert len(state_payload(before)["1"]["metas"]) == 2

    remaining = hub.presence_state(TOPIC)["1"]["metas"][1]
    hub.remove_connection(tab_one)
    _, after = await joined_state(hub, 3)
    assert state_payload(after)["1"]["metas"] == [remaining]


async def test_state_after_remote_diffs(tmp_path: Path) -> None:
    """Remote joins, replaced metas and remote leaves reach the next joiner."""
    hub = Hub(make_settings(tmp_path))
    join(hub, connect(hub, 1, "alice"))
    _, first = await joined_state(hub, 2)
    assert set(state_payload(first)) == {"1"}

    hub.handle_bus_event(remote_event(joins={"5": ["r1", "r2"]}))
    _, second = await joined_state(hub, 3)
    assert refs(state_payload(second))["5"] == ["r1", "r2"]

    updated = remote_event()
    updated["joins"] = {"5": {"metas": [meta("r1", "renamed")]}}
    hub.handle_bus_event(updated)
    _, third = await joined_state(hub, 4)
    assert state_payload(third)["5"]["metas"][0]["username"] == "renamed"

    hub.handle_bus_event(remote_event(leaves={"5": ["r1"]}))
    _, fourth = await joined_state(hub, 6)
    assert refs(state_payload(fourth))["5"] == ["r2"]

    hub.handle_bus_event(remote_event(leaves={"5": ["r2"]}))
    _, fifth = await joined_state(hub, 7)
    assert "5" not in state_payload(fifth)
    assert set(state_payload(fifth)) == {"1", "2", "3", "4", "6"}


async def test_state_after_snapshot_replace(tmp_path: Path) -> None:
    """A snapshot that replaces the remote metas is what the next joiner gets."""
    hub = Hub(make_settings(tmp_path))
    join(hub, connect(hub, 1, "alice"))
    hub.handle_bus_event(remote_event(joins={"5": ["old"], "6": ["kept"]}))
    _, before = await joined_state(hub, 2)
    assert refs(state_payload(before))["5"] == ["old"]

    hub.handle_bus_event(
        {
            "event": "presence_snapshot",
            "topics": {
                TOPIC: {
                    "6": {"metas": [meta("kept")]},
                    "8": {"metas": [meta("new")]},
                }
            },
        }
    )
    _, after = await joined_state(hub, 3)
    assert "5" not in state_payload(after)
    assert refs(state_payload(after))["6"] == ["kept"]
    assert refs(state_payload(after))["8"] == ["new"]

    hub.handle_bus_event({"event": "presence_snapshot", "topics": {}})
    _, emptied = await joined_state(hub, 4)
    assert set(state_payload(emptied)) == {"1", "2", "3"}


async def test_state_for_each_serializer_version(tmp_path: Path) -> None:
    """V1 and V2 joiners get the same state, each with its own join_ref."""
    hub = Hub(make_settings(tmp_path))
    join(hub, connect(hub, 1, "alice"))
    hub.handle_bus_event(remote_event(joins={"5": ["r1"]}))
    _, v1 = await joined_state(hub, 2, vsn=VSN_1, join_ref="41")
    _, v2 = await joined_state(hub, 3, vsn=VSN_2, join_ref="42")

    assert v1["join_ref"] == "41"
    assert v1["topic"] == TOPIC
    assert v1["ref"] is None
    assert v2[0] == "42"
    assert v2[2] == TOPIC
    assert set(state_payload(v1)) == {"1", "5"}
    assert set(state_payload(v2)) == {"1", "2", "5"}


async def test_state_when_topic_empties(tmp_path: Path) -> None:
    """A topic whose last meta left starts again from an empty state."""
    hub = Hub(make_settings(tmp_path))
    alice = connect(hub, 1, "alice")
    join(hub, alice)
    hub.remove_connection(alice)
    assert hub.presence_state(TOPIC) == {}

    _, state = await joined_state(hub, 2)
    assert state_payload(state) == {}


async def test_state_matches_model_over_random_changes(tmp_path: Path) -> None:
    """Over random local and remote changes, each joiner gets the full state."""
    hub = Hub(make_settings(tmp_path))
    rng = random.Random(20261204)
    local: list[Connection] = []
    remote: dict[str, str] = {}  # phx_ref -> user id key
    next_user = 100

    for step in range(150):
        action = rng.choice(["join", "leave", "remote_join", "remote_leave", "snap"])
        if action == "join":
            local.append(connect(hub, rng.randint(1, 6), "local"))
            join(hub, local[-1])
        elif action == "leave" and local:
            hub.remove_connection(local.pop(rng.randrange(len(local))))
        elif action == "remote_join":
            ref, key = f"r{step}", str(rng.randint(1, 8))
            remote[ref] = key
            hub.handle_bus_event(remote_event(joins={key: [ref]}))
        elif action == "remote_leave" and remote:
            ref = rng.choice(sorted(remote))
            hub.handle_bus_event(remote_event(leaves={remote.pop(ref): [ref]}))
        elif action == "snap":
            surviving = {ref: key for ref, key in remote.items() if rng.random() < 0.5}
            remote = surviving
            topics: dict[str, Any] = {}
            for ref, key in surviving.items():
                topics.setdefault(key, {"metas": []})["metas"].append(meta(ref))
            hub.handle_bus_event(
                {"event": "presence_snapshot", "topics": {TOPIC: topics}}
            )

        # The joiner's state must contain every local and remote meta, but not
        # its own, which follows in a presence_diff.
        expected: dict[str, set[str]] = {}
        for connection in local:
            subscription = connection.subscriptions[TOPIC]
            assert subscription.meta is not None
            key = str(connection.user_id)
            expected.setdefault(key, set()).add(subscription.meta["phx_ref"])
        for ref, key in remote.items():
            expected.setdefault(key, set()).add(ref)

        next_user += 1
        joiner, message = await joined_state(hub, next_user)
        received = {
            key: set(value) for key, value in refs(state_payload(message)).items()
        }
        assert received == expected, f"step {step} ({action})"
        hub.remove_connection(joiner)
