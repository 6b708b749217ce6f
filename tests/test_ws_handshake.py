"""Tests of the WebSocket upgrade handshake in deeperhub.ws.handshake."""

from __future__ import annotations

import h11
import pytest
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from deeperhub.errors import DeeperHubError
from deeperhub.http_head import RequestHead, parse_request_head
from deeperhub.ws.handshake import (
    HandshakeError,
    accept_response,
    check_upgrade,
    error_response,
    extract_token,
)

# Key and accept value from the example in RFC 6455 section 1.3.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

DEFAULT_HEADERS = {
    "Host": "127.0.0.1:4000",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": RFC_KEY,
    "Sec-WebSocket-Version": "13",
}

# Token whose standard base64 contains "+", "/" and padding: "YX5+fj8/Pw==".
TOKEN = "a~~~???"
# What phoenix.js 1.8 sends for TOKEN: btoa(token) with every "=" removed.
PHOENIX_JS_ENTRY = "base64url.bearer.phx.YX5+fj8/Pw"


def make_head(
    changes: dict[str, str | None] | None = None,
    *,
    extra: list[tuple[str, str]] | None = None,
    method: str = "GET",
    target: str = "/socket/websocket",
    version: str = "1.1",
) -> RequestHead:
    """Parse an upgrade request built from DEFAULT_HEADERS.

    `changes` replaces header values, and a None value removes the header.
    `extra` headers are appended after the others.
    """
    headers = {**DEFAULT_HEADERS, **(changes or {})}
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [
        f"{name}: {value}" for name, value in headers.items() if value is not None
    ]
    lines += [f"{name}: {value}" for name, value in extra or []]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return parse_request_head(raw, ("127.0.0.1", 50000))


def test_check_upgrade_returns_key() -> None:
    assert check_upgrade(make_head()) == RFC_KEY


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"Upgrade": "WebSocket"}, id="upgrade mixed case"),
        pytest.param({"Upgrade": "h2c, websocket"}, id="upgrade list"),
        pytest.param({"Connection": "keep-alive, Upgrade"}, id="connection list"),
        pytest.param({"Connection": "UPGRADE"}, id="connection upper case"),
        pytest.param({"Connection": "keep-alive,upgrade"}, id="connection no space"),
    ],
)
def test_check_upgrade_accepts_variant(changes: dict[str, str | None]) -> None:
    assert check_upgrade(make_head(changes)) == RFC_KEY


def test_check_upgrade_connection_in_two_lines() -> None:
    head = make_head({"Connection": "keep-alive"}, extra=[("Connection", "Upgrade")])
    assert check_upgrade(head) == RFC_KEY


@pytest.mark.parametrize(
    ("method", "version", "changes", "message"),
    [
        pytest.param("POST", "1.1", {}, "GET", id="post"),
        pytest.param("GET", "1.0", {"Host": None}, "1.1", id="http 1.0"),
        pytest.param("GET", "1.1", {"Upgrade": None}, "Upgrade", id="upgrade missing"),
        pytest.param("GET", "1.1", {"Upgrade": "h2c"}, "Upgrade", id="upgrade h2c"),
        pytest.param(
            "GET", "1.1", {"Connection": None}, "Connection", id="connection missing"
        ),
        pytest.param(
            "GET",
            "1.1",
            {"Connection": "keep-alive"},
            "Connection",
            id="connection keep-alive",
        ),
        pytest.param(
            "GET",
            "1.1",
            {"Connection": "upgraded"},
            "Connection",
            id="connection substring",
        ),
        pytest.param(
            "GET", "1.1", {"Sec-WebSocket-Key": None}, "Key", id="key missing"
        ),
        pytest.param(
            "GET", "1.1", {"Sec-WebSocket-Key": "not base64!"}, "Key", id="key invalid"
        ),
        pytest.param(
            "GET",
            "1.1",
            {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ"},
            "Key",
            id="key unpadded",
        ),
        pytest.param(
            "GET",
            "1.1",
            {"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAA"},
            "Key",
            id="key 15 bytes",
        ),
        pytest.param(
            "GET",
            "1.1",
            {"Sec-WebSocket-Key": "AAAAAAAAAAAAAAAAAAAAAAA="},
            "Key",
            id="key 17 bytes",
        ),
    ],
)
def test_check_upgrade_bad_request(
    method: str, version: str, changes: dict[str, str | None], message: str
) -> None:
    head = make_head(changes, method=method, version=version)
    with pytest.raises(HandshakeError, match=message) as caught:
        check_upgrade(head)
    assert caught.value.status == 400
    assert caught.value.headers == ()


def test_check_upgrade_two_keys() -> None:
    head = make_head(extra=[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")])
    with pytest.raises(HandshakeError, match="got 2") as caught:
        check_upgrade(head)
    assert caught.value.status == 400


@pytest.mark.parametrize("version", ["8", "12", "14", "13, 8", None])
def test_check_upgrade_wrong_version(version: str | None) -> None:
    with pytest.raises(HandshakeError, match="version") as caught:
        check_upgrade(make_head({"Sec-WebSocket-Version": version}))
    assert caught.value.status == 426
    assert caught.value.headers == (("Sec-WebSocket-Version", "13"),)


def test_handshake_error_is_deeperhub_error() -> None:
    error = HandshakeError(400, "invalid request")
    assert isinstance(error, DeeperHubError)
    assert error.message == "invalid request"
    assert str(error) == "invalid request"


@pytest.mark.parametrize(
    ("target", "protocols", "expected"),
    [
        pytest.param("/socket/websocket", None, (None, None), id="nothing"),
        pytest.param(
            "/socket/websocket?token=abc&vsn=2.0.0",
            None,
            ("abc", None),
            id="query token",
        ),
        pytest.param("/socket/websocket?token=", None, (None, None), id="query empty"),
        pytest.param("/socket/websocket", "phoenix", (None, "phoenix"), id="phoenix"),
        pytest.param(
            "/socket/websocket",
            f"phoenix, {PHOENIX_JS_ENTRY}",
            (TOKEN, "phoenix"),
            id="phoenix.js authToken",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YX5+fj8/Pw==",
            (TOKEN, "phoenix"),
            id="padded",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YX5-fj8_Pw",
            (TOKEN, "phoenix"),
            id="url-safe alphabet",
        ),
        pytest.param(
            "/socket/websocket",
            "base64url.bearer.phx.YX5+fj8/Pw",
            (TOKEN, None),
            id="token without phoenix",
        ),
        pytest.param(
            "/socket/websocket?token=from-query",
            f"phoenix, {PHOENIX_JS_ENTRY}",
            (TOKEN, "phoenix"),
            id="subprotocol before query",
        ),
        pytest.param(
            "/socket/websocket?token=from-query",
            "phoenix, base64url.bearer.phx.!!!",
            (None, "phoenix"),
            id="malformed ignores query",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YX5-fj8/Pw",
            (None, "phoenix"),
            id="mixed alphabets",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YX5+f",
            (None, "phoenix"),
            id="impossible length",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YWI=",
            ("ab", "phoenix"),
            id="correct padding",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YWI==",
            (None, "phoenix"),
            id="extra padding",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.",
            (None, "phoenix"),
            id="empty token",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.__4",
            (None, "phoenix"),
            id="not ascii",
        ),
        pytest.param(
            "/socket/websocket",
            "phoenix, base64url.bearer.phx.YWI, base64url.bearer.phx.Y2Q",
            (None, "phoenix"),
            id="two token entries",
        ),
        pytest.param(
            "/socket/websocket", "chat, superchat", (None, None), id="other protocols"
        ),
        pytest.param(
            "/socket/websocket", "Phoenix", (None, None), id="case-sensitive name"
        ),
    ],
)
def test_extract_token(
    target: str, protocols: str | None, expected: tuple[str | None, str | None]
) -> None:
    head = make_head({"Sec-WebSocket-Protocol": protocols}, target=target)
    assert extract_token(head) == expected


def test_extract_token_protocols_in_two_lines() -> None:
    head = make_head(
        {"Sec-WebSocket-Protocol": "phoenix"},
        extra=[("Sec-WebSocket-Protocol", PHOENIX_JS_ENTRY)],
    )
    assert extract_token(head) == (TOKEN, "phoenix")


def receive_response(data: bytes) -> list[h11.Event]:
    """Parse `data` as the response to a GET request, with h11's client side."""
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(
            method="GET",
            target="/socket/websocket",
            headers=[
                ("Host", "127.0.0.1"),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
            ],
        )
    )
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    events: list[h11.Event] = []
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        assert isinstance(event, h11.Event)
        events.append(event)
        if isinstance(event, h11.EndOfMessage | h11.InformationalResponse):
            return events


def test_accept_response_rfc_example() -> None:
    assert accept_response(RFC_KEY, None) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n\r\n"
    )


def test_accept_response_with_subprotocol() -> None:
    events = receive_response(accept_response(RFC_KEY, "phoenix"))

    assert len(events) == 1
    response = events[0]
    assert isinstance(response, h11.InformationalResponse)
    assert response.status_code == 101
    headers = dict(response.headers)
    assert headers[b"sec-websocket-accept"] == RFC_ACCEPT.encode()
    assert headers[b"sec-websocket-protocol"] == b"phoenix"


@pytest.mark.parametrize(
    "subprotocol", ["", "two words", "x\r\nSet-Cookie: a=b", "a/b"]
)
def test_accept_response_rejects_subprotocol(subprotocol: str) -> None:
    with pytest.raises(ValueError, match="subprotocol"):
        accept_response(RFC_KEY, subprotocol)


def test_error_response_parses() -> None:
    data = error_response(
        426,
        [("Sec-WebSocket-Version", "13"), ("Content-Type", "text/plain")],
        b"upgrade required",
    )

    events = receive_response(data)

    assert len(events) == 3
    response, body, end = events
    assert isinstance(response, h11.Response)
    assert response.status_code == 426
    assert response.reason == b"Upgrade Required"
    headers = dict(response.headers)
    assert headers[b"sec-websocket-version"] == b"13"
    assert headers[b"content-length"] == b"16"
    assert headers[b"connection"] == b"close"
    assert isinstance(body, h11.Data)
    assert body.data == b"upgrade required"
    assert isinstance(end, h11.EndOfMessage)


def test_error_response_without_body() -> None:
    assert error_response(400) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


def test_error_response_unknown_status() -> None:
    assert error_response(499).startswith(b"HTTP/1.1 499 \r\n")


@pytest.mark.parametrize(
    ("status", "headers", "message"),
    [
        pytest.param(200, [], "status", id="success status"),
        pytest.param(600, [], "status", id="status over 599"),
        pytest.param(400, [("Content-Length", "5")], "Content-Length", id="length"),
        pytest.param(
            400, [("connection", "keep-alive")], "connection", id="connection"
        ),
        pytest.param(400, [("Bad Name", "x")], "name", id="name with space"),
        pytest.param(400, [("X-Test", "a\r\nSet-Cookie: b")], "value", id="crlf"),
        pytest.param(400, [("X-Test", "caf\u00e9")], "value", id="not ascii"),
    ],
)
def test_error_response_rejects(
    status: int, headers: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        error_response(status, headers)


def websockets_request(subprotocols: list[str] | None) -> tuple[ClientProtocol, bytes]:
    """Return a client of the websockets library and its upgrade request bytes."""
    client = ClientProtocol(
        parse_uri("ws://127.0.0.1:4000/socket/websocket?vsn=2.0.0"),
        subprotocols=[Subprotocol(item) for item in subprotocols or []] or None,
    )
    client.send_request(client.connect())
    return client, b"".join(client.data_to_send())


def test_websockets_client_accepts_handshake() -> None:
    client, data = websockets_request(["phoenix", PHOENIX_JS_ENTRY])
    head = parse_request_head(data, ("127.0.0.1", 50000))

    key = check_upgrade(head)
    token, subprotocol = extract_token(head)
    client.receive_data(accept_response(key, subprotocol))

    assert token == TOKEN
    assert client.handshake_exc is None
    assert client.state is State.OPEN
    assert client.subprotocol == "phoenix"


def test_websockets_client_without_subprotocol() -> None:
    client, data = websockets_request(None)
    head = parse_request_head(data, ("127.0.0.1", 50000))

    key = check_upgrade(head)
    token, subprotocol = extract_token(head)
    client.receive_data(accept_response(key, subprotocol))

    assert (token, subprotocol) == (None, None)
    assert client.state is State.OPEN
    assert client.subprotocol is None


def test_websockets_client_reads_rejection() -> None:
    client, data = websockets_request(None)
    head = parse_request_head(data.replace(b"Version: 13", b"Version: 8"), ("::1", 1))

    with pytest.raises(HandshakeError) as caught:
        check_upgrade(head)
    error = caught.value
    client.receive_data(error_response(error.status, error.headers, b"version 13"))

    assert isinstance(client.handshake_exc, InvalidStatus)
    response = client.handshake_exc.response
    assert response.status_code == 426
    assert response.headers == Headers(
        [
            ("Sec-WebSocket-Version", "13"),
            ("Content-Length", "10"),
            ("Connection", "close"),
        ]
    )
    assert response.body == b"version 13"
