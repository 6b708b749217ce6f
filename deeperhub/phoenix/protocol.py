"""Phoenix Channels messages: parsing and encoding, without I/O.

Two serializations exist, chosen per connection by the `vsn` query parameter of
the WebSocket URL:

- V2 (`vsn=2.0.0`, the default of phoenix.js 1.6 and later): a JSON array
  `[join_ref, ref, topic, event, payload]`.
- V1 (no `vsn`, or `vsn=1.0.0`): a JSON object
  `{"topic", "event", "payload", "ref", "join_ref"}` where `join_ref` may be
  missing.

Refs are opaque to the server and are echoed back unchanged. phoenix.js sends
them as strings, other clients may use integers, and both are accepted. Every
encoder returns UTF-8 JSON bytes that are ready to be wrapped in one WebSocket
text frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ProtocolError
from ..json_text import JSONParseError, parse_json

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "EVENT_CLOSE",
    "EVENT_ERROR",
    "EVENT_HEARTBEAT",
    "EVENT_JOIN",
    "EVENT_LEAVE",
    "EVENT_REPLY",
    "HEARTBEAT_TOPIC",
    "VSN_1",
    "VSN_2",
    "PhoenixMessage",
    "Ref",
    "decode_message",
    "encode_push",
    "encode_reply",
    "select_vsn",
]

VSN_1 = "1.0.0"
VSN_2 = "2.0.0"

EVENT_JOIN = "phx_join"
EVENT_LEAVE = "phx_leave"
EVENT_REPLY = "phx_reply"
EVENT_CLOSE = "phx_close"
EVENT_ERROR = "phx_error"
EVENT_HEARTBEAT = "heartbeat"
HEARTBEAT_TOPIC = "phoenix"

Ref = str | int | None


@dataclass(frozen=True, slots=True)
class PhoenixMessage:
    """One inbound Phoenix message, in the same shape for V1 and V2."""

    join_ref: Ref
    ref: Ref
    topic: str
    event: str
    payload: dict[str, Any]


def select_vsn(query: Mapping[str, list[str]]) -> str:
    """Return the serializer version requested by the `vsn` query parameter.

    A missing `vsn` selects V1, as the Phoenix server does. Any version other
    than 1.0.0 and 2.0.0 raises ProtocolError, and the caller rejects the
    upgrade with HTTP 400.
    """
    values = query.get("vsn")
    if not values:
        return VSN_1
    if len(set(values)) > 1:
        raise ProtocolError(f"conflicting vsn query parameters: {', '.join(values)}")
    vsn = values[0]
    if vsn not in (VSN_1, VSN_2):
        raise ProtocolError(
            f"unsupported vsn {vsn!r}: expected {VSN_2} (or {VSN_1} or none for V1)"
        )
    return vsn


def _parse_json(text: str) -> Any:
    try:
        return parse_json(text)
    except JSONParseError as exc:
        raise ProtocolError(f"invalid JSON in Phoenix message: {exc}") from None


def _type_error(name: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(
        f"invalid {name} in Phoenix message: expected {expected}, "
        f"got {type(value).__name__}"
    )


def _check_ref(value: Any, name: str) -> Ref:
    if value is None or isinstance(value, str):
        return value
    # bool is a subclass of int, and true or false is not a valid ref.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _type_error(name, "a string, an integer or null", value)


def _build(
    join_ref: Any, ref: Any, topic: Any, event: Any, payload: Any
) -> PhoenixMessage:
    if not isinstance(topic, str):
        raise _type_error("topic", "a string", topic)
    if not isinstance(event, str):
        raise _type_error("event", "a string", event)
    if not isinstance(payload, dict):
        raise _type_error("payload", "an object", payload)
    return PhoenixMessage(
        join_ref=_check_ref(join_ref, "join_ref"),
        ref=_check_ref(ref, "ref"),
        topic=topic,
        event=event,
        payload=payload,
    )


def decode_message(vsn: str, text: str) -> PhoenixMessage:
    """Parse the text of one WebSocket message, or raise ProtocolError saying why."""
    document = _parse_json(text)

    if vsn == VSN_2:
        if not isinstance(document, list):
            raise ProtocolError(
                "invalid Phoenix V2 message: expected a JSON array "
                f"[join_ref, ref, topic, event, payload], got {type(document).__name__}"
            )
        if len(document) != 5:
            raise ProtocolError(
                f"invalid Phoenix V2 message: expected 5 elements, got {len(document)}"
            )
        return _build(*document)

    if not isinstance(document, dict):
        raise ProtocolError(
            "invalid Phoenix V1 message: expected a JSON object with topic, event, "
            f"payload and ref, got {type(document).__name__}"
        )
    missing = [key for key in ("topic", "event", "payload") if key not in document]
    if missing:
        raise ProtocolError(f"invalid Phoenix V1 message: missing {', '.join(missing)}")
    return _build(
        document.get("join_ref"),
        document.get("ref"),
        document["topic"],
        document["event"],
        document["payload"],
    )


def _dump(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def encode_push(
    vsn: str, join_ref: Ref, topic: str, event: str, payload: Mapping[str, Any]
) -> bytes:
    """Encode a server push with a null `ref`. Broadcasts also pass `join_ref=None`."""
    if vsn == VSN_2:
        return _dump([join_ref, None, topic, event, payload])
    return _dump(
        {
            "topic": topic,
            "event": event,
            "payload": payload,
            "ref": None,
            "join_ref": join_ref,
        }
    )


def encode_reply(
    vsn: str,
    join_ref: Ref,
    ref: Ref,
    topic: str,
    status: str,
    response: Mapping[str, Any],
) -> bytes:
    """Encode the `phx_reply` to the message with `ref`; `status` is `ok` or `error`."""
    payload = {"status": status, "response": response}
    if vsn == VSN_2:
        return _dump([join_ref, ref, topic, EVENT_REPLY, payload])
    return _dump(
        {
            "topic": topic,
            "event": EVENT_REPLY,
            "payload": payload,
            "ref": ref,
            "join_ref": join_ref,
        }
    )
