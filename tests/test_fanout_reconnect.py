"""The acceptor's DB writer links survive a DB writer that resets its sockets.

A fake DB writer on the real Unix socket path answers the first connection,
then resets it (SO_LINGER 0, as when the process is killed with unread data),
and serves the next connection normally. The push pipeline and the bus
client must reconnect instead of crashing the acceptor.
"""

from __future__ import annotations

import socket
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.ipc import MessageStream, encode_message
from workers.acceptor.bus import BusClient
from workers.acceptor.hub import Hub
from workers.acceptor.pushes import PushPipeline

from .test_hub import TOPIC, Client, connect, join, make_settings, stored_message

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from deeperhub.config import Settings


def reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN."""
    stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )


async def serve_fake_db_writer(
    path: Path,
    handler: Callable[[MessageStream, int], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    listener = trio.SocketListener(sock)
    number = 0
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            number += 1

            async def run(stream: trio.SocketStream, number: int) -> None:
                async with stream:
                    await handler(MessageStream(stream), number)

            nursery.start_soon(run, stream, number)


def settings_in(directory: Path) -> Settings:
    (directory / "run").mkdir()
    return make_settings(directory)


async def test_push_pipeline_survives_reset() -> None:
    with tempfile.TemporaryDirectory(prefix="dh-reset-") as tmp:
        settings = settings_in(Path(tmp))
        hub = Hub(settings)

        async def handler(messages: MessageStream, number: int) -> None:
            request = await messages.receive()
            assert request is not None
            if number == 1:
                reset(messages.stream)  # type: ignore[arg-type]
                return
            while request is not None:
                result = {"message": {"id": 7}}
                await messages.send({"id": request["id"], "ok": True, "result": result})
                request = await messages.receive()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_fake_db_writer, settings.socket_path("db"), handler
            )
            pipeline = PushPipeline(settings, hub, timeout=5)
            await nursery.start(pipeline.run)
            results: list[Any] = []
            answered = trio.Event()

            def record(result: Any) -> None:
                results.append(result)
                answered.set()

            pipeline.submit("insert_message", {}, record)
            with trio.fail_after(5):
                await answered.wait()
            assert results[0][0] == "unavailable"

            with trio.fail_after(5):
                while not results[1:]:
                    pipeline.submit("insert_message", {}, results.append)
                    await trio.sleep(0.05)
                while results[-1][0] is not None:
                    pipeline.submit("insert_message", {}, results.append)
                    await trio.sleep(0.05)
            assert results[-1] == (None, {"message": {"id": 7}})
            nursery.cancel_scope.cancel()


async def test_bus_client_survives_reset() -> None:
    with tempfile.TemporaryDirectory(prefix="dh-reset-") as tmp:
        settings = settings_in(Path(tmp))
        hub = Hub(settings)

        async def handler(messages: MessageStream, number: int) -> None:
            request = await messages.receive()
            assert request is not None
            assert request["op"] == "bus_subscribe"
            await messages.send({"id": request["id"], "ok": True, "result": {}})
            if number == 1:
                reset(messages.stream)  # type: ignore[arg-type]
                return
            event = {"event": "message", "topic": TOPIC, "message": stored_message(9)}
            await messages.stream.send_all(encode_message(event))
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            client = Client(connect(hub, 1, "alice")).start(nursery)
            join(hub, client.connection)
            await nursery.start(
                serve_fake_db_writer, settings.socket_path("db"), handler
            )
            await nursery.start(BusClient(settings, hub).run)
            with trio.fail_after(5):
                while True:
                    pushes = [m for m in client.messages() if m[3] == "new_msg"]
                    if pushes:
                        break
                    await trio.sleep(0.02)
            assert pushes[0][4]["id"] == 9
            nursery.cancel_scope.cancel()
