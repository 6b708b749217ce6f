"""Splitting a buffer of length-prefixed IPC messages (`iter_messages`)."""

from __future__ import annotations

import pytest

from deeperhub.errors import ProtocolError
from deeperhub.ipc import MAX_MESSAGE_BYTES, encode_message, iter_messages


def test_complete_messages_leave_partial_one() -> None:
    second = encode_message({"n": 2})
    buffer = bytearray(encode_message({"n": 1}) + second[:5])
    assert list(iter_messages(buffer)) == [{"n": 1}]
    assert buffer == second[:5]

    buffer += second[5:]
    assert list(iter_messages(buffer)) == [{"n": 2}]
    assert buffer == b""


def test_stopped_iteration_keeps_unread_messages() -> None:
    third = encode_message({"n": 3})
    buffer = bytearray(encode_message({"n": 1}) + encode_message({"n": 2}) + third)
    messages = iter_messages(buffer)
    assert next(messages) == {"n": 1}
    messages.close()
    assert list(iter_messages(buffer)) == [{"n": 2}, {"n": 3}]


def test_oversized_length_is_rejected() -> None:
    buffer = bytearray((MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        list(iter_messages(buffer))


def test_invalid_json_is_rejected() -> None:
    buffer = bytearray((3).to_bytes(4, "big") + b"{x}")
    with pytest.raises(ProtocolError, match="invalid JSON"):
        list(iter_messages(buffer))
