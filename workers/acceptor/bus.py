"""The acceptor's connection to the DB writer's bus.

`BusClient.run` subscribes to the bus (`bus_subscribe` on `db.sock`) and
applies its events to the hub in the order they arrive: committed chat
messages, token revocations, and presence changes of other acceptors. It
reads the IPC frames itself and applies every complete event of one read
before a single `Hub.flush`, so a burst of messages costs one write per
WebSocket connection and no task switch per event.

It also sends this acceptor's presence changes to the DB writer, which relays
them to the other acceptors, and the admission requests and releases of
`admission.py`. After each (re)subscription it first sends `presence_sync`
with every local meta and `admission_sync` with every slot and join held, so
a restarted DB writer learns the full state again. Changes made while the bus
is down are not queued, because these syncs cover them. After each
resubscription it also starts `ChannelDeletes.check_joins`, which ends the
joins of channels deleted while it was not subscribed.

A request without a reply within REQUEST_TIMEOUT seconds ends the bus
connection, so that the next subscription's `admission_sync` replaces counts
that the DB writer may have changed after the caller stopped waiting.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import ProtocolError
from deeperhub.ipc import encode_message, iter_messages

if TYPE_CHECKING:
    from deeperhub.config import Settings
    from deeperhub.storage.reads import ReadPool

    from .hub import Hub

__all__ = ["BusClient"]

log = logging.getLogger("deeperhub.acceptor.bus")

# Back-off between attempts to reach the DB writer while it restarts, seconds.
RECONNECT_DELAY = 0.05
RECONNECT_DELAY_MAX = 1.0
RECEIVE_BYTES = 1 << 20
# Seconds an admission request waits for the DB writer. The DB writer replies
# without touching SQLite, so only a stuck DB writer takes this long.
REQUEST_TIMEOUT = 2.0
_SUBSCRIBE_ID = 1


@dataclass(eq=False, slots=True)
class _Request:
    """A request sent on the bus connection, waiting for its reply."""

    # Event sent if the reply admits the request after its caller was
    # cancelled, so the DB writer stops counting a slot or join no connection
    # uses.
    release: dict[str, Any] | None
    done: trio.Event
    result: dict[str, Any] | None = None
    abandoned: bool = False


class BusClient:
    """Subscription to the DB writer's bus, kept across DB writer restarts."""

    def __init__(
        self, settings: Settings, hub: Hub, reads: ReadPool | None = None
    ) -> None:
        self.path = settings.socket_path("db")
        self.hub = hub
        # Read pool of `ChannelDeletes.check_joins`, or None to skip the check.
        self.reads = reads
        self._subscribed = False
        # Number of subscriptions so far; an `admission_sync` went with each.
        self.session = 0
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._request_ids = itertools.count(_SUBSCRIBE_ID + 1)
        self._requests: dict[int, _Request] = {}
        self._session_scope: trio.CancelScope | None = None
        self._session_nursery: trio.Nursery | None = None
        hub.presence.relay = self.relay
        hub.admission.bus = self

    def relay(self, event: dict[str, Any]) -> None:
        """Queue a local presence change for the DB writer; never blocks."""
        self.send(event)

    def send(self, event: dict[str, Any]) -> None:
        """Queue a one-way event for the DB writer, or drop it while unsubscribed."""
        if not self._subscribed:
            return
        self._outbox.append(encode_message(event))
        self._outbox_ready.set()

    async def request(
        self,
        op: str,
        args: dict[str, Any],
        *,
        release: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Send a request on the bus connection and return its result.

        Returns None at once while unsubscribed, and when the connection ends,
        the request times out or the DB writer replies with an error. See
        `_Request.release` for `release`.
        """
        if not self._subscribed:
            return None
        request_id = next(self._request_ids)
        pending = _Request(release=release, done=trio.Event())
        self._requests[request_id] = pending
        self.send({"id": request_id, "op": op, "args": args})
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await pending.done.wait()
        finally:
            if not pending.done.is_set():
                pending.abandoned = True
        if not pending.done.is_set():
            log.warning(
                "no reply to %s from the DB writer within %g s; resubscribing",
                op,
                REQUEST_TIMEOUT,
            )
            self._end_session()
            return None
        return pending.result

    def _end_session(self) -> None:
        self._subscribed = False
        if self._session_scope is not None:
            self._session_scope.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stay subscribed forever. Reports started after the first subscription."""
        started = False
        while True:
            stream = await self._connect()
            try:
                async with stream, trio.open_nursery() as nursery:
                    self._session_scope = nursery.cancel_scope
                    self._session_nursery = nursery
                    request = {
                        "id": _SUBSCRIBE_ID,
                        "op": "bus_subscribe",
                        "args": {"presence": True},
                    }
                    await stream.send_all(encode_message(request))
                    nursery.start_soon(self._send_loop, stream)
                    async for message in self._messages(stream):
                        if not self._dispatch(message):
                            continue
                        if not started:
                            started = True
                            task_status.started()
                    nursery.cancel_scope.cancel()
            # The nursery wraps errors of its tasks in exception groups.
            except* (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ) as exc:
                log.warning("message bus connection failed: %s", exc.exceptions[0])
            except* ProtocolError as exc:
                log.error("invalid message on the bus: %s", exc.exceptions[0])
            finally:
                self._subscribed = False
                self._session_scope = None
                self._session_nursery = None
                self._outbox.clear()
                self._fail_requests()
            log.warning("message bus connection closed; resubscribing")
            await trio.sleep(RECONNECT_DELAY)

    async def _connect(self) -> trio.SocketStream:
        delay = RECONNECT_DELAY
        while True:
            try:
                return await trio.open_unix_socket(str(self.path))
            except OSError as exc:
                log.debug(
                    "cannot connect to %s: %s; retrying in %g s", self.path, exc, delay
                )
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_DELAY_MAX)

    def _fail_requests(self) -> None:
        """Wake every waiting request with no result, as the connection ended."""
        requests, self._requests = self._requests, {}
        for pending in requests.values():
            pending.done.set()

    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Apply one message. Returns True for the reply to `bus_subscribe`."""
        if "id" not in message:
            self.hub.handle_bus_event(message)
            return False
        if message.get("id") != _SUBSCRIBE_ID:
            self._resolve(message)
            return False
        if not message.get("ok"):
            raise ProtocolError(f"bus_subscribe failed: {message.get('error')}")
        # Nothing local was sent while unsubscribed, so the syncs go first and
        # every later change and request follows them.
        self._subscribed = True
        self.session += 1
        presence = {
            "event": "presence_sync",
            "topics": self.hub.presence.local_snapshot(),
        }
        admission = self.hub.admission.snapshot()
        self._outbox = [encode_message(presence), encode_message(admission)]
        self._outbox_ready.set()
        log.info("subscribed to the message bus")

        # Deletions committed while unsubscribed sent no event. The check runs
        # in the session's nursery, and the next subscription repeats it if
        # this one ends first.
        if (
            self.session > 1
            and self.reads is not None
            and self._session_nursery is not None
        ):
            self._session_nursery.start_soon(self.hub.deletes.check_joins, self.reads)
        return True

    def _resolve(self, reply: dict[str, Any]) -> None:
        """Hand a reply to its waiting request."""
        request_id = reply.get("id")
        pending = None
        if isinstance(request_id, int):
            pending = self._requests.pop(request_id, None)
        if pending is None:
            log.warning("ignoring bus reply to unknown request %r", request_id)
            return
        if not reply.get("ok"):
            log.error("bus request %d failed: %s", request_id, reply.get("error"))
        elif isinstance(reply.get("result"), dict):
            pending.result = reply["result"]
        if pending.abandoned:
            if pending.result is not None and pending.result.get("admitted"):
                if pending.release is not None:
                    self.send(pending.release)
            return
        pending.done.set()

    async def _messages(self, stream: trio.SocketStream) -> Any:
        """Yield the bus messages of `stream`, then flush the hub after each read."""
        buffer = bytearray()
        while True:
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return
            buffer += chunk
            for message in iter_messages(buffer):
                if not isinstance(message, dict):
                    raise ProtocolError("bus message is not a JSON object")
                yield message
            self.hub.flush()

    async def _send_loop(self, stream: trio.SocketStream) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            if not self._outbox:
                continue
            data, self._outbox = b"".join(self._outbox), []
            await stream.send_all(data)
