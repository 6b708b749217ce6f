"""Parsing of an HTTP/1.1 request head, before the request is routed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11

from .errors import ProtocolError

__all__ = ["RequestHead", "check_body_framing", "find_head_end", "parse_request_head"]

# A line feed without the carriage return before it. RFC 9112 (section 2.2)
# lets a server accept bare LF line endings, but DeeperHub rejects them because
# a proxy in front of it may split the same bytes into different lines.
_BARE_LF = re.compile(rb"(?<!\r)\n")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class RequestHead:
    """Method, target and headers of one request. Header names are lower case."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]
    http_version: str
    client: tuple[str, int]
    raw: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        """Return the first value of header `name`, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Return every comma-separated value of header `name`, stripped."""
        values: list[str] = []
        for key, value in self.headers:
            if key == name:
                values.extend(item.strip() for item in value.split(",") if item.strip())
        return values


def find_head_end(buffer: bytes | bytearray) -> int:
    """Return the index just past the blank line ending the head, or -1.

    A blank line ended by a bare LF (`\\n\\n`) also ends the head, so that
    `parse_request_head` rejects such a request at once instead of waiting for
    a CRLF that never comes.
    """
    ends = []
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0:
        ends.append(crlf + 4)
    bare = buffer.find(b"\n\n")
    if bare >= 0:
        ends.append(bare + 2)
    return min(ends, default=-1)


def check_body_framing(headers: list[tuple[str, str]]) -> None:
    """Raise ProtocolError unless the request body length is unambiguous.

    RFC 9112 (section 6.3) requires a 400 and a closed connection for an
    invalid Content-Length. It lets a server reject a request with both
    Transfer-Encoding and Content-Length, and requires the close in any case.
    DeeperHub rejects both, to rule out request smuggling. Identical repeated
    Content-Length values are accepted. `headers` has lower-case names.
    """
    lengths: set[str] = set()
    has_transfer_encoding = False
    for name, value in headers:
        if name == "content-length":
            lengths.update(item.strip() for item in value.split(","))
        elif name == "transfer-encoding":
            has_transfer_encoding = True
    if not lengths:
        return
    if has_transfer_encoding:
        raise ProtocolError(
            "invalid HTTP request: both Content-Length and Transfer-Encoding are set"
        )
    if len(lengths) > 1:
        values = ", ".join(sorted(lengths))
        raise ProtocolError(
            f"invalid HTTP request: conflicting Content-Length values {values}"
        )
    (length,) = lengths
    if not _CONTENT_LENGTH.fullmatch(length):
        raise ProtocolError(f"invalid HTTP request: invalid Content-Length {length!r}")


def parse_request_head(raw: bytes, client: tuple[str, int]) -> RequestHead:
    """Parse `raw` (the head, ending with a blank line) or raise ProtocolError.

    Besides what h11 rejects, a head with a bare LF line ending or with an
    ambiguous body length (`check_body_framing`) raises ProtocolError.
    """
    if _BARE_LF.search(raw):
        raise ProtocolError(
            "invalid HTTP request head: a line ends with LF, expected CRLF"
        )
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError as exc:
        raise ProtocolError(f"invalid HTTP request head: {exc}") from exc
    if not isinstance(event, h11.Request):
        raise ProtocolError("invalid HTTP request head: incomplete request")
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    headers = [
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in event.headers
    ]
    check_body_framing(headers)
    return RequestHead(
        method=event.method.decode("ascii"),
        target=target,
        path=parts.path,
        query=parse_qs(parts.query, keep_blank_values=True),
        headers=headers,
        http_version=event.http_version.decode("ascii"),
        client=client,
        raw=raw,
    )
