"""Phoenix Channels serializers V1 and V2, without sockets."""

from __future__ import annotations

import json

import pytest

from deeperhub.errors import ProtocolError
from deeperhub.phoenix.protocol import (
    VSN_1,
    VSN_2,
    PhoenixMessage,
    decode_message,
    encode_push,
    encode_reply,
    select_vsn,
)


def test_select_vsn_missing_is_v1() -> None:
    assert select_vsn({}) == VSN_1
    assert select_vsn({"token": ["abc"]}) == VSN_1


def test_select_vsn_known_versions() -> None:
    assert select_vsn({"vsn": ["2.0.0"]}) == VSN_2
    assert select_vsn({"vsn": ["1.0.0"]}) == VSN_1


@pytest.mark.parametrize("value", ["", "2", "2.0", "3.0.0", "2.0.0 "])
def test_select_vsn_rejects_unknown(value: str) -> None:
    with pytest.raises(ProtocolError, match="unsupported vsn"):
        select_vsn({"vsn": [value]})


def test_select_vsn_rejects_conflicting_values() -> None:
    with pytest.raises(ProtocolError, match="conflicting"):
        select_vsn({"vsn": ["2.0.0", "1.0.0"]})


def test_decode_v2_join() -> None:
    text = '["1","1","channel:lobby","phx_join",{"last_seen_id":5}]'
    message = decode_message(VSN_2, text)
    assert message == PhoenixMessage(
        join_ref="1",
        ref="1",
        topic="channel:lobby",
        event="phx_join",
        payload={"last_seen_id": 5},
    )


def test_decode_v2_null_and_integer_refs() -> None:
    message = decode_message(VSN_2, '[null,7,"phoenix","heartbeat",{}]')
    assert message.join_ref is None
    assert message.ref == 7


def test_decode_v1_object() -> None:
    text = '{"topic":"channel:a","event":"new_msg","payload":{"body":"hi"},"ref":"3"}'
    message = decode_message(VSN_1, text)
    assert message.topic == "channel:a"
    assert message.event == "new_msg"
    assert message.payload == {"body": "hi"}
    assert message.ref == "3"
    assert message.join_ref is None


def test_decode_v1_with_join_ref() -> None:
    text = json.dumps(
        {"topic": "t", "event": "e", "payload": {}, "ref": "4", "join_ref": "2"}
    )
    assert decode_message(VSN_1, text).join_ref == "2"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "invalid JSON"),
        ("", "invalid JSON"),
        ('{"a": NaN}', "invalid JSON"),
        ("[1, Infinity]", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
        ('{"topic":"t"}', "expected a JSON array"),
        ('["1","1","t","e"]', "expected 5 elements, got 4"),
        ('["1","1","t","e",{},6]', "expected 5 elements, got 6"),
        ('["1","1",5,"e",{}]', "invalid topic"),
        ('["1","1",null,"e",{}]', "invalid topic"),
        ('["1","1","t",["e"],{}]', "invalid event"),
        ('["1","1","t","e",[]]', "invalid payload"),
        ('["1","1","t","e","body"]', "invalid payload"),
        ('["1","1","t","e",null]', "invalid payload"),
        ('[true,"1","t","e",{}]', "invalid join_ref"),
        ('["1",1.5,"t","e",{}]', "invalid ref"),
        ('["1",{"x":1},"t","e",{}]', "invalid ref"),
    ],
)
def test_decode_v2_rejects(text: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_message(VSN_2, text)


@pytest.mark.parametrize(
    "text",
    [
        '["1","1","t","e",{"last_seen_id":' + "9" * 5000 + "}]",
        '["1",' + "1" * 4301 + ',"t","e",{}]',
    ],
)
def test_decode_too_many_digits_plain_reason(text: str) -> None:
    """Python's limit on integer digits is reported without its internals."""
    with pytest.raises(ProtocolError) as raised:
        decode_message(VSN_2, text)
    assert str(raised.value) == (
        "invalid JSON in Phoenix message: a number has too many digits"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('["1","1","t","e",{}]', "expected a JSON object"),
        ('{"event":"e","payload":{}}', "missing topic"),
        ('{"topic":"t","payload":{}}', "missing event"),
        ('{"topic":"t","event":"e"}', "missing payload"),
        ('{"topic":"t","event":"e","payload":"x"}', "invalid payload"),
        ('{"topic":1,"event":"e","payload":{}}', "invalid topic"),
        ('{"topic":"t","event":"e","payload":{},"ref":false}', "invalid ref"),
    ],
)
def test_decode_v1_rejects(text: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_message(VSN_1, text)


def test_encode_reply_v2() -> None:
    data = encode_reply(VSN_2, "1", "2", "channel:a", "ok", {"id": 9})
    assert isinstance(data, bytes)
    assert json.loads(data) == [
        "1",
        "2",
        "channel:a",
        "phx_reply",
        {"status": "ok", "response": {"id": 9}},
    ]


def test_encode_reply_v1() -> None:
    data = encode_reply(VSN_1, None, "2", "phoenix", "ok", {})
    assert json.loads(data) == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "2",
        "join_ref": None,
    }


def test_encode_push_broadcast_has_null_refs() -> None:
    data = encode_push(VSN_2, None, "channel:a", "new_msg", {"body": "hi"})
    assert json.loads(data) == [None, None, "channel:a", "new_msg", {"body": "hi"}]


def test_encode_push_v1() -> None:
    data = encode_push(VSN_1, "3", "channel:a", "phx_close", {})
    assert json.loads(data) == {
        "topic": "channel:a",
        "event": "phx_close",
        "payload": {},
        "ref": None,
        "join_ref": "3",
    }


def test_encode_keeps_unicode_as_utf8() -> None:
    data = encode_push(VSN_2, None, "t", "new_msg", {"body": "olá 👋"})
    assert "olá 👋".encode() in data
    assert b"\\u" not in data


def test_round_trip_v2() -> None:
    data = encode_push(VSN_2, "5", "channel:x", "custom", {"n": 1})
    message = decode_message(VSN_2, data.decode())
    assert message.join_ref == "5"
    assert message.ref is None
    assert message.payload == {"n": 1}
