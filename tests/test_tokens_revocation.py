"""Revocation, refresh rotation and reuse detection against a real daemon."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from deeperhub.ipc import open_rpc_client

from .daemon import Daemon
from .data_safety_support import (
    PhoenixClient,
    eventually,
    login,
    register,
    upgrade_status,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


CONCURRENT_REFRESHES = 8
REUSE_GRACE = 2


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    instance = Daemon(tmp_path_factory.mktemp("revocation") / "var")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def _post(daemon: Daemon, path: str, body: Any = None, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(daemon.base_url + path, json=body, headers=headers, timeout=10)


def _me(daemon: Daemon, token: str) -> int:
    reply = httpx.get(
        daemon.base_url + "/api/users/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    return reply.status_code


def _channel(daemon: Daemon, token: str, name: str) -> None:
    reply = _post(daemon, "/api/channels", {"name": name}, token)
    assert reply.status_code == 201, reply.text


def _security_events(daemon: Daemon) -> dict[str, int]:
    async def stats() -> Any:
        path = daemon.var_dir / "run" / "security.sock"
        async with open_rpc_client(path) as client:
            return await client.call("stats", timeout=5)

    return dict(trio.run(stats).get("events", {}))


def test_revoke_closes_open_socket(running: Daemon) -> None:
    rita_user = register(running, "rita")
    register(running, "sam")
    rita = login(running, "rita")
    sam = login(running, "sam")
    _channel(running, rita["access_token"], "revocation")

    watcher = PhoenixClient(running, sam["access_token"])
    victim = PhoenixClient(running, rita["access_token"])
    try:
        assert watcher.join("channel:revocation")["status"] == "ok"
        assert victim.join("channel:revocation")["status"] == "ok"

        started = time.monotonic()
        reply = _post(running, "/api/auth/revoke", token=rita["access_token"])
        assert reply.status_code == 204
        frames = victim.frames_until_close(timeout=5)
        elapsed = time.monotonic() - started
        assert victim.close_code == 1008
        assert victim.close_reason == "token revoked"
        assert elapsed < 1.0
        assert all(frame[3] != "new_msg" for frame in frames)

        # The other member receives rita's presence leave.
        leaves: list[Any] = []
        while not leaves:
            frame = watcher.receive(timeout=5)
            if frame[3] == "presence_diff" and frame[4]["leaves"]:
                leaves.append(frame[4]["leaves"])
        assert str(rita_user["id"]) in leaves[0]
    finally:
        watcher.close()
        victim.close()
    assert _me(running, rita["access_token"]) == 401
    assert upgrade_status(running, rita["access_token"]) == 403


def test_logout_all_revokes_every_session(running: Daemon) -> None:
    register(running, "tina")
    first = login(running, "tina")
    second = login(running, "tina")
    socket = PhoenixClient(running, second["access_token"])
    try:
        time.sleep(1.1)  # `iat` has whole seconds; the cutoff is "before now"
        reply = _post(
            running, "/api/auth/revoke", {"all": True}, token=first["access_token"]
        )
        assert reply.status_code == 204
        socket.frames_until_close(timeout=5)
        assert socket.close_code == 1008
    finally:
        socket.close()
    for tokens in (first, second):
        assert _me(running, tokens["access_token"]) == 401
        refreshed = _post(
            running, "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]}
        )
        assert refreshed.status_code == 401
    assert _me(running, login(running, "tina")["access_token"]) == 200


def test_refresh_reuse_revokes_family(running: Daemon) -> None:
    register(running, "uma")
    first = login(running, "uma")
    other_login = login(running, "uma")
    rotated = _post(
        running, "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert rotated.status_code == 200
    newest = rotated.json()
    socket = PhoenixClient(running, newest["access_token"])
    events_before = _security_events(running).get("refresh_token_reuse", 0)
    # Within auth.refresh_reuse_grace (2 s) a second use counts as a concurrent
    # refresh of the same client, not as reuse.
    time.sleep(REUSE_GRACE + 0.1)
    try:
        reused = _post(
            running, "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
        )
        assert reused.status_code == 401
        socket.frames_until_close(timeout=5)
        assert socket.close_code == 1008
    finally:
        socket.close()

    # Every token descended from that login is dead, access tokens included.
    assert _me(running, first["access_token"]) == 401
    assert _me(running, newest["access_token"]) == 401
    again = _post(
        running, "/api/auth/refresh", {"refresh_token": newest["refresh_token"]}
    )
    assert again.status_code == 401
    # Another login of the same user is another family and keeps working.
    assert _me(running, other_login["access_token"]) == 200
    eventually(
        lambda: (
            _security_events(running).get("refresh_token_reuse", 0) == events_before + 1
        )
    )


def test_concurrent_refreshes_one_wins(running: Daemon) -> None:
    register(running, "vic")
    tokens = login(running, "vic")

    def refresh(_: int) -> httpx.Response:
        return _post(
            running, "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]}
        )

    with ThreadPoolExecutor(CONCURRENT_REFRESHES) as pool:
        replies = list(pool.map(refresh, range(CONCURRENT_REFRESHES)))
    winners = [reply.json() for reply in replies if reply.status_code == 200]
    losers = [reply for reply in replies if reply.status_code == 401]
    assert len(winners) == 1
    assert len(losers) == CONCURRENT_REFRESHES - 1
    # The losers did not revoke the winner's login.
    assert _me(running, winners[0]["access_token"]) == 200
    again = _post(
        running, "/api/auth/refresh", {"refresh_token": winners[0]["refresh_token"]}
    )
    assert again.status_code == 200


def test_revoke_all_cli_while_running(running: Daemon) -> None:
    register(running, "walt")
    tokens = login(running, "walt")
    socket = PhoenixClient(running, tokens["access_token"])
    try:
        time.sleep(1.1)
        result = running.cli("tokens", "revoke-all")
        committed = time.monotonic()
        assert result.returncode == 0, result.stderr
        assert "revoked every token of every user" in result.stdout
        socket.frames_until_close(timeout=5)
        assert time.monotonic() - committed < 1.0
        assert socket.close_code == 1008
    finally:
        socket.close()
    assert _me(running, tokens["access_token"]) == 401
    fresh = login(running, "walt")
    assert _me(running, fresh["access_token"]) == 200


def test_revoke_all_rejects_future_time(running: Daemon) -> None:
    result = running.cli("tokens", "revoke-all", "--before", "2999-01-01T00:00:00Z")
    assert result.returncode == 2
    assert "in the future" in result.stderr


def test_revoke_all_rejects_bad_numbers(running: Daemon) -> None:
    """Non-ASCII digits and a user id beyond SQLite's integers are usage errors."""
    cases = [
        ("--before", "\u0661\u0667"),  # ARABIC-INDIC DIGITS ONE and SEVEN
        ("--user", str(10**40)),
        ("--user", "0"),
    ]
    for option, value in cases:
        result = running.cli("tokens", "revoke-all", option, value)
        assert result.returncode == 2, (option, value, result.stderr)
        assert option in result.stderr, (option, value)
        assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_revoke_all_cli_while_stopped(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    try:
        register(daemon, "xavi")
        tokens = login(daemon, "xavi")
    finally:
        daemon.stop()

    time.sleep(1.1)
    result = daemon.cli("tokens", "revoke-all")
    assert result.returncode == 0, result.stderr

    daemon.start()
    try:
        assert _me(daemon, tokens["access_token"]) == 401
        refreshed = _post(
            daemon, "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]}
        )
        assert refreshed.status_code == 401
        assert _me(daemon, login(daemon, "xavi")["access_token"]) == 200
    finally:
        daemon.stop()
