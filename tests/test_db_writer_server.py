"""The DB writer worker, run in-process against real SQLite files and sockets."""

from __future__ import annotations

from collections import defaultdict
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from deeperhub.config import load_settings
from deeperhub.errors import ProtocolError
from deeperhub.ipc import RemoteError, open_rpc_client, open_unix_stream
from deeperhub.storage import reads
from deeperhub.storage.database import open_read_connection, open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.writes import WriteExecutor
from workers.common import WorkerContext
from workers.db_writer.server import DbWriterServer, serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from deeperhub.config import Settings
    from deeperhub.ipc import RpcClient

# Upper bound in seconds for each test's work. pytest-timeout stops at 60.
TEST_TIMEOUT = 30
MAX_BATCH = 16  # a bucket bound of DB_BATCH_SIZE, so the tests can check it


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    config = tmp_path / "deeperhub.toml"
    config.write_text(f"[database]\nmax_batch = {MAX_BATCH}\n")
    return load_settings(
        environ={
            "DEEPERHUB_VAR_DIR": str(tmp_path / "var"),
            "GUARDIAN_SECRET_KEY": "test-key-for-the-db-writer-tests",
        },
        config_file=config,
    )


@asynccontextmanager
async def running_writer(settings: Settings) -> AsyncIterator[WorkerContext]:
    """Run `serve` until the block ends, then stop it and wait for it to return."""
    ctx = WorkerContext(settings=settings, worker_id="db_writer")
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, ctx)
            await ctx.is_ready.wait()
            yield ctx
            ctx.stopping.set()


@asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[RpcClient]:
    async with open_rpc_client(settings.socket_path("db")) as rpc:
        yield rpc


async def make_user(rpc: RpcClient, name: str) -> int:
    result = await rpc.call(
        "register_user", username=name, email=f"{name}@example.com", password_hash="h"
    )
    return int(result["user"]["id"])


async def make_channel(rpc: RpcClient, name: str, owner_id: int) -> int:
    result = await rpc.call(
        "create_channel", name=name, owner_id=owner_id, private=False
    )
    return int(result["channel"]["id"])


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_ping_and_ready(settings: Settings) -> None:
    """The writer reports ready once listening and replies {} to ping."""
    async with running_writer(settings) as ctx, client(settings) as rpc:
        assert ctx.is_ready.is_set()
        assert settings.db_path.exists()
        assert await rpc.call("ping") == {}


async def test_unknown_op_is_invalid(settings: Settings) -> None:
    """An unknown op is `invalid` naming it, and the connection stays usable."""
    async with running_writer(settings), client(settings) as rpc:
        with pytest.raises(RemoteError) as caught:
            await rpc.call("drop_everything")

        assert caught.value.code == "invalid"
        assert caught.value.message == "unknown op drop_everything"
        assert await rpc.call("ping") == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"channel_id": 1, "user_id": 1}, "missing argument body"),
        (
            {"channel_id": "1", "user_id": 1, "body": "x"},
            "invalid argument channel_id: expected an integer, got str",
        ),
    ],
)
async def test_bad_args_are_invalid(
    settings: Settings, args: dict[str, Any], message: str
) -> None:
    """Missing or mistyped arguments are `invalid` naming the argument."""
    async with running_writer(settings), client(settings) as rpc:
        with pytest.raises(RemoteError) as caught:
            await rpc.call("insert_message", **args)

        assert caught.value.code == "invalid"
        assert caught.value.message == message


async def test_malformed_requests_keep_connection(settings: Settings) -> None:
    """Args that are not an object are `invalid`. Messages without id are ignored."""
    async with running_writer(settings):
        stream = await open_unix_stream(settings.socket_path("db"))
        await stream.send({"op": "ping"})
        await stream.send({"id": 1, "op": "insert_message", "args": [1, 2]})
        await stream.send({"id": 2, "op": "ping", "args": {}})

        first = await stream.receive()
        second = await stream.receive()
        await stream.aclose()

    assert first == {
        "id": 1,
        "ok": False,
        "error": {
            "code": "invalid",
            "message": "invalid args for insert_message: expected an object",
        },
    }
    assert second == {"id": 2, "ok": True, "result": {}}


async def test_conflict_names_field(settings: Settings) -> None:
    """A taken username over IPC is a `conflict` naming the field."""
    async with running_writer(settings), client(settings) as rpc:
        await make_user(rpc, "alice")

        with pytest.raises(RemoteError) as caught:
            await rpc.call(
                "register_user", username="Alice", email="x@y.z", password_hash="h"
            )

        assert caught.value.code == "conflict"
        assert caught.value.message == "username already taken"


async def test_group_commit_keeps_seq_gapless(settings: Settings) -> None:
    """Concurrent inserts from several connections share commits, without seq gaps."""
    clients, per_client = 4, 30
    writes_before = sample(
        "deeperhub_db_writes_total", {"op": "insert_message", "outcome": "ok"}
    )
    results: dict[int, list[dict[str, Any]]] = defaultdict(list)

    async with running_writer(settings), client(settings) as setup:
        owner = await make_user(setup, "alice")
        channels = [await make_channel(setup, name, owner) for name in ("a", "b")]
        batches_before = sample("deeperhub_db_batch_size_count")
        small_before = sample(
            "deeperhub_db_batch_size_bucket", {"le": str(float(MAX_BATCH))}
        )

        async def send_all(rpc: RpcClient, index: int) -> None:
            async with trio.open_nursery() as nursery:
                for n in range(per_client):
                    nursery.start_soon(insert, rpc, channels[(index + n) % 2], n)

        async def insert(rpc: RpcClient, channel_id: int, n: int) -> None:
            result = await rpc.call(
                "insert_message", channel_id=channel_id, user_id=owner, body=f"{n}"
            )
            results[channel_id].append(result["message"])

        async with trio.open_nursery() as connections:
            rpcs = [
                await connections.start(hold_client, settings) for _ in range(clients)
            ]
            async with trio.open_nursery() as senders:
                for index, rpc in enumerate(rpcs):
                    senders.start_soon(send_all, rpc, index)
            connections.cancel_scope.cancel()
        batches = sample("deeperhub_db_batch_size_count") - batches_before

    total = clients * per_client
    assert sum(len(messages) for messages in results.values()) == total
    for channel_id, messages in results.items():
        by_id = sorted(messages, key=lambda m: m["id"])
        assert [m["seq"] for m in by_id] == list(range(1, len(messages) + 1))
        assert all(m["channel_id"] == channel_id for m in messages)
    # Fewer commits than writes: requests that arrived together were grouped,
    # and no batch was larger than database.max_batch.
    assert batches < total
    small = sample("deeperhub_db_batch_size_bucket", {"le": str(float(MAX_BATCH))})
    assert small - small_before == batches
    writes = sample(
        "deeperhub_db_writes_total", {"op": "insert_message", "outcome": "ok"}
    )
    assert writes - writes_before == total

    reader = open_read_connection(settings.db_path)
    stored = reads.messages_after(reader, channels[0], 0, 1000)
    reader.close()
    assert stored == sorted(results[channels[0]], key=lambda m: m["id"])


async def hold_client(
    settings: Settings, *, task_status: trio.TaskStatus[RpcClient]
) -> None:
    """Keep one client connection open until the calling nursery is done with it."""
    async with client(settings) as rpc:
        task_status.started(rpc)
        await trio.sleep_forever()


async def test_failed_op_keeps_concurrent_writes(settings: Settings) -> None:
    """Conflicting registrations fail alone; concurrent distinct ones all commit."""
    outcomes: dict[str, list[str]] = defaultdict(list)

    async with running_writer(settings), client(settings) as rpc:

        async def register(name: str, email: str) -> None:
            try:
                await rpc.call(
                    "register_user", username=name, email=email, password_hash="h"
                )
                outcomes[name].append("ok")
            except RemoteError as exc:
                outcomes[name].append(exc.code)

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(register, "same", f"same{i}@example.com")
                nursery.start_soon(register, f"user{i}", f"user{i}@example.com")

    assert sorted(outcomes["same"]) == ["conflict"] * 9 + ["ok"]
    for i in range(10):
        assert outcomes[f"user{i}"] == ["ok"]
    reader = open_read_connection(settings.db_path)
    assert reader.execute("SELECT count(*) FROM users").fetchall() == [(11,)]
    reader.close()


async def collect_events(
    rpc: RpcClient, count: int, into: list[dict[str, Any]]
) -> None:
    async for event in rpc.events:
        into.append(event)
        if len(into) == count:
            return


async def test_bus_events_reach_subscribers_in_commit_order(
    settings: Settings,
) -> None:
    """Two subscribers get every message event, in the same id and seq order."""
    count = 40
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    replies: list[dict[str, Any]] = []

    async with (
        running_writer(settings),
        client(settings) as sub1,
        client(settings) as sub2,
        client(settings) as broken,
        client(settings) as publisher,
    ):
        for rpc in (sub1, sub2, broken):
            assert await rpc.call("bus_subscribe") == {}
        # A subscriber whose socket is gone must not disturb the others.
        await broken.messages.aclose()
        owner = await make_user(publisher, "alice")
        channel = await make_channel(publisher, "ops", owner)

        async def publish(n: int) -> None:
            result = await publisher.call(
                "insert_message", channel_id=channel, user_id=owner, body=f"m{n}"
            )
            replies.append(result["message"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_events, sub1, count, first)
            nursery.start_soon(collect_events, sub2, count, second)
            for n in range(count):
                nursery.start_soon(publish, n)

    assert first == second
    assert [e["event"] for e in first] == ["message"] * count
    assert [e["topic"] for e in first] == ["channel:ops"] * count
    messages = [e["message"] for e in first]
    assert [m["seq"] for m in messages] == list(range(1, count + 1))
    assert [m["id"] for m in messages] == sorted(m["id"] for m in messages)
    assert messages == sorted(replies, key=lambda m: m["id"])


async def test_slow_subscriber_is_dropped(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that stops reading is disconnected, and nothing else is."""
    conn = open_write_connection(tmp_path / "slow.db")
    apply_migrations(conn)
    server = DbWriterServer(WriteExecutor(conn), max_batch=MAX_BATCH, outbox_size=4)
    ctx = WorkerContext(settings=settings, worker_id="db_writer")
    socket_path = tmp_path / "slow.sock"
    count = 60
    body = "x" * 100_000  # large enough to fill the socket buffers quickly
    received: list[dict[str, Any]] = []

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: server.run(socket_path, ctx, stop_grace=1.0))
            await ctx.is_ready.wait()
            slow = await open_unix_stream(socket_path)
            await slow.send({"id": 1, "op": "bus_subscribe", "args": {}})
            assert await slow.receive() == {"id": 1, "ok": True, "result": {}}

            async with (
                open_rpc_client(socket_path) as good,
                open_rpc_client(socket_path) as publisher,
            ):
                await good.call("bus_subscribe")
                owner = await make_user(publisher, "alice")
                channel = await make_channel(publisher, "ops", owner)
                async with trio.open_nursery() as inner:
                    inner.start_soon(collect_events, good, count, received)
                    for _ in range(count):
                        await publisher.call(
                            "insert_message",
                            channel_id=channel,
                            user_id=owner,
                            body=body,
                        )

            # The slow connection was closed: reading it ends before `count` events.
            slow_events = 0
            try:
                while await slow.receive() is not None:
                    slow_events += 1
            except (trio.BrokenResourceError, ProtocolError):
                pass  # the writer may cut the connection in the middle of a message
            await slow.aclose()
            ctx.stopping.set()
    conn.close()

    assert len(received) == count
    assert slow_events < count
    assert "dropping IPC connection" in caplog.text


async def test_stop_commits_queued_writes(settings: Settings) -> None:
    """After stopping is set, each request already read is committed and replied to."""
    count = MAX_BATCH * 5
    async with running_writer(settings) as ctx:
        async with client(settings) as setup:
            owner = await make_user(setup, "alice")
            channel = await make_channel(setup, "ops", owner)

        stream = await open_unix_stream(settings.socket_path("db"))
        for n in range(count):
            args = {"channel_id": channel, "user_id": owner, "body": f"m{n}"}
            await stream.send({"id": n, "op": "insert_message", "args": args})
        # Requests are read in order, so the ping reply proves all were queued.
        await stream.send({"id": count, "op": "ping", "args": {}})
        replies = []
        while True:
            reply = await stream.receive()
            assert reply is not None
            if reply["id"] == count:
                break
            replies.append(reply)

        ctx.stopping.set()
        while (reply := await stream.receive()) is not None:
            replies.append(reply)
        await stream.aclose()

    assert sorted(reply["id"] for reply in replies) == list(range(count))
    assert all(reply["ok"] for reply in replies)
    assert not settings.socket_path("db").exists()
    reader = open_read_connection(settings.db_path)
    stored = reads.messages_after(reader, channel, 0, 10 * count)
    reader.close()
    assert [m["seq"] for m in stored] == list(range(1, count + 1))


async def test_requests_after_stop_are_rejected(settings: Settings) -> None:
    """A write that arrives once stopping began gets `storage` and is not stored."""
    async with running_writer(settings) as ctx:
        stream = await open_unix_stream(settings.socket_path("db"))
        await stream.send({"id": 1, "op": "ping", "args": {}})
        assert await stream.receive() == {"id": 1, "ok": True, "result": {}}

        ctx.stopping.set()
        await trio.testing.wait_all_tasks_blocked()
        args = {"username": "late", "email": "late@x", "password_hash": "h"}
        try:
            await stream.send({"id": 2, "op": "register_user", "args": args})
            reply = await stream.receive()
        except trio.BrokenResourceError:
            reply = None
        await stream.aclose()

    assert reply is None or reply["error"]["code"] == "storage"
    reader = open_read_connection(settings.db_path)
    assert reader.execute("SELECT count(*) FROM users").fetchall() == [(0,)]
    reader.close()
