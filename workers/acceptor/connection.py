"""One WebSocket client of an acceptor: identity, joined topics, outgoing bytes.

`Connection.send` appends an encoded frame to the connection's buffer and never
blocks. The buffered frames are written by `flush`, which the hub calls once
per batch of work (a chunk of bus events, a chunk of frames from the client),
so a burst of broadcasts costs one system call per connection, not one per
frame.

On a socket (`attach`), `flush` writes directly with `os.writev` on the
non-blocking descriptor. Only when the kernel's send buffer is full does a
drain task, started in the hub's nursery, wait for the socket to become
writable and write the rest; an idle connection has no writer task. On any
other stream (memory streams in unit tests), `run_writer` writes with
`send_all`.

A connection whose buffer would grow past `websocket.send_queue_bytes` is
closed with 1008 "slow consumer", so one client that stops reading never
delays the others or grows the server's memory.

A close requested while pushes of the client wait for their commit
(`pushes_in_flight`) first holds the Close frame back: the connection stops
taking new frames except the replies to those pushes (`send_reply`), and the
session queues the Close frame with `finish_close` once every reply is queued
or `REPLY_WAIT_TIMEOUT` has passed. So a client learns which of its pushes were
stored before the server closes, also when the close drops the buffered
frames.

Events (`close_requested`, `close_sent`, `peer_closed`) are created only
when someone asks for them, because most connections never need them and
each costs memory on every idle connection.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from typing import TYPE_CHECKING, Any, Protocol

import trio

from deeperhub.metrics import SEND_QUEUE_DROPS, observe_delivery
from deeperhub.ws.frames import CloseCode, Opcode, encode_close, encode_frame

if TYPE_CHECKING:
    from collections.abc import Callable

    from .hub import Subscription

__all__ = [
    "REPLY_WAIT_TIMEOUT",
    "SLOW_CONSUMER_REASON",
    "Connection",
    "FlushScheduler",
]

log = logging.getLogger("deeperhub.acceptor.ws")

SLOW_CONSUMER_REASON = "slow consumer"
# Maximum seconds a server-initiated close waits for the replies to pushes
# already handed to the DB writer before it sends the Close frame. A commit
# normally takes milliseconds. The replies that miss this wait are not sent.
REPLY_WAIT_TIMEOUT = 3.0
# writev accepts at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = getattr(os, "IOV_MAX", 1024)
# Errors that mean the peer is gone; anything else is logged.
_GONE_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF}
)


class FlushScheduler(Protocol):
    """The object that flushes connections and runs their drains (the hub)."""

    def schedule_flush(self, connection: Connection) -> None: ...

    def start_drain(self, connection: Connection) -> bool: ...


class _Reply(bytes):
    """A push reply in the buffer, which a discarding close keeps."""

    __slots__ = ()


class _State(enum.Enum):
    OPEN = "open"
    # A close is decided but waits for the replies to pushes in flight, so
    # only those replies may be queued.
    AWAITING_REPLIES = "awaiting_replies"
    CLOSING = "closing"  # a Close frame is queued, so nothing else may be sent
    ABORTED = "aborted"  # the TCP connection is gone, so nothing can be sent


class Connection:
    """One WebSocket client: identity, joined topics and the outgoing buffer.

    `send`, `close` and `flush` never block, so the hub calls them while it
    iterates over subscribers.
    """

    __slots__ = (
        "__weakref__",
        "_blocked",
        "_buffered",
        "_chunks",
        "_close_requested",
        "_close_sent",
        "_events",
        "_fd",
        "_flush_scheduled",
        "_partial",
        "_peer_closed",
        "_pending_close",
        "_socket",
        "_state",
        "close_code",
        "close_reason",
        "id",
        "oldest_message_at",
        "on_change",
        "pushes_in_flight",
        "scheduler",
        "send_queue_bytes",
        "subscriptions",
        "user_id",
        "username",
        "vsn",
        "wait_for_peer_close",
    )

    def __init__(
        self,
        *,
        connection_id: int,
        user_id: int,
        username: str,
        vsn: str,
        send_queue_bytes: int,
        scheduler: FlushScheduler | None = None,
    ) -> None:
        self.id = connection_id
        self.user_id = user_id
        self.username = username
        self.vsn = vsn
        # Joined topics, in join order.
        self.subscriptions: dict[str, Subscription] = {}
        self.send_queue_bytes = send_queue_bytes
        self.scheduler = scheduler
        # Called when the close state changes (close requested, Close frame
        # written, TCP gone), so the connection's reader can react at once.
        self.on_change: Callable[[], None] | None = None

        # Frames not yet written. When `_partial` is set, the first chunk is
        # the unwritten tail of a frame that a write started.
        self._chunks: list[bytes] = []
        self._partial = False
        self._buffered = 0
        self._flush_scheduled = False
        # Descriptor for direct writes, set between attach and detach.
        self._fd: int | None = None
        self._socket: Any = None
        # True while the kernel's send buffer is full and a drain task or
        # `run_writer` owns the next write.
        self._blocked = False

        self._state = _State.OPEN
        self._close_requested = False
        self._close_sent = False
        self._peer_closed = False
        # Close code and reason held back while the state is AWAITING_REPLIES.
        self._pending_close: tuple[int | None, str] = (None, "")
        # Pushes handed to the DB writer whose reply is not queued yet,
        # counted by the session. A close waits for them (see `close`).
        self.pushes_in_flight = 0
        # Lazily created trio.Events by name (see `_event`).
        self._events: dict[str, trio.Event] | None = None
        # The close code sent, or received when the client closed first. 1005
        # (no code in the client's Close) and 1006 (TCP dropped without a Close)
        # are only used as metric labels and never appear in a Close frame.
        self.close_code: int | None = None
        self.close_reason = ""
        # False when the server fails the connection (RFC 6455 section 7.1.7) and
        # closes TCP right after its Close frame without waiting for the client's.
        self.wait_for_peer_close = True
        # Metrics: Unix time at which the DB writer stamped the oldest chat
        # message still in `_chunks`, for deeperhub_message_delivery_seconds.
        self.oldest_message_at: float | None = None

    @property
    def extra(self) -> dict[str, Any]:
        """Log record fields that identify this connection."""
        return {"connection_id": self.id, "user_id": self.user_id}

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    @property
    def is_awaiting_replies(self) -> bool:
        """Whether a close waits for the replies to pushes in flight."""
        return self._state is _State.AWAITING_REPLIES

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        return self._buffered

    # Events

    def _event(self, name: str, is_set: bool) -> trio.Event:
        events = self._events
        if events is None:
            events = self._events = {}
        event = events.get(name)
        if event is None:
            event = events[name] = trio.Event()
            if is_set:
                event.set()
        return event

    def _fire(self, name: str) -> None:
        if self._events is not None:
            event = self._events.pop(name, None)
            if event is not None:
                event.set()

    @property
    def close_requested(self) -> trio.Event:
        """Set once a Close frame is queued or TCP is gone."""
        return self._event("close_requested", self._close_requested)

    @property
    def close_sent(self) -> trio.Event:
        """Set once the Close frame is written, or TCP is gone."""
        return self._event("close_sent", self._close_sent)

    @property
    def peer_closed(self) -> trio.Event:
        """Set once the client's Close frame arrived, or TCP is gone."""
        return self._event("peer_closed", self._peer_closed)

    @property
    def is_close_sent(self) -> bool:
        return self._close_sent

    @property
    def is_peer_closed(self) -> bool:
        return self._peer_closed

    def _set_close_requested(self) -> None:
        if not self._close_requested:
            self._close_requested = True
            self._fire("close_requested")
            self._changed()

    def _set_close_sent(self) -> None:
        if not self._close_sent:
            self._close_sent = True
            self._fire("close_sent")
            self._changed()

    def set_peer_closed(self) -> None:
        """Record that the client's Close frame arrived (or TCP ended)."""
        if not self._peer_closed:
            self._peer_closed = True
            self._fire("peer_closed")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # Queueing

    def _fits(self, size: int, limit: int) -> bool:
        # A frame larger than the limit is still accepted into an empty buffer,
        # otherwise it could never be sent.
        return self._buffered == 0 or self._buffered + size <= limit

    def _append(self, frame: bytes) -> None:
        self._chunks.append(frame)
        self._buffered += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self.scheduler is not None:
                self.scheduler.schedule_flush(self)
            else:
                self._fire("wake_writer")

    def send(self, frame: bytes) -> bool:
        """Queue one encoded frame, or close the connection if its buffer is full.

        Returns False when the frame was not queued: the connection is closing,
        or it has just been closed as a slow consumer.
        """
        if self._state is not _State.OPEN:
            return False
        if self._buffered and self._buffered + len(frame) > self.send_queue_bytes:
            self.close_slow_consumer(self._buffered + len(frame))
            return False
        self._append(frame)
        return True

    def send_reply(self, frame: bytes) -> bool:
        """Queue the reply to a push, also while a close waits for such replies.

        Unlike other frames, the reply is kept when a close drops the buffer,
        and it may exceed `send_queue_bytes` once a close is decided, by at
        most `websocket.max_pending_pushes` replies. Returns False when the
        Close frame is already queued, so the reply is dropped.
        """
        if self._state is _State.OPEN:
            if (
                not self._buffered
                or self._buffered + len(frame) <= self.send_queue_bytes
            ):
                self._append(_Reply(frame))
                return True
            self.close_slow_consumer(self._buffered + len(frame))
        if self._state is not _State.AWAITING_REPLIES:
            return False
        self._append(_Reply(frame))
        return True

    def close_slow_consumer(self, required_bytes: int) -> None:
        """Close with 1008 "slow consumer" because `required_bytes` exceed the limit."""
        SEND_QUEUE_DROPS.inc()
        log.warning(
            "closing slow consumer: %d bytes to buffer, limit %d",
            required_bytes,
            self.send_queue_bytes,
            extra=self.extra,
        )
        self.close(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON, discard=True)

    async def send_paced(self, frame: bytes) -> bool:
        """Queue one frame after waiting until the buffer is at most half full.

        Used for bulk sends such as a replay, so they leave room for live
        traffic and do not trip the slow-consumer limit on their own. Returns
        False if the connection closed meanwhile.
        """
        limit = self.send_queue_bytes // 2
        while self._state is _State.OPEN and not self._fits(len(frame), limit):
            await self._event("space", False).wait()
        return self.send(frame)

    def close(
        self, code: int | None, reason: str = "", *, discard: bool = False
    ) -> None:
        """Stop accepting frames and queue a Close frame after the buffered ones.

        `code=None` sends a Close without a status code, as the echo of a client
        Close that had none. With `discard=True` the frames still waiting in the
        buffer are dropped, except push replies and the unwritten tail of a
        frame that a write already started, so the Close frame starts on a
        frame boundary. Only the first call has an effect.

        While pushes are in flight, the Close frame waits: only their replies
        are queued (`send_reply`) until the session calls `finish_close`.
        """
        if self._state is not _State.OPEN:
            return
        if discard:
            self._discard_buffer()
        if self.pushes_in_flight > 0:
            self._state = _State.AWAITING_REPLIES
            self._pending_close = (code, reason)
            self._fire("space")
            self._changed()
            return
        self._queue_close(code, reason)

    def finish_close(self) -> None:
        """Queue the Close frame held back for the replies to pushes in flight."""
        if self._state is _State.AWAITING_REPLIES:
            self._queue_close(*self._pending_close)

    def _queue_close(self, code: int | None, reason: str) -> None:
        self._state = _State.CLOSING
        self.close_code = 1005 if code is None else int(code)
        self.close_reason = reason
        if code is None:
            frame = encode_frame(Opcode.CLOSE, b"")
        else:
            frame = encode_close(code, reason)
        self._append(frame)
        self._fire("space")
        self._set_close_requested()

    def _discard_buffer(self) -> None:
        """Drop buffered frames except push replies and a partly written frame."""
        chunks = self._chunks
        keep = chunks[:1] if self._partial else []
        keep += [chunk for chunk in chunks[len(keep) :] if isinstance(chunk, _Reply)]
        self._chunks = keep
        self._buffered = sum(len(chunk) for chunk in keep)
        self.oldest_message_at = None

    def abort(self) -> None:
        """Record that the TCP connection is gone, so nothing more can be sent."""
        if self._state in (_State.OPEN, _State.AWAITING_REPLIES):
            self.close_code = 1006
        self._state = _State.ABORTED
        self._chunks.clear()
        self._buffered = 0
        self._fd = None
        self._fire("wake_writer")
        self._fire("space")
        self.set_peer_closed()
        self._set_close_sent()
        self._set_close_requested()

    # Writing

    def attach(self, sock: trio.socket.SocketType) -> None:
        """Write to `sock` directly from now on."""
        self._socket = sock
        self._fd = sock.fileno()

    def detach(self) -> None:
        """Stop writing to the socket, which its owner is about to close.

        After this, no write can use the descriptor, whose number the kernel
        may hand to another socket as soon as it is closed.
        """
        self._fd = None
        self._socket = None

    def flush(self) -> None:
        """Write what is buffered now, without blocking.

        What the kernel does not take is left to a drain task. A socket that
        just closed ends this connection only, without raising.
        """
        self._flush_scheduled = False
        if not self._chunks or self._blocked:
            return
        if self._fd is None:
            self._fire("wake_writer")
            return
        self._write_direct()
        if self._blocked and (
            self.scheduler is None or not self.scheduler.start_drain(self)
        ):
            self._fire("wake_writer")

    def _write_direct(self) -> None:
        """Write once; set `_blocked` if the kernel did not take everything."""
        assert self._fd is not None
        chunks = self._chunks
        try:
            if len(chunks) == 1:
                written = os.write(self._fd, chunks[0])
            else:
                written = os.writev(self._fd, chunks[:_IOV_MAX])
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno not in _GONE_ERRNOS:
                log.info("socket write failed: %s", exc, extra=self.extra)
            self.abort()
            return
        self._consume(written)
        self._blocked = bool(self._chunks)

    def _consume(self, written: int) -> None:
        """Drop `written` bytes from the front of the buffer."""
        if written <= 0:
            return
        self._buffered -= written
        chunks = self._chunks
        index = 0
        while index < len(chunks) and written >= len(chunks[index]):
            written -= len(chunks[index])
            index += 1
        del chunks[:index]
        self._partial = bool(written)
        if written:
            chunks[0] = chunks[0][written:]
        if self.oldest_message_at is not None:
            # Metrics: delivery latency, observed once per write.
            # TODO: this costs 7% to 10% of an acceptor's CPU in
            # bench/fanout.py; once per flush pass would be enough.
            observe_delivery(self.oldest_message_at)
            self.oldest_message_at = None
        self._fire("space")
        if not chunks and self._state is _State.CLOSING:
            # close() appends the Close frame last and nothing after it.
            self._set_close_sent()

    async def drain(self) -> None:
        """Write the rest of a blocked buffer as the socket becomes writable.

        Runs in the hub's nursery, only while the kernel's send buffer is full.
        """
        try:
            while self._blocked and self._fd is not None:
                await trio.lowlevel.wait_writable(self._socket)
                if self._fd is None:
                    break
                self._write_direct()
        except (trio.ClosedResourceError, trio.BusyResourceError, OSError):
            self.abort()
        finally:
            self._blocked = False

    async def run_writer(self, stream: trio.abc.SendStream) -> None:
        """Write buffered frames to a stream that is not an attached socket.

        Used for memory streams in unit tests and as the fallback when no
        scheduler runs drains. Ends once the Close frame is sent or the stream
        fails.
        """
        found = getattr(stream, "socket", None)
        sock = found if isinstance(found, trio.socket.SocketType) else None
        direct = sock is not None
        if sock is not None and self._fd is None:
            self.attach(sock)
        try:
            while self._state is not _State.ABORTED and not self._close_sent:
                if not self._chunks:
                    await self._event("wake_writer", False).wait()
                elif not direct:
                    await self._send_all(stream)
                elif self._fd is None:
                    return
                else:
                    assert sock is not None
                    self._flush_scheduled = False
                    if self._blocked:
                        await trio.lowlevel.wait_writable(sock)
                    self._write_direct()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.abort()
        finally:
            if direct:
                self.detach()

    async def _send_all(self, stream: trio.abc.SendStream) -> None:
        batch = b"".join(self._chunks)
        count = len(self._chunks)
        self._partial = True
        self._chunks[:count] = [batch]
        await stream.send_all(batch)
        self._flush_scheduled = False
        self._consume(len(batch))
