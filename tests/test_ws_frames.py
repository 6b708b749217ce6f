"""Tests of the RFC 6455 frame parser and encoder in deeperhub.ws.frames."""

from __future__ import annotations

import random
import struct
from typing import TYPE_CHECKING

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame
from websockets.frames import Opcode as WebsocketsOpcode
from websockets.protocol import State
from websockets.uri import parse_uri

from deeperhub.ws.frames import (
    BinaryMessage,
    CloseCode,
    CloseReceived,
    FrameParser,
    Opcode,
    Ping,
    Pong,
    ProtocolViolation,
    TextMessage,
    encode_binary,
    encode_close,
    encode_frame,
    encode_ping,
    encode_pong,
    encode_text,
)

if TYPE_CHECKING:
    from deeperhub.ws.frames import Event

MASK = b"\x37\xfa\x21\x3d"
MIB = 1 << 20


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length_size: int | None = None,
) -> bytes:
    """Build a frame as a client sends it, masked with a per-byte XOR.

    `length_size` forces 0 (7-bit), 2 or 8 extra length bytes. `mask=None`
    builds an unmasked frame.
    """
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0 if mask is None else 0x80
    length = len(payload)
    if length_size is None and length < 126:
        length_size = 0
    elif length_size is None and length < 0x10000:
        length_size = 2
    elif length_size is None:
        length_size = 8
    if length_size == 0:
        header = bytes((first, mask_bit | length))
    elif length_size == 2:
        header = bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")
    if mask is None:
        return header + payload
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return header + mask + masked


def text(payload: bytes | str, *, fin: bool = True) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return client_frame(Opcode.TEXT, data, fin=fin)


def binary(payload: bytes, *, fin: bool = True) -> bytes:
    return client_frame(Opcode.BINARY, payload, fin=fin)


def continuation(payload: bytes | str, *, fin: bool = True) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return client_frame(Opcode.CONTINUATION, data, fin=fin)


def close(code: int, reason: bytes = b"") -> bytes:
    return client_frame(Opcode.CLOSE, struct.pack("!H", code) + reason)


def make_parser(limits: dict[str, int]) -> FrameParser:
    """Return a parser with a 1 MiB message limit unless `limits` sets another."""
    return FrameParser(
        max_message_size=limits.get("max_message_size", MIB),
        max_fragments=limits.get("max_fragments", 1024),
    )


def parse(data: bytes, **limits: int) -> list[Event]:
    return make_parser(limits).feed(data)


def parse_server_frame(frame: bytes) -> tuple[int, bool, bytes]:
    """Return opcode, FIN and payload of one unmasked server frame."""
    assert frame[1] & 0x80 == 0, "server frames must not be masked"
    length = frame[1] & 0x7F
    offset = 2
    if length == 126:
        length = int.from_bytes(frame[2:4], "big")
        offset = 4
    elif length == 127:
        length = int.from_bytes(frame[2:10], "big")
        offset = 10
    assert len(frame) == offset + length
    return frame[0] & 0x0F, frame[0] & 0x80 != 0, frame[offset:]


# Each case: frames sent by the client, parser limits, expected close code.
VIOLATIONS: list[tuple[str, bytes, dict[str, int], int]] = [
    ("unmasked", client_frame(Opcode.TEXT, b"hi", mask=None), {}, 1002),
    ("rsv1", client_frame(Opcode.TEXT, b"hi", rsv=4), {}, 1002),
    ("rsv2", client_frame(Opcode.TEXT, b"hi", rsv=2), {}, 1002),
    ("rsv3", client_frame(Opcode.TEXT, b"hi", rsv=1), {}, 1002),
    *[
        (f"reserved opcode {opcode}", client_frame(opcode, b"x"), {}, 1002)
        for opcode in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
    ],
    ("ping over 125", client_frame(Opcode.PING, b"p" * 126), {}, 1002),
    ("pong over 125", client_frame(Opcode.PONG, b"p" * 126), {}, 1002),
    ("close over 125", close(1000, b"r" * 124), {}, 1002),
    ("ping fragmented", client_frame(Opcode.PING, b"p", fin=False), {}, 1002),
    ("pong fragmented", client_frame(Opcode.PONG, b"p", fin=False), {}, 1002),
    ("close fragmented", client_frame(Opcode.CLOSE, b"", fin=False), {}, 1002),
    ("continuation first", continuation("x"), {}, 1002),
    ("text during message", text("a", fin=False) + text("b"), {}, 1002),
    ("binary during message", text("a", fin=False) + binary(b"b"), {}, 1002),
    (
        "64-bit length high bit",
        bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + MASK,
        {"max_message_size": 2**64},
        1002,
    ),
    ("invalid utf-8", text(b"\xff"), {}, 1007),
    ("truncated utf-8", text(b"ok\xe2\x82"), {}, 1007),
    ("utf-8 surrogate", text(b"\xed\xa0\x80"), {}, 1007),
    ("overlong utf-8", text(b"\xc0\xaf"), {}, 1007),
    ("utf-8 beyond U+10FFFF", text(b"\xf4\x90\x80\x80"), {}, 1007),
    (
        "truncated utf-8 at message end",
        text(b"ok\xe2\x82", fin=False) + continuation(b""),
        {},
        1007,
    ),
    (
        "invalid utf-8 in last fragment",
        text("ok", fin=False) + continuation(b"\xff"),
        {},
        1007,
    ),
    ("close reason invalid utf-8", close(1000, b"\xff"), {}, 1007),
    ("close payload of 1 byte", client_frame(Opcode.CLOSE, b"\x03"), {}, 1002),
    *[
        (f"close code {code}", close(code), {}, 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999)
        + (5000, 65535)
    ],
    ("frame over limit", binary(b"b" * 101), {"max_message_size": 100}, 1009),
    ("text over limit", text("t" * 101), {"max_message_size": 100}, 1009),
    (
        "fragments over limit",
        binary(b"b" * 60, fin=False) + continuation(b"b" * 41),
        {"max_message_size": 100},
        1009,
    ),
    (
        "too many fragments",
        text("a", fin=False) + continuation("b", fin=False) + continuation("c"),
        {"max_fragments": 2},
        1009,
    ),
    (
        "empty fragments over count",
        binary(b"", fin=False) + continuation(b"", fin=False) * 3 + continuation(b""),
        {"max_fragments": 4},
        1009,
    ),
]


@pytest.mark.parametrize(
    ("data", "limits", "code"),
    [
        pytest.param(data, limits, code, id=name)
        for name, data, limits, code in VIOLATIONS
    ],
)
def test_parser_violation(data: bytes, limits: dict[str, int], code: int) -> None:
    events = parse(data, **limits)
    assert len(events) == 1
    violation = events[0]
    assert isinstance(violation, ProtocolViolation)
    assert violation.code == code
    assert violation.reason
    # The reason must fit a Close frame without truncation.
    assert len(violation.reason.encode()) <= 123


@pytest.mark.parametrize(
    ("data", "limits", "code"),
    [
        pytest.param(data, limits, code, id=name)
        for name, data, limits, code in VIOLATIONS
    ],
)
def test_parser_violation_byte_by_byte(
    data: bytes, limits: dict[str, int], code: int
) -> None:
    parser = make_parser(limits)
    events: list[Event] = []
    for index in range(len(data)):
        events += parser.feed(data[index : index + 1])
    assert len(events) == 1
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].code == code


def test_declared_64_mib_frame_rejected_from_header() -> None:
    header = bytes((0x82, 0xFF)) + (64 * MIB).to_bytes(8, "big")
    parser = FrameParser(max_message_size=MIB)

    # 10 bytes: first two bytes and the 64-bit length, not even the mask key.
    events = parser.feed(header)

    assert len(events) == 1
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].code == CloseCode.MESSAGE_TOO_BIG


def test_declared_64_mib_frame_rejected_in_pieces() -> None:
    header = bytes((0x82, 0xFF)) + (64 * MIB).to_bytes(8, "big") + MASK
    parser = FrameParser(max_message_size=MIB)

    before = [parser.feed(header[index : index + 1]) for index in range(9)]
    last = parser.feed(header[9:10])

    assert before == [[]] * 9
    assert [type(event) for event in last] == [ProtocolViolation]
    assert parser.feed(header[10:] + b"\0" * 1000) == []


def test_continuation_over_limit_rejected_from_header() -> None:
    parser = FrameParser(max_message_size=1000)
    assert parser.feed(binary(b"b" * 600, fin=False)) == []

    # Header of a 401-byte continuation, with no payload yet.
    events = parser.feed(bytes((0x80, 0x80 | 126)) + (401).to_bytes(2, "big") + MASK)

    assert len(events) == 1
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].code == 1009


def test_message_at_limit_accepted() -> None:
    events = parse(
        binary(b"a" * 60, fin=False) + continuation(b"b" * 40), max_message_size=100
    )
    assert events == [BinaryMessage(b"a" * 60 + b"b" * 40)]


def test_fragments_at_limit_accepted() -> None:
    events = parse(
        text("a", fin=False) + continuation("b", fin=False) + continuation("c"),
        max_fragments=3,
    )
    assert events == [TextMessage("abc")]


def test_control_frames_ignore_message_limit() -> None:
    events = parse(client_frame(Opcode.PING, b"p" * 125), max_message_size=10)
    assert events == [Ping(b"p" * 125)]


def test_invalid_utf8_fails_at_first_fragment() -> None:
    parser = FrameParser(max_message_size=MIB)

    events = parser.feed(text(b"fine \xff", fin=False))

    assert len(events) == 1
    assert isinstance(events[0], ProtocolViolation)
    assert events[0].code == CloseCode.INVALID_PAYLOAD


def test_utf8_split_across_fragments() -> None:
    euro = "€".encode()
    data = (
        text(euro[:1], fin=False)
        + continuation(euro[1:2], fin=False)
        + continuation(euro[2:] + "😀".encode()[:2], fin=False)
        + continuation("😀".encode()[2:])
    )
    assert parse(data) == [TextMessage("€😀")]


@pytest.mark.parametrize(
    "code",
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
    + [3000, 3999, 4000, 4999],
)
def test_close_code_accepted(code: int) -> None:
    assert parse(close(code, "bye ✓".encode())) == [CloseReceived(code, "bye ✓")]


def test_close_without_payload() -> None:
    assert parse(client_frame(Opcode.CLOSE)) == [CloseReceived(None, "")]


def test_close_with_code_only() -> None:
    assert parse(close(1001)) == [CloseReceived(1001, "")]


def test_close_reason_of_123_bytes() -> None:
    reason = "r" * 123
    assert parse(close(1000, reason.encode())) == [CloseReceived(1000, reason)]


def test_ping_and_pong_payloads() -> None:
    data = client_frame(Opcode.PING, b"") + client_frame(Opcode.PONG, b"\x00\xff")
    assert parse(data) == [Ping(b""), Pong(b"\x00\xff")]


def test_control_frames_inside_fragmented_message() -> None:
    data = (
        text("Hel", fin=False)
        + client_frame(Opcode.PING, b"1")
        + continuation("lo, ", fin=False)
        + client_frame(Opcode.PONG, b"2")
        + client_frame(Opcode.PING, b"3")
        + continuation("world")
        + text("next")
    )
    assert parse(data) == [
        Ping(b"1"),
        Pong(b"2"),
        Ping(b"3"),
        TextMessage("Hello, world"),
        TextMessage("next"),
    ]


def test_binary_message_in_fragments() -> None:
    data = (
        binary(b"\x00\x01", fin=False)
        + continuation(b"", fin=False)
        + continuation(b"\x02", fin=False)
        + continuation(b"\xff")
    )
    assert parse(data) == [BinaryMessage(b"\x00\x01\x02\xff")]


def test_empty_fragments_make_empty_text() -> None:
    data = text(b"", fin=False) + continuation(b"", fin=False) + continuation(b"")
    assert parse(data) == [TextMessage("")]


def test_empty_messages() -> None:
    assert parse(text(b"") + binary(b"")) == [TextMessage(""), BinaryMessage(b"")]


def test_close_inside_fragmented_message() -> None:
    parser = FrameParser(max_message_size=MIB)
    data = text("unfinished", fin=False) + close(1000, b"bye") + continuation("x")

    assert parser.feed(data) == [CloseReceived(1000, "bye")]
    assert parser.feed(text("later")) == []


def test_input_after_close_ignored() -> None:
    parser = FrameParser(max_message_size=MIB)

    assert parser.feed(text("a") + close(1000) + text("b")) == [
        TextMessage("a"),
        CloseReceived(1000, ""),
    ]
    assert parser.feed(text("c")) == []


def test_input_after_violation_ignored() -> None:
    parser = FrameParser(max_message_size=MIB)

    events = parser.feed(text("a") + continuation("x") + text("b"))

    assert events[0] == TextMessage("a")
    assert isinstance(events[1], ProtocolViolation)
    assert len(events) == 2
    assert parser.feed(text("c")) == []


def test_events_in_order_across_feeds() -> None:
    parser = FrameParser(max_message_size=MIB)
    first = text("one") + text("two")[:3]
    second = text("two")[3:] + binary(b"three")

    assert parser.feed(first) == [TextMessage("one")]
    assert parser.feed(second) == [TextMessage("two"), BinaryMessage(b"three")]
    assert parser.feed(b"") == []


@pytest.mark.parametrize(
    "size", [0, 1, 125, 126, 127, 1023, 1024, 1025, 65535, 65536, 100_003]
)
def test_payload_length_encodings(size: int) -> None:
    payload = bytes(index % 251 for index in range(size))
    assert parse(binary(payload)) == [BinaryMessage(payload)]
    assert parse(text(b"x" * size)) == [TextMessage("x" * size)]


@pytest.mark.parametrize(("size", "length_size"), [(5, 2), (5, 8), (200, 8)])
def test_non_minimal_length_accepted(size: int, length_size: int) -> None:
    payload = b"z" * size
    data = client_frame(Opcode.BINARY, payload, length_size=length_size)
    assert parse(data) == [BinaryMessage(payload)]


def sample_stream() -> tuple[bytes, list[Event]]:
    """Return frames of every kind with 7-bit and 16-bit lengths, and their events."""
    data = (
        text("héllo")
        + text("frag", fin=False)
        + client_frame(Opcode.PING, b"ping")
        + continuation("mént", fin=False)
        + continuation("ed")
        + binary(b"\x01" * 200)
        + client_frame(Opcode.PONG, b"")
        + text(b"")
        + close(1000, b"done")
    )
    events: list[Event] = [
        TextMessage("héllo"),
        Ping(b"ping"),
        TextMessage("fragménted"),
        BinaryMessage(b"\x01" * 200),
        Pong(b""),
        TextMessage(""),
        CloseReceived(1000, "done"),
    ]
    return data, events


def test_split_at_every_byte() -> None:
    data, expected = sample_stream()
    for split in range(len(data) + 1):
        parser = FrameParser(max_message_size=MIB)
        events = parser.feed(data[:split]) + parser.feed(data[split:])
        assert events == expected, f"split at byte {split}"


def test_fed_one_byte_at_a_time() -> None:
    data, expected = sample_stream()
    parser = FrameParser(max_message_size=MIB)
    events: list[Event] = []
    for index in range(len(data)):
        events += parser.feed(data[index : index + 1])
    assert events == expected


def test_split_around_64_bit_length_frame() -> None:
    large = bytes(range(256)) * 300
    before = text("a")
    data = before + binary(large) + text("b")
    expected = [TextMessage("a"), BinaryMessage(large), TextMessage("b")]
    frame_end = len(data) - len(text("b"))
    # Every byte of the 14-byte header and of the frame boundaries, and every
    # 997th byte inside the payload.
    splits = sorted(
        {*range(len(before) + 20), *range(len(before), frame_end, 997)}
        | {*range(frame_end - 5, len(data) + 1)}
    )
    for split in splits:
        parser = FrameParser(max_message_size=MIB)
        events = parser.feed(data[:split]) + parser.feed(data[split:])
        assert events == expected, f"split at byte {split}"


def random_messages(rng: random.Random, count: int) -> tuple[list[bytes], list[Event]]:
    """Return random valid client frames and the events they must produce."""
    frames: list[bytes] = []
    events: list[Event] = []
    for _ in range(count):
        size = rng.choice([0, 1, 7, 125, 126, 300, 65535, 65536, 70_000])
        is_text = rng.random() < 0.5
        message: Event
        if is_text:
            characters = "".join(rng.choice("aé€😀 ") for _ in range(size // 3))
            message = TextMessage(characters)
            payload = characters.encode()
        else:
            payload = rng.randbytes(size)
            message = BinaryMessage(payload)
        pieces = rng.randint(1, 4)
        cuts = sorted(rng.randint(0, len(payload)) for _ in range(pieces - 1))
        bounds = [0, *cuts, len(payload)]
        for index in range(pieces):
            if index > 0:
                opcode = Opcode.CONTINUATION
            elif is_text:
                opcode = Opcode.TEXT
            else:
                opcode = Opcode.BINARY
            chunk = payload[bounds[index] : bounds[index + 1]]
            mask = rng.randbytes(4)
            fin = index == pieces - 1
            frames.append(client_frame(opcode, chunk, fin=fin, mask=mask))
            # A ping between two fragments arrives before the message completes.
            if not fin and rng.random() < 0.3:
                ping = rng.randbytes(rng.randint(0, 125))
                frames.append(client_frame(Opcode.PING, ping, mask=mask))
                events.append(Ping(ping))
        events.append(message)
    return frames, events


@pytest.mark.parametrize("seed", range(8))
def test_random_frames_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    frames, expected = random_messages(rng, 30)
    data = b"".join(frames)
    parser = FrameParser(max_message_size=MIB)

    events: list[Event] = []
    offset = 0
    while offset < len(data):
        step = rng.choice([1, 2, 5, 64, 1000, 70_000])
        events += parser.feed(data[offset : offset + step])
        offset += step

    assert events == expected


@pytest.mark.parametrize(
    ("size", "header_size"),
    [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (100_000, 10)],
)
def test_encode_frame_length_encodings(size: int, header_size: int) -> None:
    payload = b"p" * size
    frame = encode_frame(Opcode.BINARY, payload)
    assert len(frame) == header_size + size
    assert parse_server_frame(frame) == (Opcode.BINARY, True, payload)


def test_encode_frame_not_final() -> None:
    frame = encode_frame(Opcode.TEXT, b"part", fin=False)
    assert parse_server_frame(frame) == (Opcode.TEXT, False, b"part")


def test_encode_text_from_str_and_bytes() -> None:
    assert encode_text("héllo") == encode_text("héllo".encode())
    assert parse_server_frame(encode_text("héllo")) == (
        Opcode.TEXT,
        True,
        "héllo".encode(),
    )


def test_encode_control_frames() -> None:
    assert parse_server_frame(encode_ping(b"p")) == (Opcode.PING, True, b"p")
    assert parse_server_frame(encode_pong(b"q" * 125)) == (
        Opcode.PONG,
        True,
        b"q" * 125,
    )
    assert parse_server_frame(encode_binary(b"\x00")) == (Opcode.BINARY, True, b"\x00")


def test_encode_close_payload() -> None:
    frame = encode_close(CloseCode.POLICY_VIOLATION, "no ✓")
    assert parse_server_frame(frame) == (
        Opcode.CLOSE,
        True,
        b"\x03\xf0" + "no ✓".encode(),
    )


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("r" * 123, "r" * 123),
        ("r" * 124, "r" * 123),
        ("é" * 100, "é" * 61),
        ("a" + "€" * 50, "a" + "€" * 40),
        ("ab" + "😀" * 40, "ab" + "😀" * 30),
    ],
)
def test_encode_close_truncates_reason(reason: str, kept: str) -> None:
    _, _, payload = parse_server_frame(encode_close(1000, reason))
    assert len(payload) <= 125
    assert payload[2:].decode() == kept


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65536]
)
def test_encode_close_rejects_code(code: int) -> None:
    with pytest.raises(ValueError, match=str(code)):
        encode_close(code)


def test_encode_rejects_invalid_control_frames() -> None:
    with pytest.raises(ValueError, match="125"):
        encode_pong(b"x" * 126)
    with pytest.raises(ValueError, match="final"):
        encode_frame(Opcode.PING, b"", fin=False)
    with pytest.raises(ValueError, match="opcode"):
        encode_frame(3, b"")  # type: ignore[arg-type]


def test_encoded_close_parses_back() -> None:
    _, _, payload = parse_server_frame(encode_close(4000, "custom"))
    assert parse(client_frame(Opcode.CLOSE, payload)) == [CloseReceived(4000, "custom")]


def open_websockets_client() -> ClientProtocol:
    """Return the sans-I/O client of the websockets library, past the handshake."""
    return ClientProtocol(
        parse_uri("ws://127.0.0.1/socket/websocket"), state=State.OPEN
    )


def test_websockets_client_frames_parse() -> None:
    client = open_websockets_client()
    client.send_text("héllo".encode())
    client.send_binary(b"\x00" * 70_000)
    client.send_text(b"fr", fin=False)
    client.send_ping(b"beat")
    client.send_continuation(b"ag", fin=True)
    client.send_close(1000, "bye")
    data = b"".join(client.data_to_send())

    events = FrameParser(max_message_size=MIB).feed(data)

    assert events == [
        TextMessage("héllo"),
        BinaryMessage(b"\x00" * 70_000),
        Ping(b"beat"),
        TextMessage("frag"),
        CloseReceived(1000, "bye"),
    ]


def test_websockets_client_reads_server_frames() -> None:
    client = open_websockets_client()
    client.receive_data(
        encode_text("héllo")
        + encode_frame(Opcode.BINARY, b"\x01" * 70_000)
        + encode_ping(b"beat")
        + encode_close(CloseCode.GOING_AWAY, "restart")
    )

    frames = client.events_received()

    assert frames == [
        Frame(WebsocketsOpcode.TEXT, "héllo".encode()),
        Frame(WebsocketsOpcode.BINARY, b"\x01" * 70_000),
        Frame(WebsocketsOpcode.PING, b"beat"),
        Frame(WebsocketsOpcode.CLOSE, b"\x03\xe9restart"),
    ]
    assert client.close_rcvd == Close(1001, "restart")


def test_parser_rejects_invalid_limits() -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        FrameParser(max_message_size=-1)
    with pytest.raises(ValueError, match="max_fragments"):
        FrameParser(max_message_size=1, max_fragments=0)
