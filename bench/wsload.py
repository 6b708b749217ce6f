"""A fast WebSocket load generator on raw non-blocking sockets, for the benchmarks.

One process drives every client with `selectors` (epoll): no asyncio, no
per-frame objects. Deliveries are counted by scanning each received chunk for
the message body marker with a compiled regex, so the client side costs far
less CPU per frame than a WebSocket library would. Client frames use the mask
key 0, which RFC 6455 permits and which leaves the payload as it is.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import resource
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BODY_SIZE",
    "Client",
    "Result",
    "session_cpu",
    "open_clients",
    "raise_file_limit",
    "run_fanout",
]

BODY_SIZE = 64
# A body is an 8-digit message number followed by padding to BODY_SIZE bytes.
_BODY = re.compile(rb'"body":"(\d{8})')
_BODY_TAIL = len(b'"body":"') + 8 - 1
_REPLY = re.compile(rb'\[(?:null|"[^"]*"),"(\d+)","[^"]*","phx_reply"')
# Longest prefix of a reply that a read can cut off: join ref, ref and topic.
_REPLY_TAIL = 128


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def frame(text: str | bytes) -> bytes:
    """Return a masked client text frame (mask key 0)."""
    payload = text.encode() if isinstance(text, str) else text
    length = len(payload)
    if length < 126:
        header = bytes((0x81, 0x80 | length))
    elif length < 0x10000:
        header = bytes((0x81, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x81, 0x80 | 127)) + length.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


def phoenix(
    join_ref: str | None, ref: str, topic: str, event: str, payload: Any
) -> bytes:
    return frame(
        json.dumps([join_ref, ref, topic, event, payload], separators=(",", ":"))
    )


@dataclass(eq=False)
class Client:
    """One connected WebSocket client."""

    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)
    deliveries: int = 0


def _request(host: str, port: int, query: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /socket/websocket?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def open_clients(
    host: str,
    port: int,
    query: str,
    count: int,
    *,
    sources: int = 1,
    in_flight: int = 200,
    timeout: float = 120.0,
) -> list[Client]:
    """Open `count` WebSocket connections, `in_flight` handshakes at a time.

    Connections come from 127.0.0.1 .. 127.0.0.`sources`, so that more than
    one source address shares the ephemeral ports. Raises RuntimeError if a
    handshake gets a status other than 101.
    """
    selector = selectors.DefaultSelector()
    done: list[Client] = []
    started = 0
    pending = 0
    deadline = time.monotonic() + timeout
    request = _request(host, port, query)
    while len(done) < count:
        while started < count and pending < in_flight:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sources > 1:
                sock.bind((f"127.0.0.{1 + started % sources}", 0))
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                raise RuntimeError(f"connect failed: {os.strerror(code)}")
            selector.register(sock, selectors.EVENT_WRITE, [Client(sock), False])
            started += 1
            pending += 1
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)} of {count} connections opened")
        for key, _ in selector.select(1.0):
            client, sent = key.data
            sock = client.sock
            if not sent:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise RuntimeError(f"connect failed: {os.strerror(error)}")
                sock.send(request)
                key.data[1] = True
                selector.modify(sock, selectors.EVENT_READ, key.data)
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("server closed a connection during the handshake")
            client.received += chunk
            end = client.received.find(b"\r\n\r\n")
            if end < 0:
                continue
            status = client.received[: client.received.find(b"\r\n")]
            if b" 101 " not in status:
                raise RuntimeError(f"handshake failed: {bytes(status)!r}")
            del client.received[: end + 4]
            selector.unregister(sock)
            done.append(client)
            pending -= 1
    selector.close()
    return done


_HEARTBEAT = phoenix(None, "hb", "phoenix", "heartbeat", {})
# Seconds between heartbeats. Servers close connections that stay silent for
# longer than their heartbeat timeout (60 s by default on DeeperHub, whose
# phoenix.js clients send a heartbeat every 30 s).
HEARTBEAT_INTERVAL = 20.0


def send_heartbeats(clients: list[Client]) -> None:
    """Send one Phoenix heartbeat on every connection."""
    for client in clients:
        client.sock.setblocking(True)
        client.sock.sendall(_HEARTBEAT)
        client.sock.setblocking(False)


def _drain_until_quiet(clients: list[Client], quiet: float, timeout: float) -> None:
    """Read and discard until no client received anything for `quiet` seconds."""
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    deadline = time.monotonic() + timeout
    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
    while time.monotonic() < deadline:
        if time.monotonic() > next_heartbeat:
            send_heartbeats(clients)
            next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        events = selector.select(quiet)
        if not events:
            break
        for key, _ in events:
            try:
                key.data.sock.recv(1 << 20)
            except BlockingIOError:
                pass
    selector.close()


def _join_all(clients: list[Client], topic: str, timeout: float) -> None:
    message = phoenix("1", "1", topic, "phx_join", {})
    for client in clients:
        client.sock.setblocking(True)
        client.sock.sendall(message)
        client.sock.setblocking(False)
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    joined = 0
    deadline = time.monotonic() + timeout
    marker = b'"phx_reply",{"status":"ok"'
    while joined < len(clients):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {joined} of {len(clients)} joins acknowledged")
        for key, _ in selector.select(1.0):
            client = key.data
            try:
                chunk = client.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise RuntimeError("server closed a connection during the join")
            client.received += chunk
            if marker in client.received:
                joined += 1
                client.received.clear()
                selector.unregister(client.sock)
    selector.close()


@dataclass
class Result:
    """Outcome of one fan-out run."""

    subscribers: int
    messages: int
    deliveries: int
    acknowledged: int
    seconds: float
    latencies_ms: list[float]
    # CPU seconds used during the measured phase, when a probe was given.
    server_cpu: float = float("nan")
    client_cpu: float = float("nan")

    def percentile(self, fraction: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "subscribers": self.subscribers,
            "messages": self.messages,
            "deliveries": self.deliveries,
            "acknowledged": self.acknowledged,
            "seconds": round(self.seconds, 3),
            "deliveries_per_second": round(self.deliveries / self.seconds)
            if self.seconds
            else 0,
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "server_cpu_percent": round(100 * self.server_cpu / self.seconds),
            "client_cpu_percent": round(100 * self.client_cpu / self.seconds),
        }


def run_fanout(
    host: str,
    port: int,
    *,
    subscriber_query: str,
    publisher_query: str,
    topic: str,
    subscribers: int,
    messages: int,
    window: int,
    timeout: float = 120.0,
    server_cpu: Callable[[], float] = lambda: float("nan"),
) -> Result:
    """Run one fan-out measurement and return its result.

    `server_cpu` returns the CPU seconds the server processes used so far; it
    is read when the first push is sent and after the last delivery.
    """
    clients = open_clients(host, port, subscriber_query, subscribers)
    publisher = open_clients(host, port, publisher_query, 1)[0]
    _join_all([*clients, publisher], topic, timeout)
    # Joins cause presence diffs to every subscriber; let them pass first.
    _drain_until_quiet([*clients, publisher], quiet=0.5, timeout=timeout)
    send_heartbeats([*clients, publisher])

    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    selector.register(publisher.sock, selectors.EVENT_READ, publisher)
    publisher.sock.setblocking(True)

    padding = "x" * (BODY_SIZE - 8)
    sent_at = [0] * (messages + 1)
    latencies: list[float] = []
    next_message = 1
    acknowledged = 0
    deliveries = 0
    expected = subscribers * messages
    reply_tail = b""
    started = time.monotonic_ns()
    last_delivery = started
    deadline = time.monotonic() + timeout

    def push_more() -> None:
        nonlocal next_message
        batch = []
        while next_message <= messages and next_message - 1 - acknowledged < window:
            n = next_message
            batch.append(
                phoenix("1", str(n), topic, "new_msg", {"body": f"{n:08d}{padding}"})
            )
            sent_at[n] = time.monotonic_ns()
            next_message += 1
        if batch:
            publisher.sock.sendall(b"".join(batch))

    server_cpu_start = server_cpu()
    client_cpu_start = _own_cpu()
    push_more()
    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
    while deliveries < expected and time.monotonic() < deadline:
        if time.monotonic() > next_heartbeat:
            send_heartbeats([*clients, publisher])
            next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        for key, _ in selector.select(1.0):
            client = key.data
            try:
                chunk = client.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                raise RuntimeError("server closed a connection during the run")
            now = time.monotonic_ns()
            if client is publisher:
                data = reply_tail + chunk
                last_end = 0
                for match in _REPLY.finditer(data):
                    acknowledged += 1
                    last_end = match.end()
                reply_tail = data[max(last_end, len(data) - _REPLY_TAIL) :]
                push_more()
                continue
            data = bytes(client.received) + chunk
            last_end = 0
            for match in _BODY.finditer(data):
                latencies.append((now - sent_at[int(match.group(1))]) / 1e6)
                last_end = match.end()
            found = len(latencies) - deliveries
            if found:
                deliveries += found
                last_delivery = now
            client.received = bytearray(data[max(last_end, len(data) - _BODY_TAIL) :])
    server_cpu_used = server_cpu() - server_cpu_start
    client_cpu_used = _own_cpu() - client_cpu_start
    selector.close()
    for client in [*clients, publisher]:
        client.sock.close()
    return Result(
        subscribers=subscribers,
        messages=messages,
        deliveries=deliveries,
        acknowledged=acknowledged,
        seconds=(last_delivery - started) / 1e9,
        latencies_ms=latencies,
        server_cpu=server_cpu_used,
        client_cpu=client_cpu_used,
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def session_cpu(session: int) -> float:
    """Return the CPU seconds of the live processes of session `session`."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # Fields after the command name: state, ppid, pgrp, session, ...,
        # utime at 11 and stime at 12 (proc(5)).
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])
    return total / ticks
