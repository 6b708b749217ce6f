"""Presence per connection on a real daemon: tabs, reaped sockets, ordering."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Phoenix, PresenceView, register

if TYPE_CHECKING:
    from collections.abc import Iterator

HEARTBEAT_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("presence")
    config = root / "deeperhub.toml"
    config.write_text(f"[websocket]\nheartbeat_timeout = {HEARTBEAT_TIMEOUT}\n")
    env = {
        "DEEPERHUB_CONFIG_FILE": str(config),
        "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "100000",
        "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": "100000",
    }
    daemon = Daemon(root / "var", env=env)
    daemon.start()
    try:
        users = [register(daemon.base_url, f"user{n}") for n in range(10)]
        for name in ("tabs", "reaped", "order"):
            response = httpx.post(
                daemon.base_url + "/api/channels",
                json={"name": name},
                headers={"authorization": f"Bearer {users[0]['access_token']}"},
            )
            assert response.status_code == 201, response.text
        yield daemon, users
    finally:
        daemon.stop()


def test_two_tabs_close_one(server: tuple[Daemon, list[dict[str, Any]]]) -> None:
    daemon, users = server
    alice, bob = users[0], users[1]
    watcher = Phoenix(daemon.port, bob["access_token"])
    tab_one = Phoenix(daemon.port, alice["access_token"])
    tab_two = Phoenix(daemon.port, alice["access_token"])
    try:
        assert watcher.join("channel:tabs")["status"] == "ok"
        view = PresenceView(watcher, "channel:tabs")
        assert tab_one.join("channel:tabs")["status"] == "ok"
        assert tab_two.join("channel:tabs")["status"] == "ok"
        view.wait_until(lambda: view.count(alice["id"]) == 2)
        assert view.users() == {str(alice["id"]), str(bob["id"])}

        tab_one.close()
        view.wait_until(lambda: view.count(alice["id"]) == 1)
        assert str(alice["id"]) in view.users()
    finally:
        for client in (watcher, tab_one, tab_two):
            client.close()


def test_reaped_socket_after_reconnect(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    alice, bob = users[2], users[3]
    watcher = Phoenix(daemon.port, bob["access_token"])
    old = Phoenix(daemon.port, alice["access_token"])
    new = None
    try:
        assert watcher.join("channel:reaped")["status"] == "ok"
        view = PresenceView(watcher, "channel:reaped")
        assert old.join("channel:reaped")["status"] == "ok"
        view.wait_for({str(alice["id"]), str(bob["id"])})
        (old_ref,) = view.metas.keys() - {
            r for r, u in view.metas.items() if u == str(bob["id"])
        }

        # The old socket goes silent without closing, as after a network
        # change: no FIN, no frames. The user reconnects on a new socket.
        new = Phoenix(daemon.port, alice["access_token"])
        assert new.join("channel:reaped")["status"] == "ok"
        start = time.monotonic()
        view.wait_until(
            lambda: old_ref not in view.metas,
            timeout=HEARTBEAT_TIMEOUT + 5,
            keepalive=(new,),
        )
        # Reaped by the heartbeat timeout, not earlier.
        assert time.monotonic() - start >= HEARTBEAT_TIMEOUT - 0.5
        assert str(alice["id"]) in view.users()
        assert view.count(alice["id"]) == 1
        assert old.ws.expect_close()[0] == 1001
    finally:
        for client in (watcher, old, new):
            if client is not None:
                client.close()


def test_state_precedes_diffs_on_join(
    server: tuple[Daemon, list[dict[str, Any]]],
) -> None:
    daemon, users = server
    clients = [Phoenix(daemon.port, user["access_token"]) for user in users[4:10]]
    try:
        # Every client joins at once, so joins and diffs interleave.
        for client in clients:
            client.join_refs["channel:order"] = "1"
            client.ws.send_text(json.dumps(["1", "1", "channel:order", "phx_join", {}]))
        for client in clients:
            events = []
            while "presence_state" not in events:
                events.append(client.receive()[3])
            presence = [e for e in events if e.startswith("presence_")]
            assert presence[0] == "presence_state", events
            assert events[0] == "phx_reply"
    finally:
        for client in clients:
            client.close()
