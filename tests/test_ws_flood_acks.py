"""Replies to stored pushes when a real daemon closes a flooding WebSocket.

A client that floods a channel is closed with 1008 once its rejected messages
reach `security.ws_flood_close_after`. Pushes that the server already handed
to the DB writer are stored, so their `ok` replies must reach the client
before the Close frame, and pushes read after the close decision must not be
stored. Otherwise a client that retries its unacknowledged pushes stores
them twice.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .security_helpers import open_daemon, query_db, register
from .wsraw import Closed, Phoenix

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .daemon import Daemon

# The defaults of security.rate_limit_ws and security.ws_flood_close_after.
WS_LIMIT = 120
FLOOD_CLOSE_AFTER = 20
PUSHES = 200
TOPIC = "channel:flood"
# Seconds to read the replies and the Close frame.
READ_TIMEOUT = 10.0
# Seconds for late commits to show up in the database after the close.
SETTLE = 1.0


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    settings = {
        "security.rate_limit_ws": WS_LIMIT,
        "security.ws_flood_close_after": FLOOD_CLOSE_AFTER,
    }
    with open_daemon(settings) as started:
        yield started


def read_until_close(client: Phoenix) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Return the reply payloads by ref and the close code, reading to the end."""
    replies: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + READ_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no Close frame within {READ_TIMEOUT} s"
        try:
            opcode, payload = client.ws.recv_frame(remaining)
        except Closed:
            return replies, None
        if opcode == 0x8:
            return replies, int.from_bytes(payload[:2], "big") if payload else None
        if opcode == 0x1:
            message = json.loads(payload)
            if message[3] == "phx_reply":
                replies[message[1]] = message[4]


def test_flood_close_acknowledges_stored_pushes(daemon: Daemon) -> None:
    user = register(daemon, "flooder")
    created = httpx.post(
        daemon.base_url + "/api/channels",
        json={"name": "flood"},
        headers={"Authorization": f"Bearer {user['access_token']}"},
    )
    assert created.status_code == 201, created.text
    channel_id = created.json()["channel"]["id"]

    client = Phoenix(daemon.port, user["access_token"])
    try:
        assert client.join(TOPIC)["status"] == "ok"
        # All pushes in one write, as a flooding client sends them.
        join_ref = client.join_refs[TOPIC]
        frames = []
        for ref in range(100, 100 + PUSHES):
            text = json.dumps(
                [join_ref, str(ref), TOPIC, "new_msg", {"body": str(ref)}]
            )
            frames.append(text)
        client.ws.sock.sendall(b"".join(masked_text(frame) for frame in frames))
        replies, code = read_until_close(client)
    finally:
        client.close()

    assert code == 1008
    ok = {ref: reply for ref, reply in replies.items() if reply["status"] == "ok"}
    rejected = [ref for ref, reply in replies.items() if reply["status"] == "error"]
    assert all(replies[ref]["response"]["reason"] == "rate_limited" for ref in rejected)
    assert len(rejected) == FLOOD_CLOSE_AFTER
    closing_ref = max(int(ref) for ref in rejected)

    # Late commits would show up within SETTLE seconds.
    time.sleep(SETTLE)
    rows = query_db(
        daemon,
        "SELECT id, body FROM messages WHERE channel_id = ? AND user_id = ?",
        (channel_id, user["id"]),
    )
    stored_ids = {row[0] for row in rows}
    acknowledged_ids = {reply["response"]["id"] for reply in ok.values()}
    assert len(ok) == len(rows)
    assert acknowledged_ids == stored_ids
    # Each stored body is the ref of its push: the reply to it was "ok".
    assert {row[1] for row in rows} == set(ok)
    # Nothing read after the close decision was stored.
    assert all(int(row[1]) < closing_ref for row in rows)


def masked_text(text: str) -> bytes:
    """Encode one masked text frame (mask key zero, so the payload is plain)."""
    payload = text.encode()
    length = len(payload)
    if length < 126:
        header = bytes((0x81, 0x80 | length))
    else:
        header = bytes((0x81, 0x80 | 126)) + length.to_bytes(2, "big")
    return header + b"\0\0\0\0" + payload
