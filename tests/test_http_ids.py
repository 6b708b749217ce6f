"""Integer ids in paths, queries and bodies, on a real daemon.

SQLite integers are signed 64-bit, so every id outside 0 to 2**63 - 1 must be
rejected before it reaches a query, where it raised OverflowError (HTTP 500 or
WebSocket close 1011).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .wsraw import Phoenix, RawWebSocket, register

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_INT64 = 2**63 - 1
HUGE = 10**40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    daemon = Daemon(tmp_path_factory.mktemp("ids") / "var")
    daemon.start()
    try:
        owner = register(daemon.base_url, "olga")
        outsider = register(daemon.base_url, "otto")
        response = httpx.post(
            daemon.base_url + "/api/channels",
            json={"name": "lobby"},
            headers=bearer(owner),
        )
        assert response.status_code == 201, response.text
        channel_id = int(response.json()["channel"]["id"])
        yield daemon, owner, outsider, channel_id
    finally:
        daemon.stop()


def bearer(user: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {user['access_token']}"}


def routes(channel: str) -> list[tuple[str, str, Any]]:
    """Return (method, path, JSON body) of every route with a channel id."""
    base = f"/api/channels/{channel}"
    return [
        ("GET", base, None),
        ("DELETE", base, None),
        ("GET", base + "/messages", None),
        ("POST", base + "/messages", {"body": "hi"}),
        ("POST", base + "/subscribe", None),
        ("POST", base + "/unsubscribe", None),
        ("GET", base + "/retention", None),
        ("PUT", base + "/retention", {"max_messages": 5}),
    ]


@pytest.mark.parametrize(
    "channel",
    [
        str(HUGE),
        str(MAX_INT64 + 1),
        str(MAX_INT64),
        "9" * 5000,
        "\u0661",  # ARABIC-INDIC DIGIT ONE
        "\uff11",  # FULLWIDTH DIGIT ONE
        "1\u0660",  # 1 and ARABIC-INDIC DIGIT ZERO
    ],
)
def test_path_id_out_of_range(server: Any, channel: str) -> None:
    """Ids beyond SQLite's range and non-ASCII digits name no channel."""
    daemon, owner, _, _ = server
    for method, path, body in routes(channel):
        response = httpx.request(
            method, daemon.base_url + path, json=body, headers=bearer(owner)
        )
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found", (method, path)


def test_ascii_channel_id_still_works(server: Any) -> None:
    daemon, owner, _, channel_id = server
    response = httpx.get(
        f"{daemon.base_url}/api/channels/{channel_id}", headers=bearer(owner)
    )
    assert response.status_code == 200, response.text
    assert response.json()["channel"]["id"] == channel_id


def test_integer_field_out_of_range(server: Any) -> None:
    daemon, owner, _, channel_id = server
    base = f"{daemon.base_url}/api/channels/{channel_id}"
    cases = [
        ("GET", "/messages", {"after_id": str(HUGE)}, None, "after_id"),
        ("GET", "/messages", {"after_id": str(MAX_INT64 + 1)}, None, "after_id"),
        ("GET", "/messages", {"after_id": "\u0661"}, None, "after_id"),
        ("POST", "/subscribe", None, {"user_id": HUGE}, "user_id"),
        ("POST", "/unsubscribe", None, {"user_id": MAX_INT64 + 1}, "user_id"),
        ("PUT", "/retention", None, {"max_age": HUGE}, "max_age"),
    ]
    for method, path, params, body, field in cases:
        response = httpx.request(
            method, base + path, params=params, json=body, headers=bearer(owner)
        )
        assert response.status_code == 422, (path, field, response.text)
        assert response.json()["error"]["field"] == field, (path, field)


def test_json_too_many_digits_message(server: Any) -> None:
    """Python's limit on integer digits is reported without its internals."""
    daemon, owner, _, channel_id = server
    body = '{"body": "hi", "n": ' + "9" * 5000 + "}"
    response = httpx.post(
        f"{daemon.base_url}/api/channels/{channel_id}/messages",
        content=body,
        headers={**bearer(owner), "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert "sys." not in error["message"]
    assert "int_max_str_digits" not in error["message"]
    assert "too many digits" in error["message"]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constant_message(server: Any, constant: str) -> None:
    """NaN and the infinities are named as invalid, not as too many digits."""
    daemon, owner, _, channel_id = server
    response = httpx.post(
        f"{daemon.base_url}/api/channels/{channel_id}/subscribe",
        content='{"user_id": ' + constant + "}",
        headers={**bearer(owner), "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert error["message"] == (
        f"request body is not valid JSON: {constant} is not valid JSON"
    )


def test_ws_too_many_digits_close_reason(server: Any) -> None:
    """A 5000-digit number closes with 1008 and a plain reason."""
    daemon, owner, _, _ = server
    ws = RawWebSocket(daemon.port, owner["access_token"])
    try:
        assert ws.status == 101, ws.response_head
        last_seen = "9" * 5000
        ws.send_text(
            '["1","1","channel:lobby","phx_join",{"last_seen_id":' + last_seen + "}]"
        )
        opcode, payload = ws.recv_frame(5.0)
        while opcode != 0x8:
            opcode, payload = ws.recv_frame(5.0)
    finally:
        ws.close()
    assert int.from_bytes(payload[:2], "big") == 1008
    reason = payload[2:].decode()
    assert reason == "invalid JSON in Phoenix message: a number has too many digits"


def test_join_huge_last_seen_error(server: Any) -> None:
    """`last_seen_id` or `last_seen_seq` of 10**40 gets an error reply."""
    daemon, owner, _, _ = server
    client = Phoenix(daemon.port, owner["access_token"])
    try:
        for key in ("last_seen_id", "last_seen_seq"):
            reply = client.join("channel:lobby", {key: HUGE})
            assert reply["status"] == "error", key
            assert reply["response"] == {"reason": f"invalid_{key}"}, key

        # The connection stayed open.
        reply = client.call("phoenix", "heartbeat", {})
        assert reply["status"] == "ok"
    finally:
        client.close()
