"""The acceptor's connection to the DB writer's bus.

`BusClient.run` subscribes to the bus (`bus_subscribe` on `db.sock`) and
applies its events to the hub in the order they arrive: committed chat
messages, token revocations, and presence changes of other acceptors. It
reads the IPC frames itself and applies every complete event of one read
before a single `Hub.flush`, so a burst of messages costs one write per
WebSocket connection and no task switch per event.

It also sends this acceptor's presence changes to the DB writer, which relays
them to the other acceptors. After each (re)subscription it first sends
`presence_sync` with every local meta, so a restarted DB writer learns the
full state again. Changes made while the bus is down are not queued, because
that sync covers them.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import ProtocolError
from deeperhub.ipc import MAX_MESSAGE_BYTES, encode_message

if TYPE_CHECKING:
    from deeperhub.config import Settings

    from .hub import Hub

__all__ = ["BusClient"]

log = logging.getLogger("deeperhub.acceptor.bus")

# Back-off between attempts to reach the DB writer while it restarts, seconds.
RECONNECT_DELAY = 0.05
RECONNECT_DELAY_MAX = 1.0
RECEIVE_BYTES = 1 << 20
_SUBSCRIBE_ID = 1


class BusClient:
    """Subscription to the DB writer's bus, kept across DB writer restarts."""

    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.path = settings.socket_path("db")
        self.hub = hub
        self._subscribed = False
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        hub.presence.relay = self.relay

    def relay(self, event: dict[str, Any]) -> None:
        """Queue a local presence change for the DB writer; never blocks."""
        if not self._subscribed:
            return
        self._outbox.append(encode_message(event))
        self._outbox_ready.set()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stay subscribed forever. Reports started after the first subscription."""
        started = False
        while True:
            stream = await self._connect()
            try:
                async with stream, trio.open_nursery() as nursery:
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
                self._outbox.clear()
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

    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Apply one message. Returns True for the reply to `bus_subscribe`."""
        if "id" not in message:
            self.hub.handle_bus_event(message)
            return False
        if message.get("id") != _SUBSCRIBE_ID or not message.get("ok"):
            raise ProtocolError(f"bus_subscribe failed: {message.get('error')}")
        # Nothing local was relayed while unsubscribed, so the sync goes first
        # and every later change follows it.
        self._subscribed = True
        sync = {"event": "presence_sync", "topics": self.hub.presence.local_snapshot()}
        self._outbox = [encode_message(sync)]
        self._outbox_ready.set()
        log.info("subscribed to the message bus")
        return True

    async def _messages(self, stream: trio.SocketStream) -> Any:
        """Yield the bus messages of `stream`, then flush the hub after each read."""
        buffer = bytearray()
        while True:
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return
            buffer += chunk
            offset = 0
            size = len(buffer)
            while size - offset >= 4:
                length = int.from_bytes(buffer[offset : offset + 4], "big")
                if length > MAX_MESSAGE_BYTES:
                    raise ProtocolError(f"bus message of {length} bytes is too large")
                end = offset + 4 + length
                if end > size:
                    break
                try:
                    message = json.loads(buffer[offset + 4 : end])
                except ValueError as exc:
                    raise ProtocolError(f"invalid JSON on the bus: {exc}") from exc
                offset = end
                if not isinstance(message, dict):
                    raise ProtocolError("bus message is not a JSON object")
                yield message
            del buffer[:offset]
            self.hub.flush()

    async def _send_loop(self, stream: trio.SocketStream) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            if not self._outbox:
                continue
            data, self._outbox = b"".join(self._outbox), []
            await stream.send_all(data)
