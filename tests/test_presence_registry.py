"""Presence bookkeeping without processes: the DB writer's relay and the hub's view."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from workers.acceptor.hub import Hub
from workers.db_writer.presence import PresenceRegistry

from .test_hub import TOPIC, Client, connect, join, make_settings

if TYPE_CHECKING:
    from pathlib import Path


def meta(ref: str, username: str = "alice") -> dict[str, Any]:
    return {"phx_ref": ref, "username": username, "online_at": "2026-12-04T15:40:00Z"}


def presence(user_id: int, *refs: str) -> dict[str, Any]:
    return {str(user_id): {"metas": [meta(ref) for ref in refs]}}


def test_registry_relays_joins_and_leaves() -> None:
    registry = PresenceRegistry()
    first, second = object(), object()
    relayed = registry.apply(
        first, {"topic": TOPIC, "joins": presence(1, "a"), "leaves": {}}
    )
    assert relayed == {
        "event": "presence",
        "topic": TOPIC,
        "joins": presence(1, "a"),
        "leaves": {},
    }
    registry.apply(second, {"topic": TOPIC, "joins": presence(2, "b"), "leaves": {}})
    assert registry.meta_count() == 2

    snapshot = registry.snapshot(exclude=second)
    assert snapshot == {
        "event": "presence_snapshot",
        "topics": {TOPIC: presence(1, "a")},
    }

    relayed = registry.apply(
        first, {"topic": TOPIC, "joins": {}, "leaves": presence(1, "a")}
    )
    assert relayed is not None
    assert relayed["leaves"] == presence(1, "a")
    assert registry.snapshot(exclude=second)["topics"] == {}


def test_registry_drop_leaves_every_meta() -> None:
    registry = PresenceRegistry()
    owner = object()
    registry.apply(
        owner, {"topic": TOPIC, "joins": presence(1, "a", "b"), "leaves": {}}
    )
    registry.apply(
        owner, {"topic": "channel:x", "joins": presence(2, "c"), "leaves": {}}
    )
    events = registry.drop(owner)
    assert sorted(event["topic"] for event in events) == ["channel:lobby", "channel:x"]
    leaves = {event["topic"]: event["leaves"] for event in events}
    assert leaves[TOPIC] == presence(1, "a", "b")
    assert registry.meta_count() == 0
    assert registry.drop(owner) == []


def test_registry_sync_replaces_owner_state() -> None:
    registry = PresenceRegistry()
    owner = object()
    registry.apply(owner, {"topic": TOPIC, "joins": presence(1, "old"), "leaves": {}})
    events = registry.sync(owner, {"topics": {TOPIC: presence(1, "new")}})
    assert events[0]["leaves"] == presence(1, "old")
    assert events[1]["joins"] == presence(1, "new")
    assert registry.meta_count() == 1


def test_registry_skips_malformed_metas() -> None:
    registry = PresenceRegistry()
    owner = object()
    bad = {"1": {"metas": [{"username": "no ref"}, "text"]}, "2": "nope"}
    assert registry.apply(owner, {"topic": TOPIC, "joins": bad, "leaves": {}}) is None
    assert registry.apply(owner, {"topic": 5, "joins": presence(1, "a")}) is None
    assert registry.meta_count() == 0


async def test_hub_remote_presence_in_state_and_diffs(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    relayed: list[dict[str, Any]] = []
    hub.presence.relay = relayed.append
    async with trio.open_nursery() as nursery:
        local = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, local.connection)
        await trio.testing.wait_all_tasks_blocked()
        local.messages()
        assert relayed[0]["event"] == "presence"
        assert list(relayed[0]["joins"]) == ["1"]

        hub.handle_bus_event(
            {
                "event": "presence",
                "topic": TOPIC,
                "joins": presence(2, "r"),
                "leaves": {},
            }
        )
        await trio.testing.wait_all_tasks_blocked()
        (diff,) = local.messages()
        assert diff[3] == "presence_diff"
        assert diff[4]["joins"] == presence(2, "r")
        assert set(hub.presence_state(TOPIC)) == {"1", "2"}
        assert hub.presence.topics_of_user(2) == {TOPIC}

        # A snapshot without the remote meta removes it with a leave.
        hub.handle_bus_event({"event": "presence_snapshot", "topics": {}})
        await trio.testing.wait_all_tasks_blocked()
        (diff,) = local.messages()
        assert diff[4]["leaves"] == presence(2, "r")
        assert set(hub.presence_state(TOPIC)) == {"1"}
        assert hub.presence.topics_of_user(2) == set()
        nursery.cancel_scope.cancel()


async def test_hub_local_snapshot_for_sync(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    first = connect(hub, 1, "alice")
    second = connect(hub, 1, "alice")
    join(hub, first)
    join(hub, second)
    snapshot = hub.presence.local_snapshot()
    assert list(snapshot) == [TOPIC]
    assert len(snapshot[TOPIC]["1"]["metas"]) == 2
    json.dumps(snapshot)  # it travels as JSON on the bus
    hub.remove_connection(first)
    assert len(hub.presence.local_snapshot()[TOPIC]["1"]["metas"]) == 1
    assert hub.presence.topics_of_user(1) == {TOPIC}
    hub.remove_connection(second)
    assert hub.presence.topics_of_user(1) == set()
