"""A WebSocket does not outlive its access token unless the client renews it.

The daemon runs with the shortest allowed access token lifetime (10 s) and no
leeway, so the test takes about 12 seconds.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest

from .daemon import Daemon
from .data_safety_support import (
    PhoenixClient,
    login,
    register,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


ACCESS_TTL = 10


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[Daemon]:
    var_dir = tmp_path / "var"
    env = write_config(var_dir, f"[auth]\naccess_ttl = {ACCESS_TTL}\nleeway = 0\n")
    instance = Daemon(var_dir, env)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def _post_message(daemon: Daemon, token: str, channel_id: int, body: str) -> None:
    reply = httpx.post(
        f"{daemon.base_url}/api/channels/{channel_id}/messages",
        json={"body": body},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert reply.status_code == 201, reply.text


def _inserted(frame: list[Any]) -> float:
    return datetime.fromisoformat(frame[4]["inserted_at"]).timestamp()


@pytest.mark.timeout(90)
def test_socket_closes_at_expiry_unless_renewed(short_lived: Daemon) -> None:
    register(short_lived, "xena")
    register(short_lived, "yuri")
    xena = login(short_lived, "xena")
    yuri = login(short_lived, "yuri")
    reply = httpx.post(
        short_lived.base_url + "/api/channels",
        json={"name": "expiry"},
        headers={"Authorization": f"Bearer {xena['access_token']}"},
        timeout=10,
    )
    channel_id = int(reply.json()["channel"]["id"])
    expires_at = jwt.decode(xena["access_token"], options={"verify_signature": False})[
        "exp"
    ]
    yuri_expires_at = jwt.decode(
        yuri["access_token"], options={"verify_signature": False}
    )["exp"]

    expiring = PhoenixClient(short_lived, xena["access_token"])
    renewing = PhoenixClient(short_lived, yuri["access_token"])
    try:
        assert expiring.join("channel:expiry")["status"] == "ok"
        assert renewing.join("channel:expiry")["status"] == "ok"

        # Renewal checks: garbage and another user's token are refused.
        bad = renewing.reply(renewing.push("phoenix", "access_token", {"token": "x"}))
        assert bad["status"] == "error"
        other_user = renewing.reply(
            renewing.push("phoenix", "access_token", {"token": xena["access_token"]})
        )
        assert other_user["status"] == "error"
        assert other_user["response"]["reason"] == "invalid_token"

        # Post until both original tokens have expired, renewing the poster's
        # token and the second socket's token on the way.
        poster = login(short_lived, "xena")["access_token"]
        renewed = False
        sent = 0
        while time.time() < max(expires_at, yuri_expires_at) + 1.5:
            if not renewed and time.time() > expires_at - 5:
                fresh = login(short_lived, "yuri")["access_token"]
                ok = renewing.reply(
                    renewing.push("phoenix", "access_token", {"token": fresh})
                )
                assert ok["status"] == "ok"
                renewed = True
                poster = login(short_lived, "xena")["access_token"]
            _post_message(short_lived, poster, channel_id, f"m{sent}")
            sent += 1
            time.sleep(0.05)

        frames = expiring.frames_until_close(timeout=5)
        assert expiring.close_code == 1008
        assert expiring.close_reason == "token expired"
        messages = [frame for frame in frames if frame[3] == "new_msg"]
        assert messages, "no message reached the socket before its expiry"
        # Nothing stored after the expiry reached the expired socket. The DB
        # writer's clock sets inserted_at; 50 ms covers the clock reading order.
        assert max(_inserted(frame) for frame in messages) <= expires_at + 0.05

        # The renewed socket is still open and receives new messages.
        _post_message(short_lived, poster, channel_id, "after")
        while True:
            frame = renewing.receive(timeout=5)
            if frame[3] == "new_msg" and frame[4]["body"] == "after":
                break
    finally:
        expiring.close()
        renewing.close()
