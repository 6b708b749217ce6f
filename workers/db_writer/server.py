"""The DB writer: the only process that writes SQLite, and the message bus.

Connection tasks read requests from `db.sock` and put the write ops into one
memory channel. A single writer task owns the write connection: it takes every
queued request up to `database.max_batch`, commits them in one transaction in
a worker thread (group commit), then replies and publishes the bus events in
commit order. Each connection has a bounded outbox drained by its own sender
task, so a client that stops reading never blocks the writer: when its outbox
is full, the connection is dropped.

Bus subscribers (the acceptors) also send their presence changes here, and
the server relays them to the other subscribers (`presence.py`). On the same
connection they ask to admit WebSocket connections and joins, counted over
every acceptor (`admission.py`). Message retention runs as `prune_messages`
requests to this same socket (`retention.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.errors import ProtocolError, StorageError
from deeperhub.ipc import encode_message, serve_unix
from deeperhub.metrics import (
    DB_BATCH_SIZE,
    DB_QUERY_DURATION,
    DB_WRITER_QUEUE_DEPTH,
    DB_WRITES,
)
from deeperhub.storage.database import open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.writes import WRITE_OPS, WriteExecutor, WriteOutcome

from .admission import ADMISSION_EVENTS, ADMISSION_OPS, AdmissionRegistry
from .maintenance import BackupHandler, run_token_purge
from .presence import PresenceRegistry
from .retention import run_retention

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from pathlib import Path

    from deeperhub.ipc import MessageStream

    from ..common import WorkerContext

__all__ = ["OUTBOX_MAX_MESSAGES", "DbWriterServer", "serve"]

log = logging.getLogger("deeperhub.db_writer")

# Messages queued for one connection before it is dropped as too slow. It
# matches the default event buffer of `ipc.open_rpc_client`.
OUTBOX_MAX_MESSAGES = 10_000


class _Peer:
    """One IPC connection: its outbox, its sender task and its pending requests."""

    def __init__(self, messages: MessageStream, number: int, outbox_size: int) -> None:
        self.messages = messages
        self.number = number  # for logs only
        self.outbox_size = outbox_size
        self._outbox_send, self._outbox = trio.open_memory_channel[bytes](outbox_size)
        # Scope around the connection's tasks. Cancelling it ends the connection.
        self.cancel_scope = trio.CancelScope()
        self._pending = 0  # requests queued for the writer, not yet replied to
        self._idle = trio.Event()
        self._idle.set()

    def push(self, framed: bytes) -> None:
        """Queue framed bytes; drop the connection instead if its outbox is full."""
        try:
            self._outbox_send.send_nowait(framed)
        except trio.WouldBlock:
            log.warning(
                "dropping IPC connection %d: %d outgoing messages were not read",
                self.number,
                self.outbox_size,
            )
            self.abort()
        except trio.ClosedResourceError:
            pass  # the connection is closing, so the message is discarded

    def abort(self) -> None:
        """End the connection now, discarding what is still queued."""
        self._outbox_send.close()
        self.cancel_scope.cancel()

    def finish(self) -> None:
        """End the connection once everything already queued is sent."""
        self._outbox_send.close()

    def begin_request(self) -> None:
        self._pending += 1
        if self._pending == 1:
            self._idle = trio.Event()

    def end_request(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until a reply to every request of this connection is queued."""
        await self._idle.wait()

    async def run_sender(self) -> None:
        """Send the outbox in order, then end the connection.

        The connection also ends when the socket breaks.
        """
        try:
            async for framed in self._outbox:
                await self.messages.send_raw(framed)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("IPC connection %d closed while sending", self.number)
        finally:
            self.cancel_scope.cancel()


@dataclass(frozen=True)
class _Queued:
    """A write request waiting for the writer task."""

    peer: _Peer
    request_id: int
    op: str
    args: Mapping[str, Any]


class DbWriterServer:
    """Request handling, group commit and the bus, on top of a `WriteExecutor`."""

    def __init__(
        self,
        executor: WriteExecutor,
        *,
        max_batch: int,
        outbox_size: int = OUTBOX_MAX_MESSAGES,
        backup: Callable[[Mapping[str, Any]], Awaitable[WriteOutcome]] | None = None,
        admission: AdmissionRegistry | None = None,
    ) -> None:
        self.executor = executor
        # Handler of the `backup` op (maintenance.BackupHandler); it runs
        # outside the batches, so it is not in WRITE_OPS.
        self.backup = backup
        self.max_batch = max_batch
        self.outbox_size = outbox_size
        # Handlers send on clones of `_requests_send`, so the writer's loop ends
        # once shutdown closed the original and the last clone is closed.
        self._requests_send, self._requests = trio.open_memory_channel[_Queued](
            max_batch
        )
        self._peers: set[_Peer] = set()
        self._subscribers: set[_Peer] = set()
        self.presence = PresenceRegistry()
        # Without limits given (unit tests), every admission request passes.
        self.admission = admission or AdmissionRegistry(
            max_connections=sys.maxsize, max_joins_per_user=sys.maxsize
        )
        self._next_peer = 0
        self._closing = False
        self._writer_done = trio.Event()
        self._peers_gone = trio.Event()

    async def run(
        self, socket_path: Path, ctx: WorkerContext, *, stop_grace: float
    ) -> None:
        """Serve `socket_path` until `ctx.stopping` is set, then drain and return.

        `stop_grace` bounds, in seconds, how long stopping waits for clients to
        read their last replies.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run_writer)
            async with trio.open_nursery() as listening:
                await listening.start(serve_unix, socket_path, self.handle_connection)
                log.info("DB writer listening on %s", socket_path)
                await ctx.ready()
                await ctx.stopping.wait()
                await self.stop(socket_path, stop_grace)
                listening.cancel_scope.cancel()

    async def stop(self, socket_path: Path, grace: float) -> None:
        """Stop accepting, commit and reply to every queued write, then disconnect."""
        # Removing the socket file rejects new connections at once, while the
        # listener keeps running the connections it accepted. Cancelling
        # serve_unix instead would close them before their replies are sent.
        socket_path.unlink(missing_ok=True)
        self._closing = True
        self._requests_send.close()
        await self._writer_done.wait()

        for peer in list(self._peers):
            peer.finish()
        if not self._peers:
            self._peers_gone.set()
        with trio.move_on_after(grace):
            await self._peers_gone.wait()
        if self._peers:
            log.warning(
                "closing %d IPC connections that did not read their last replies",
                len(self._peers),
            )

    # Connections.

    async def handle_connection(self, messages: MessageStream) -> None:
        """Serve one IPC connection (the handler given to `serve_unix`)."""
        self._next_peer += 1
        peer = _Peer(messages, self._next_peer, self.outbox_size)
        self._peers.add(peer)
        try:
            with peer.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer.run_sender)
                    if await self._read_requests(peer):
                        # The client closed its side: reply to what it already sent.
                        await peer.wait_idle()
                        peer.finish()
                    else:
                        peer.abort()
        except Exception:
            # A bug in one connection must not stop the writer for every client.
            log.exception("IPC connection %d failed", peer.number)
        finally:
            self._peers.discard(peer)
            if peer in self._subscribers:
                self._subscribers.discard(peer)
                # The acceptor behind this bus connection stopped or crashed:
                # the others must drop the presences it tracked.
                for event in self.presence.drop(peer):
                    self._publish(event)
                self.admission.drop(peer)
            if self._closing and not self._peers:
                self._peers_gone.set()

    async def _read_requests(self, peer: _Peer) -> bool:
        """Dispatch requests until the client closes (True) or the stream fails."""
        try:
            while True:
                message = await peer.messages.receive()
                if message is None:
                    return True
                await self._dispatch(peer, message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        except ProtocolError as exc:
            log.warning("closing IPC connection %d: %s", peer.number, exc)
            return False

    async def _dispatch(self, peer: _Peer, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        op = message.get("op")
        if "id" not in message and "event" in message:
            self._handle_event(peer, message)
            return
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            log.warning(
                "ignoring IPC message without an integer id on connection %d (op %r)",
                peer.number,
                op,
            )
            return

        args = message.get("args", {})
        if op == "ping":
            self._reply(peer, WriteOutcome(result={}), request_id)
        elif op == "backup" and self.backup is not None and isinstance(args, dict):
            self._reply(peer, await self.backup(args), request_id)
        elif op == "bus_subscribe":
            self._subscribers.add(peer)
            self._reply(peer, WriteOutcome(result={}), request_id)
            if isinstance(args, dict) and args.get("presence") is True:
                # Pushed after the reply and before any later event, so the
                # subscriber starts from a state that the next events build on.
                self._push_event(peer, self.presence.snapshot(exclude=peer))
        elif op in ADMISSION_OPS:
            if peer in self._subscribers and isinstance(args, dict):
                outcome = self.admission.request(peer, op, args)
            else:
                error = ("invalid", f"{op} needs args and a bus_subscribe first")
                outcome = WriteOutcome(error=error)
            self._reply(peer, outcome, request_id)
        elif not isinstance(op, str) or op not in WRITE_OPS:
            log.warning("unknown op %r on IPC connection %d", op, peer.number)
            DB_WRITES.labels(op="unknown", outcome="invalid").inc()
            self._reply(
                peer, WriteOutcome(error=("invalid", f"unknown op {op}")), request_id
            )
        elif not isinstance(args, dict):
            DB_WRITES.labels(op=op, outcome="invalid").inc()
            error = ("invalid", f"invalid args for {op}: expected an object")
            self._reply(peer, WriteOutcome(error=error), request_id)
        elif self._closing:
            DB_WRITES.labels(op=op, outcome="storage").inc()
            error = ("storage", "the DB writer is stopping: nothing was written, retry")
            self._reply(peer, WriteOutcome(error=error), request_id)
        else:
            await self._enqueue(_Queued(peer, request_id, op, args))

    async def _enqueue(self, item: _Queued) -> None:
        # No checkpoint between the `_closing` check in `_dispatch` and clone(),
        # so the clone is always taken before `stop` closes the original.
        queue = self._requests_send.clone()
        item.peer.begin_request()
        try:
            async with queue:
                await queue.send(item)
        except BaseException:
            item.peer.end_request()
            raise

    def _reply(self, peer: _Peer, outcome: WriteOutcome, request_id: int) -> None:
        try:
            framed = encode_message(outcome.to_reply(request_id))
        except ProtocolError as exc:
            log.error(
                "cannot send reply %d on IPC connection %d: %s",
                request_id,
                peer.number,
                exc,
            )
            peer.abort()
            return
        peer.push(framed)

    # The writer task.

    async def run_writer(self) -> None:
        """Commit queued writes in batches until the request channel ends."""
        try:
            async with self._requests:
                async for first in self._requests:
                    batch = [first]
                    while len(batch) < self.max_batch:
                        try:
                            batch.append(self._requests.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    waiting = self._requests.statistics()
                    DB_WRITER_QUEUE_DEPTH.set(
                        waiting.current_buffer_used + waiting.tasks_waiting_send
                    )
                    await self._commit(batch)
        finally:
            self._writer_done.set()

    async def _commit(self, batch: list[_Queued]) -> None:
        """Run one batch in a thread, then reply and publish in commit order."""
        requests = [(item.op, item.args) for item in batch]
        start = time.perf_counter()
        try:
            outcomes = await trio.to_thread.run_sync(
                self.executor.execute_batch, requests
            )
        except Exception:
            log.exception("batch of %d writes raised an unexpected error", len(batch))
            error = ("storage", "internal error in the DB writer: nothing was written")
            outcomes = [WriteOutcome(error=error) for _ in batch]
        DB_QUERY_DURATION.labels(kind="write_batch").observe(
            time.perf_counter() - start
        )
        DB_BATCH_SIZE.observe(len(batch))
        _log_storage_errors(batch, outcomes)

        for item, outcome in zip(batch, outcomes, strict=True):
            DB_WRITES.labels(op=item.op, outcome=outcome.label).inc()
            self._reply(item.peer, outcome, item.request_id)
            item.peer.end_request()
            for event in outcome.events:
                self._publish(event)

    def _handle_event(self, peer: _Peer, message: dict[str, Any]) -> None:
        """Apply a one-way event of a bus subscriber: presence or admission."""
        event = message.get("event")
        if peer not in self._subscribers:
            log.warning(
                "ignoring %r event on IPC connection %d: not a bus subscriber",
                event,
                peer.number,
            )
            return
        if event == "presence":
            relayed = self.presence.apply(peer, message)
            if relayed is not None:
                self._publish(relayed, exclude=peer)
        elif event == "presence_sync":
            for relayed in self.presence.sync(peer, message):
                self._publish(relayed, exclude=peer)
        elif event in ADMISSION_EVENTS:
            self.admission.apply_event(peer, message)
        else:
            log.warning("unknown event %r on IPC connection %d", event, peer.number)

    def _push_event(self, peer: _Peer, event: dict[str, Any]) -> None:
        try:
            framed = encode_message(event)
        except ProtocolError as exc:
            log.error(
                "cannot send a %s event on IPC connection %d: %s",
                event.get("event"),
                peer.number,
                exc,
            )
            return
        peer.push(framed)

    def _publish(self, event: dict[str, Any], exclude: _Peer | None = None) -> None:
        """Send one bus event, encoded once, to every subscribed connection."""
        if not self._subscribers:
            return
        try:
            framed = encode_message(event)
        except ProtocolError as exc:
            log.error("cannot publish a bus event on %s: %s", event.get("topic"), exc)
            return
        for peer in list(self._subscribers):
            if peer is not exclude:
                peer.push(framed)


def _log_storage_errors(batch: list[_Queued], outcomes: list[WriteOutcome]) -> None:
    """Log `storage` failures once per batch, naming the ops, instead of per op."""
    failed = [
        (item.op, outcome.error[1])
        for item, outcome in zip(batch, outcomes, strict=True)
        if outcome.error is not None and outcome.error[0] == "storage"
    ]
    if failed:
        ops = ", ".join(sorted({op for op, _ in failed}))
        log.error(
            "%d of %d writes failed (ops: %s): %s",
            len(failed),
            len(batch),
            ops,
            failed[0][1],
        )


async def serve(ctx: WorkerContext) -> None:
    """Open the database, apply migrations and serve `db.sock` until stopped."""
    settings = ctx.settings
    db_path = settings.db_path
    socket_path = settings.socket_path("db")
    log.info("DB writer %s starting with database %s", ctx.worker_id, db_path)

    # A StorageError here (corrupt or unreadable file) ends the worker, and the
    # supervisor then refuses to start rather than serve errors.
    try:
        conn = await trio.to_thread.run_sync(
            partial(
                open_write_connection,
                db_path,
                synchronous=str(settings["database.synchronous"]),
                busy_timeout_ms=int(settings["database.busy_timeout_ms"]),
                checkpoint_pages=int(settings["database.checkpoint_pages"]),
            )
        )
    except StorageError as exc:
        log.critical("DB writer %s cannot start: %s", ctx.worker_id, exc.message)
        raise
    try:
        await trio.to_thread.run_sync(apply_migrations, conn)
        server = DbWriterServer(
            WriteExecutor(conn),
            max_batch=int(settings["database.max_batch"]),
            backup=BackupHandler(settings),
            admission=AdmissionRegistry(
                max_connections=int(settings["server.max_connections"]),
                max_joins_per_user=int(settings["websocket.max_joins_per_user"]),
            ),
        )
        ctx.handlers["admission"] = server.admission.handle_counts
        # Leave half of the supervisor's SIGTERM-to-SIGKILL time for the rest.
        grace = float(settings["supervisor.shutdown_timeout"]) / 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_token_purge, settings)
            nursery.start_soon(run_retention, settings)
            await server.run(socket_path, ctx, stop_grace=grace)
            nursery.cancel_scope.cancel()
    finally:
        conn.close()
    log.info("DB writer %s stopped, database %s closed", ctx.worker_id, db_path)
