"""Request head parsing before routing: head end, line endings, body framing."""

from __future__ import annotations

import pytest

from deeperhub.errors import ProtocolError
from deeperhub.http_head import check_body_framing, find_head_end, parse_request_head

CLIENT = ("127.0.0.1", 40000)


@pytest.mark.parametrize(
    ("buffer", "end"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody", 27),
        (b"GET / HTTP/1.1\nHost: x\n\nbody", 24),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\nbody", 26),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", -1),
    ],
)
def test_find_head_end(buffer: bytes, end: int) -> None:
    assert find_head_end(buffer) == end


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\n",
    ],
)
def test_bare_lf_head_rejected(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="expected CRLF"):
        parse_request_head(raw, CLIENT)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            [("content-length", "5"), ("transfer-encoding", "chunked")],
            "both Content-Length and Transfer-Encoding",
        ),
        ([("content-length", "5"), ("content-length", "6")], "conflicting"),
        ([("content-length", "5, 6")], "conflicting"),
        ([("content-length", "-1")], "invalid Content-Length"),
        ([("content-length", "")], "invalid Content-Length"),
        ([("content-length", "1" * 19)], "invalid Content-Length"),
    ],
)
def test_ambiguous_framing_rejected(
    headers: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        check_body_framing(headers)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("content-length", "5")],
        [("content-length", "5"), ("content-length", "5")],
        [("content-length", "5, 5")],
        [("transfer-encoding", "chunked")],
    ],
)
def test_unambiguous_framing_accepted(headers: list[tuple[str, str]]) -> None:
    check_body_framing(headers)


def test_head_with_both_lengths_rejected() -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with pytest.raises(ProtocolError, match="Transfer-Encoding"):
        parse_request_head(raw, CLIENT)
