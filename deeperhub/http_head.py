"""Parsing of an HTTP/1.1 request head, before the request is routed."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11

from .errors import ProtocolError

__all__ = ["RequestHead", "parse_request_head", "find_head_end"]


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
    """Return the index just past the blank line ending the head, or -1."""
    index = buffer.find(b"\r\n\r\n")
    return -1 if index < 0 else index + 4


def parse_request_head(raw: bytes, client: tuple[str, int]) -> RequestHead:
    """Parse `raw` (the head, ending with a blank line) or raise ProtocolError."""
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
