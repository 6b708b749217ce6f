"""Server side of the RFC 6455 opening handshake, without I/O.

`check_upgrade` validates the upgrade request, `extract_token` finds the access
token and the subprotocol to select, and `accept_response` or `error_response`
builds the bytes to send back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from http import HTTPStatus
from typing import TYPE_CHECKING

from ..errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..http_head import RequestHead

__all__ = [
    "AUTH_TOKEN_PREFIX",
    "PHOENIX_SUBPROTOCOL",
    "HandshakeError",
    "accept_response",
    "check_upgrade",
    "error_response",
    "extract_token",
]

# Fixed GUID that RFC 6455 section 1.3 appends to the key before hashing.
_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

PHOENIX_SUBPROTOCOL = "phoenix"

# phoenix.js 1.8 (assets/js/phoenix/socket.js, checked in 1.8.16) sends its
# `authToken` option as a second subprotocol, "base64url.bearer.phx." followed by
# `btoa(token)` with every "=" removed. Despite the prefix, btoa uses the
# standard base64 alphabet with "+" and "/".
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."

_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")

# RFC 9110 token, the syntax of a subprotocol name and of a header field name.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Headers that error_response always writes itself.
_FRAMING_HEADERS = frozenset({"connection", "content-length", "transfer-encoding"})


class HandshakeError(ProtocolError):
    """Rejected upgrade request.

    The server responds with `error_response(status, headers, body)` and closes
    the connection. `headers` are extra response headers, such as
    Sec-WebSocket-Version for a 426.
    """

    status: int
    message: str
    headers: tuple[tuple[str, str], ...]

    def __init__(
        self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


def check_upgrade(head: RequestHead) -> str:
    """Validate a WebSocket upgrade request and return its Sec-WebSocket-Key.

    Raises HandshakeError with status 400 for a request that is not a valid
    upgrade, and with status 426 and a `Sec-WebSocket-Version: 13` header when
    the client asks for another protocol version.
    """
    if head.method != "GET":
        raise _bad_request(f"method must be GET, got {head.method}")
    if head.http_version != "1.1":
        raise _bad_request(f"HTTP version must be 1.1, got {head.http_version}")
    upgrade = [value.lower() for value in head.header_values("upgrade")]
    if "websocket" not in upgrade:
        raise _bad_request("missing Upgrade: websocket header")
    connection = [value.lower() for value in head.header_values("connection")]
    if "upgrade" not in connection:
        raise _bad_request("missing Connection: Upgrade header")

    # The version decides how the remaining headers are read, so it is checked
    # before the key.
    versions = head.header_values("sec-websocket-version")
    if versions != ["13"]:
        raise HandshakeError(
            426,
            f"unsupported WebSocket version {', '.join(versions) or '(missing)'}, "
            "expected 13",
            [("Sec-WebSocket-Version", "13")],
        )

    keys = [value for name, value in head.headers if name == "sec-websocket-key"]
    if len(keys) != 1:
        raise _bad_request(f"expected one Sec-WebSocket-Key header, got {len(keys)}")
    key = keys[0]
    try:
        nonce = base64.b64decode(key, validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != 16:
        raise _bad_request(
            f"invalid Sec-WebSocket-Key {key!r}, expected base64 of 16 bytes"
        )
    return key


def _bad_request(message: str) -> HandshakeError:
    return HandshakeError(400, f"invalid WebSocket upgrade: {message}")


def extract_token(head: RequestHead) -> tuple[str | None, str | None]:
    """Return the access token of an upgrade request and the subprotocol to select.

    The token comes from a subprotocol entry that starts with AUTH_TOKEN_PREFIX,
    as phoenix.js sends it, or else from the `token` query parameter. When the
    entry is present, the query is not read: a malformed entry, or more than
    one entry, gives a None token. An empty token is returned as None.

    The subprotocol is "phoenix" when the client offered it, with or without a
    token entry, and None otherwise. The token entry itself is never selected,
    because the response would then repeat the token.
    """
    offered = head.header_values("sec-websocket-protocol")
    subprotocol = PHOENIX_SUBPROTOCOL if PHOENIX_SUBPROTOCOL in offered else None

    entries = [item for item in offered if item.startswith(AUTH_TOKEN_PREFIX)]
    if entries:
        if len(entries) > 1:
            return None, subprotocol
        return _decode_auth_token(entries[0][len(AUTH_TOKEN_PREFIX) :]), subprotocol

    values = head.query.get("token")
    token = values[0] if values else None
    return token or None, subprotocol


def _decode_auth_token(encoded: str) -> str | None:
    """Decode the base64 text after AUTH_TOKEN_PREFIX, or return None if invalid.

    Both the standard and the URL-safe alphabet are accepted, but not mixed, and
    the "=" padding may be present or left out. The token must decode to ASCII,
    which every JWT is.
    """
    if "-" in encoded or "_" in encoded:
        if "+" in encoded or "/" in encoded:
            return None
        encoded = encoded.translate(_URLSAFE_TO_STANDARD)

    unpadded = encoded.rstrip("=")
    padding = -len(unpadded) % 4
    if padding == 3:
        return None
    if len(encoded) != len(unpadded) and len(encoded) != len(unpadded) + padding:
        return None
    try:
        token = base64.b64decode(unpadded + "=" * padding, validate=True)
        return token.decode("ascii") or None
    except (binascii.Error, UnicodeDecodeError):
        return None


def accept_response(key: str, subprotocol: str | None) -> bytes:
    """Build the complete HTTP/1.1 101 response that accepts the upgrade.

    `key` is the value returned by check_upgrade. Raises ValueError when
    `subprotocol` is not a valid token.
    """
    digest = hashlib.sha1((key + _WEBSOCKET_GUID).encode("ascii")).digest()
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {base64.b64encode(digest).decode('ascii')}",
    ]
    if subprotocol is not None:
        if not _TOKEN.fullmatch(subprotocol):
            raise ValueError(f"invalid subprotocol {subprotocol!r}, expected a token")
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def error_response(
    status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """Build a complete HTTP/1.1 error response that ends the connection.

    The response has Content-Length and `Connection: close`, and `headers` are
    added before them. Raises ValueError for a status outside 400-599, for a
    Connection, Content-Length or Transfer-Encoding header in `headers`, for a
    header name that is not a token, and for a header value that contains CR, LF,
    NUL or a non-ASCII character.
    """
    if not 400 <= status <= 599:
        raise ValueError(f"invalid error status {status}, expected 400-599")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}"]
    for name, value in headers:
        _check_header(name, value)
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _check_header(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in _FRAMING_HEADERS:
        raise ValueError(f"header {name} is set by error_response, remove it")
    if any(char in value for char in "\r\n\0") or not value.isascii():
        raise ValueError(f"invalid value {value!r} for header {name}")
