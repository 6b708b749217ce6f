"""RFC 6455 conformance of the real daemon: raw frames in, close codes out.

One daemon serves the whole module. Each case opens a raw WebSocket, sends
frames that break one rule of RFC 6455 (or of DeeperHub's documented limits)
and checks the Close frame the server sends back, that TCP is closed after it,
and that `deeperhub_ws_protocol_errors_total{code}` counted it.
"""

from __future__ import annotations

import re
import struct
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from .daemon import Daemon
from .wsraw import RawWebSocket, register

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# Limits of the module's daemon, small so that the cases stay fast.
MAX_FRAME_SIZE = 65536
MAX_FRAGMENTS = 64

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    root = tmp_path_factory.mktemp("conformance")
    config = root / "deeperhub.toml"
    config.write_text(
        "[websocket]\n"
        f"max_frame_size = {MAX_FRAME_SIZE}\n"
        f"max_fragments = {MAX_FRAGMENTS}\n"
    )
    daemon = Daemon(root / "var", env={"DEEPERHUB_CONFIG_FILE": str(config)})
    daemon.start()
    try:
        user = register(daemon.base_url, "conformer")
        yield daemon, user["access_token"]
    finally:
        daemon.stop()


def protocol_errors(daemon: Daemon, code: int) -> float:
    text = httpx.get(daemon.base_url + "/metrics", timeout=10).text
    pattern = rf'^deeperhub_ws_protocol_errors_total\{{code="{code}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def fragmented_invalid_utf8(ws: RawWebSocket) -> None:
    # "é" is C3 A9; the second fragment continues with a byte that is no
    # continuation byte.
    ws.send_frame(TEXT, b"ok \xc3", fin=False)
    ws.send_frame(CONTINUATION, b"\x28 rest")


def truncated_utf8_at_end(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b"abc", fin=False)
    ws.send_frame(CONTINUATION, b"\xe2\x82")


def oversized_fragments(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b"a" * (MAX_FRAME_SIZE - 10), fin=False)
    ws.send_frame(CONTINUATION, declared_length=100, fin=True)


def fragment_flood(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b"[", fin=False)
    for _ in range(MAX_FRAGMENTS + 1):
        ws.send_frame(CONTINUATION, b"", fin=False)


def data_frame_inside_fragmented_message(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b"one", fin=False)
    ws.send_frame(TEXT, b"two")


def frame_header_only(opcode: int, length: int) -> Callable[[RawWebSocket], None]:
    def send(ws: RawWebSocket) -> None:
        ws.send_frame(opcode, declared_length=length)

    return send


def single(
    opcode: int, payload: bytes = b"", **options: object
) -> Callable[[RawWebSocket], None]:
    def send(ws: RawWebSocket) -> None:
        ws.send_frame(opcode, payload, **options)  # type: ignore[arg-type]

    return send


def high_bit_length(ws: RawWebSocket) -> None:
    ws.sock.sendall(bytes((0x81, 0xFF)) + struct.pack("!Q", 1 << 63) + b"\0" * 4)


VIOLATIONS: dict[str, tuple[Callable[[RawWebSocket], None], int]] = {
    "invalid_utf8_text": (single(TEXT, b"\xc3\x28"), 1007),
    "invalid_utf8_fragments": (fragmented_invalid_utf8, 1007),
    "truncated_utf8_final_fragment": (truncated_utf8_at_end, 1007),
    "invalid_utf8_close_reason": (single(CLOSE, close_payload(1000, b"\xff")), 1007),
    "close_payload_one_byte": (single(CLOSE, b"\x03"), 1002),
    "close_code_999": (single(CLOSE, close_payload(999)), 1002),
    "close_code_1004_reserved": (single(CLOSE, close_payload(1004)), 1002),
    "close_code_1005_local_only": (single(CLOSE, close_payload(1005)), 1002),
    "close_code_1006_local_only": (single(CLOSE, close_payload(1006)), 1002),
    "close_code_1015_local_only": (single(CLOSE, close_payload(1015)), 1002),
    "close_code_1016_unassigned": (single(CLOSE, close_payload(1016)), 1002),
    "close_code_2999_unassigned": (single(CLOSE, close_payload(2999)), 1002),
    "close_code_5000": (single(CLOSE, close_payload(5000)), 1002),
    "ping_payload_126_bytes": (single(PING, b"p" * 126), 1002),
    "close_payload_126_bytes": (single(CLOSE, close_payload(1000, b"r" * 124)), 1002),
    "fragmented_ping": (single(PING, b"x", fin=False), 1002),
    "fragmented_close": (single(CLOSE, close_payload(1000), fin=False), 1002),
    "fragmented_pong": (single(PONG, b"x", fin=False), 1002),
    "reserved_opcode_3": (single(0x3, b"x"), 1002),
    "reserved_opcode_7": (single(0x7, b"x"), 1002),
    "reserved_opcode_11": (single(0xB, b"x"), 1002),
    "reserved_opcode_15": (single(0xF, b"x"), 1002),
    "rsv1_set": (single(TEXT, b"x", rsv=4), 1002),
    "rsv2_set": (single(TEXT, b"x", rsv=2), 1002),
    "rsv3_set": (single(PING, b"x", rsv=1), 1002),
    "unmasked_text": (single(TEXT, b"hi", mask=False), 1002),
    "unmasked_close": (single(CLOSE, close_payload(1000), mask=False), 1002),
    "continuation_without_message": (single(CONTINUATION, b"x"), 1002),
    "data_frame_inside_fragmented_message": (
        data_frame_inside_fragmented_message,
        1002,
    ),
    "length_high_bit_set": (high_bit_length, 1002),
    "frame_over_max_frame_size": (frame_header_only(TEXT, MAX_FRAME_SIZE + 1), 1009),
    "fragments_over_max_frame_size": (oversized_fragments, 1009),
    "fragment_flood": (fragment_flood, 1009),
    "binary_message": (single(BINARY, b"\x00\x01"), 1003),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_violation_close_code(server: tuple[Daemon, str], case: str) -> None:
    daemon, token = server
    send, expected = VIOLATIONS[case]
    before = protocol_errors(daemon, expected)
    ws = RawWebSocket(daemon.port, token)
    try:
        assert ws.status == 101, ws.response_head
        send(ws)
        code, _ = ws.expect_close()
        assert code == expected
        # Complete the close handshake as a client should. After a framing
        # violation the server has already closed TCP (RFC 6455 section 7.1.7).
        try:
            ws.send_close(code)
        except OSError:
            pass
        assert ws.wait_tcp_close(), "TCP stays open after the Close frame"
    finally:
        ws.close()
    # Metrics of all acceptors are merged from files the scrape reads.
    deadline = time.monotonic() + 5
    while protocol_errors(daemon, expected) < before + 1:
        assert time.monotonic() < deadline, f"{case} was not counted"
        time.sleep(0.05)


def test_header_of_64_mib_closes_at_once(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token)
    try:
        start = time.monotonic()
        # Only the header and the mask: no payload byte is ever sent.
        ws.send_frame(TEXT, declared_length=64 * 1024 * 1024)
        code, reason = ws.expect_close(timeout=2)
        assert code == 1009
        assert "exceeds" in reason
        assert time.monotonic() - start < 2
    finally:
        ws.close()


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4000, 4999])
def test_valid_close_code_is_echoed(server: tuple[Daemon, str], code: int) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token)
    try:
        ws.send_close(code, b"bye")
        assert ws.expect_close() == (code, "")
        assert ws.wait_tcp_close()
    finally:
        ws.close()


def test_empty_close_gets_empty_close(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token)
    try:
        ws.send_close()
        opcode, payload = ws.recv_frame()
        assert opcode == CLOSE
        assert payload == b""
    finally:
        ws.close()


def test_ping_gets_pong_with_payload(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token)
    try:
        ws.send_frame(PING, b"x" * 125)
        assert ws.recv_frame() == (PONG, b"x" * 125)
    finally:
        ws.close()


def test_control_frames_between_fragments(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token)
    try:
        ws.send_frame(TEXT, b'["1","1","phoenix",', fin=False)
        ws.send_frame(PING, b"mid")
        ws.send_frame(PONG, b"unsolicited")
        ws.send_frame(CONTINUATION, b'"heartbeat",{}]')
        assert ws.recv_frame() == (PONG, b"mid")
        opcode, payload = ws.recv_frame()
        assert opcode == TEXT
        assert b'"phx_reply"' in payload
        assert b'"ok"' in payload
    finally:
        ws.close()


def test_server_never_sends_local_only_codes(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    # An abrupt TCP close by the client must not produce a Close frame with 1006.
    ws = RawWebSocket(daemon.port, token)
    ws.send_frame(TEXT, b'["1","1","phoenix","heartbeat",{}]')
    ws.recv_frame()
    ws.close()
    # Every close the cases above received was checked for its exact code;
    # this checks the daemon log for the codes that must never be sent.
    log = (daemon.var_dir / "log" / "deeper_hub.log").read_text()
    assert not re.search(r"closing connection with 10(05|06|15)\b", log)


def test_violation_logged_once_without_traceback(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token)
    try:
        # A code no other case uses, so the record is easy to count.
        ws.send_close(2345)
        assert ws.expect_close()[0] == 1002
        # Frames after the violation must not produce more records.
        ws.send_frame(TEXT, b"\xc3\x28")
    except OSError:
        pass  # the server may have closed TCP already
    finally:
        ws.close()
    log_file = daemon.var_dir / "log" / "deeper_hub.log"
    needle = "close code 2345 is not allowed"
    deadline = time.monotonic() + 5
    while needle not in log_file.read_text():
        assert time.monotonic() < deadline, "the violation was not logged"
        time.sleep(0.05)
    time.sleep(0.2)
    log = log_file.read_text()
    assert log.count(needle) == 1
    assert "Traceback" not in log


def test_unknown_vsn_is_rejected_before_upgrade(server: tuple[Daemon, str]) -> None:
    daemon, token = server
    ws = RawWebSocket(daemon.port, token, vsn="9.9.9")
    try:
        assert ws.status == 400
    finally:
        ws.close()
