"""Hub: subscriptions, presence, broadcasts and per-connection send buffers.

Connections are real `Connection` objects. Their writers send into trio memory
streams, whose bytes are parsed back into frames here.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from deeperhub.config import Settings, load_settings
from deeperhub.phoenix.protocol import VSN_1, VSN_2
from deeperhub.ws.frames import encode_text
from workers.acceptor import hub as hub_module
from workers.acceptor.hub import Connection, Hub, connection_budget

if TYPE_CHECKING:
    from pathlib import Path

TOPIC = "channel:lobby"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    config_file = tmp_path / "empty.toml"
    config_file.write_text("")
    environ = {
        "DEEPERHUB_VAR_DIR": str(tmp_path),
        "GUARDIAN_SECRET_KEY": "hub-test-key-" + "k" * 40,
    }
    loaded = load_settings(environ, config_file, create_dev_key=False)
    values = dict(loaded.values)
    values.update(overrides)
    return Settings(values=values, config_file=config_file)


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into (opcode, payload) pairs."""
    frames = []
    offset = 0
    while offset < len(data):
        first, second = data[offset], data[offset + 1]
        assert first & 0x80, "server frames are never fragmented here"
        length = second & 0x7F
        offset += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, offset)
            offset += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, offset)
            offset += 8
        frames.append((first & 0x0F, data[offset : offset + length]))
        offset += length
    assert offset == len(data)
    return frames


def decode(frames: list[tuple[int, bytes]]) -> list[Any]:
    """Decode text frames as JSON and Close frames as ("close", code, reason)."""
    decoded: list[Any] = []
    for opcode, payload in frames:
        if opcode == 1:
            decoded.append(json.loads(payload))
        elif opcode == 8:
            (code,) = struct.unpack_from("!H", payload)
            decoded.append(("close", code, payload[2:].decode()))
        else:
            decoded.append((opcode, payload))
    return decoded


class Client:
    """A hub connection whose writer sends into a memory stream."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.stream = trio.testing.MemorySendStream()
        self.received = bytearray()

    def start(self, nursery: trio.Nursery) -> Client:
        nursery.start_soon(self.connection.run_writer, self.stream)
        return self

    def messages(self) -> list[Any]:
        """Return every message written since the previous call."""
        try:
            self.received += self.stream.get_data_nowait()
        except trio.WouldBlock:
            pass
        decoded = decode(parse_frames(bytes(self.received)))
        self.received.clear()
        return decoded


def connect(hub: Hub, user_id: int, name: str, vsn: str = VSN_2) -> Connection:
    return hub.open_connection(user_id=user_id, username=name, vsn=vsn)


def join(hub: Hub, connection: Connection, join_ref: str = "1") -> None:
    subscription = hub.subscribe(connection, TOPIC, join_ref)
    hub.track_presence(subscription)
    hub.go_live(subscription)


def stored_message(message_id: int, body: str = "hi") -> dict[str, Any]:
    return {
        "id": message_id,
        "seq": message_id,
        "channel_id": 1,
        "channel": "lobby",
        "user_id": 1,
        "username": "alice",
        "body": body,
        "inserted_at": "2026-12-04T15:40:00.123456Z",
    }


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_presence_state_comes_before_own_diff(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    async with trio.open_nursery() as nursery:
        bob = Client(connect(hub, 2, "bob")).start(nursery)
        join(hub, bob.connection)
        alice = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, alice.connection, join_ref="7")
        await trio.testing.wait_all_tasks_blocked()

        state, diff = alice.messages()
        assert state[3] == "presence_state"
        assert state[0] == "7"
        assert list(state[4]) == ["2"]
        assert diff[3] == "presence_diff"
        assert diff[0] is None
        assert list(diff[4]["joins"]) == ["1"]
        assert diff[4]["leaves"] == {}

        bob_messages = bob.messages()
        assert [message[3] for message in bob_messages] == [
            "presence_state",
            "presence_diff",
            "presence_diff",
        ]
        assert bob_messages[2][4]["joins"]["1"]["metas"][0]["username"] == "alice"
        nursery.cancel_scope.cancel()


async def test_presence_two_tabs_leave_one(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    async with trio.open_nursery() as nursery:
        watcher = Client(connect(hub, 2, "bob")).start(nursery)
        join(hub, watcher.connection)
        tab_one = connect(hub, 1, "alice")
        tab_two = connect(hub, 1, "alice")
        join(hub, tab_one)
        join(hub, tab_two)

        metas = hub.presence_state(TOPIC)["1"]["metas"]
        assert len(metas) == 2
        assert metas[0]["phx_ref"] != metas[1]["phx_ref"]
        assert set(metas[0]) == {"phx_ref", "username", "online_at"}
        await trio.testing.wait_all_tasks_blocked()
        watcher.messages()

        first_ref = metas[0]["phx_ref"]
        hub.remove_connection(tab_one)
        await trio.testing.wait_all_tasks_blocked()

        (diff,) = watcher.messages()
        assert diff[3] == "presence_diff"
        assert diff[4]["joins"] == {}
        left = diff[4]["leaves"]["1"]["metas"]
        assert [meta["phx_ref"] for meta in left] == [first_ref]
        remaining = hub.presence_state(TOPIC)["1"]["metas"]
        assert [meta["phx_ref"] for meta in remaining] == [metas[1]["phx_ref"]]

        hub.remove_connection(tab_two)
        assert "1" not in hub.presence_state(TOPIC)
        nursery.cancel_scope.cancel()


async def test_unsubscribe_is_idempotent(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    connection = connect(hub, 1, "alice")
    join(hub, connection)
    assert hub.unsubscribe(connection, TOPIC) is not None
    assert hub.unsubscribe(connection, TOPIC) is None
    assert hub.subscriber_count(TOPIC) == 0


async def test_subscribe_twice_raises(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    connection = connect(hub, 1, "alice")
    hub.subscribe(connection, TOPIC, "1")
    with pytest.raises(ValueError, match="already joined"):
        hub.subscribe(connection, TOPIC, "2")


async def test_broadcast_encodes_once_per_vsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Hub(make_settings(tmp_path))
    v2 = [connect(hub, user_id, f"user{user_id}") for user_id in (1, 2, 3)]
    v1 = [connect(hub, user_id, f"user{user_id}", VSN_1) for user_id in (4, 5)]
    for connection in v2 + v1:
        join(hub, connection)

    calls: list[str] = []
    real_encode = hub_module.encode_push

    def counting_encode(vsn: str, *args: Any) -> bytes:
        calls.append(vsn)
        return real_encode(vsn, *args)

    queued: dict[int, list[bytes]] = {}
    real_send = Connection.send

    def recording_send(self: Connection, frame: bytes) -> bool:
        queued.setdefault(self.id, []).append(frame)
        return real_send(self, frame)

    monkeypatch.setattr(hub_module, "encode_push", counting_encode)
    monkeypatch.setattr(Connection, "send", recording_send)
    broadcast_before = metric("deeperhub_messages_broadcast_total")
    delivered_before = metric("deeperhub_messages_delivered_total")

    assert hub.broadcast_message(TOPIC, stored_message(10)) == 5

    assert sorted(calls) == [VSN_1, VSN_2]
    v2_frames = [queued[connection.id][0] for connection in v2]
    v1_frames = [queued[connection.id][0] for connection in v1]
    assert v2_frames[0] is v2_frames[1]
    assert v2_frames[1] is v2_frames[2]
    assert v1_frames[0] is v1_frames[1]
    assert v1_frames[0] != v2_frames[0]
    assert metric("deeperhub_messages_broadcast_total") == broadcast_before + 1
    assert metric("deeperhub_messages_delivered_total") == delivered_before + 5


async def test_new_msg_payload_shape(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    async with trio.open_nursery() as nursery:
        client = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, client.connection)
        hub.broadcast_message(TOPIC, stored_message(3, "hello"))
        await trio.testing.wait_all_tasks_blocked()

        push = client.messages()[-1]
        assert push[:4] == [None, None, TOPIC, "new_msg"]
        assert push[4] == {
            "id": 3,
            "seq": 3,
            "channel": "lobby",
            "user_id": 1,
            "username": "alice",
            "body": "hello",
            "inserted_at": "2026-12-04T15:40:00.123456Z",
        }
        nursery.cancel_scope.cancel()


async def test_broadcast_to_topic_without_subscribers(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    assert hub.broadcast_message("channel:empty", stored_message(1)) == 0


async def test_writer_batches_buffered_frames(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    connection = connect(hub, 1, "alice")
    join(hub, connection)
    for message_id in range(1, 6):
        hub.broadcast_message(TOPIC, stored_message(message_id))

    batches: list[bytes] = []

    async def record_batch() -> None:
        batches.append(bytes(stream.get_data_nowait()))

    stream = trio.testing.MemorySendStream(send_all_hook=record_batch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run_writer, stream)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()

    assert len(batches) == 1
    events = [message[3] for message in decode(parse_frames(batches[0]))]
    assert events == ["presence_state", "presence_diff"] + ["new_msg"] * 5
    assert connection.buffered_bytes == 0


async def test_slow_consumer_closed_others_receive(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path, **{"websocket.send_queue_bytes": 4096}))
    drops_before = metric("deeperhub_send_queue_drops_total")
    async with trio.open_nursery() as nursery:
        fast = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, fast.connection)
        slow = connect(hub, 2, "bob")  # its writer never runs
        join(hub, slow)
        await trio.testing.wait_all_tasks_blocked()
        fast.messages()

        body = "x" * 500
        for message_id in range(1, 41):
            hub.broadcast_message(TOPIC, stored_message(message_id, body))
            # Let the fast client's writer drain between broadcasts.
            await trio.testing.wait_all_tasks_blocked()

        assert not slow.is_open
        assert slow.close_code == 1008
        assert slow.close_reason == "slow consumer"
        assert metric("deeperhub_send_queue_drops_total") == drops_before + 1
        ids = [
            message[4]["id"] for message in fast.messages() if message[3] == "new_msg"
        ]
        assert ids == list(range(1, 41))

        # The queued frames were dropped: only the Close frame is left to send.
        slow_client = Client(slow).start(nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert slow_client.messages() == [("close", 1008, "slow consumer")]
        assert slow.close_sent.is_set()
        nursery.cancel_scope.cancel()


async def test_broken_socket_does_not_disturb_others(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))

    class BrokenStream(trio.abc.SendStream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection reset by peer")

        async def wait_send_all_might_not_block(self) -> None:
            await trio.lowlevel.checkpoint()

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        good = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, good.connection)
        broken = connect(hub, 2, "bob")
        join(hub, broken)
        nursery.start_soon(broken.run_writer, BrokenStream())
        await trio.testing.wait_all_tasks_blocked()
        assert broken.close_code == 1006
        assert broken.close_sent.is_set()

        assert hub.broadcast_message(TOPIC, stored_message(1)) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert good.messages()[-1][4]["id"] == 1
        nursery.cancel_scope.cancel()


async def test_pending_join_holds_then_filters(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    async with trio.open_nursery() as nursery:
        client = Client(connect(hub, 1, "alice")).start(nursery)
        subscription = hub.subscribe(client.connection, TOPIC, "1")
        for message_id in (4, 5, 6):
            assert hub.broadcast_message(TOPIC, stored_message(message_id)) == 0
        await trio.testing.wait_all_tasks_blocked()
        assert client.messages() == []

        # The replay sent messages up to 5, so only 6 and later are new.
        hub.go_live(subscription, after_seq=5)
        hub.broadcast_message(TOPIC, stored_message(5))
        hub.broadcast_message(TOPIC, stored_message(7))
        await trio.testing.wait_all_tasks_blocked()
        ids = [message[4]["id"] for message in client.messages()]
        assert ids == [6, 7]
        nursery.cancel_scope.cancel()


async def test_pending_overflow_closes_connection(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path, **{"websocket.send_queue_bytes": 4096}))
    connection = connect(hub, 1, "alice")
    hub.subscribe(connection, TOPIC, "1")
    for message_id in range(1, 20):
        hub.broadcast_message(TOPIC, stored_message(message_id, "y" * 400))
    assert connection.close_code == 1008
    assert connection.close_reason == "slow consumer"


async def test_consume_bus_broadcasts_messages(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    send, receive = trio.open_memory_channel[dict[str, Any]](10)
    async with trio.open_nursery() as nursery:
        client = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, client.connection)
        nursery.start_soon(hub.consume_bus, receive)
        await send.send({"event": "other"})
        await send.send({"event": "message", "topic": TOPIC, "message": "bad"})
        await send.send(
            {"event": "message", "topic": TOPIC, "message": stored_message(8)}
        )
        await send.aclose()
        await trio.testing.wait_all_tasks_blocked()

        pushes = [message for message in client.messages() if message[3] == "new_msg"]
        assert [push[4]["id"] for push in pushes] == [8]
        nursery.cancel_scope.cancel()


async def test_send_paced_waits_for_space(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path, **{"websocket.send_queue_bytes": 4096}))
    connection = connect(hub, 1, "alice")
    frame = encode_text(json.dumps(["z" * 1500]))
    assert await connection.send_paced(frame)
    finished = trio.Event()

    async def second() -> None:
        await connection.send_paced(frame)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not finished.is_set()
        client = Client(connection).start(nursery)
        await finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert len(client.messages()) == 2
        assert connection.is_open
        nursery.cancel_scope.cancel()


async def test_close_all_sends_code_and_waits(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    clients: list[Client] = []

    async def serve(client: Client) -> None:
        await client.connection.close_sent.wait()
        hub.remove_connection(client.connection)

    async with trio.open_nursery() as nursery:
        for user_id in range(1, 6):
            client = Client(connect(hub, user_id, f"user{user_id}")).start(nursery)
            clients.append(client)
            nursery.start_soon(serve, client)
        assert await hub.reserve_slot()
        hub.release_slot()

        with trio.fail_after(5):
            await hub.close_all(1012)

        assert hub.connection_count == 0
        assert hub.shutting_down.is_set()
        assert not await hub.reserve_slot()
        for client in clients:
            assert client.messages() == [("close", 1012, "server restart")]
        nursery.cancel_scope.cancel()


async def test_reserve_slot_enforces_max_connections(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path, **{"server.max_connections": 2}))
    assert await hub.reserve_slot()
    assert await hub.reserve_slot()
    assert not await hub.reserve_slot()
    hub.release_slot()
    assert await hub.reserve_slot()


async def test_direct_write_drains_full_socket(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path, **{"websocket.send_queue_bytes": 1 << 22}))
    server_sock, client_sock = trio.socket.socketpair()
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run_flusher)
        connection = connect(hub, 1, "alice")
        connection.attach(server_sock)
        frames = [encode_text(json.dumps([n, "y" * 2000])) for n in range(200)]
        for frame in frames:
            assert connection.send(frame)
        hub.flush()
        # The kernel took part of it; a drain task owns the rest.
        assert connection.buffered_bytes > 0

        received = bytearray()
        expected = sum(len(frame) for frame in frames)
        with trio.fail_after(5):
            while len(received) < expected:
                received += await client_sock.recv(65536)
        assert bytes(received) == b"".join(frames)
        assert connection.buffered_bytes == 0
        connection.detach()
        nursery.cancel_scope.cancel()
    server_sock.close()
    client_sock.close()


async def test_write_to_closed_socket_aborts_quietly(tmp_path: Path) -> None:
    hub = Hub(make_settings(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run_flusher)
        good = Client(connect(hub, 1, "alice")).start(nursery)
        join(hub, good.connection)
        server_sock, client_sock = trio.socket.socketpair()
        gone = connect(hub, 2, "bob")
        gone.attach(server_sock)
        join(hub, gone)
        client_sock.close()

        for message_id in (1, 2, 3):
            hub.broadcast_message(TOPIC, stored_message(message_id))
            hub.flush()
        await trio.testing.wait_all_tasks_blocked()
        assert gone.close_code == 1006
        assert gone.close_sent.is_set()
        ids = [m[4]["id"] for m in good.messages() if m[3] == "new_msg"]
        assert ids == [1, 2, 3]
        gone.detach()
        nursery.cancel_scope.cancel()
    server_sock.close()


def test_connection_budget_splits_total() -> None:
    shares = [connection_budget(10, 3, f"acceptor-{n}") for n in (1, 2, 3)]
    assert shares == [4, 3, 3]
    assert sum(shares) == 10
    assert connection_budget(10, 1, "acceptor-1") == 10
    assert connection_budget(10, 3, "acceptor") == 10
    assert connection_budget(1, 2, "acceptor-2") == 0


async def test_channel_deleted_event_ends_joins(tmp_path: Path) -> None:
    """A `channel_deleted` bus event closes that channel's joins, not the socket."""
    hub = Hub(make_settings(tmp_path))
    async with trio.open_nursery() as nursery:
        alice = Client(connect(hub, 1, "alice")).start(nursery)
        bob = Client(connect(hub, 2, "bob")).start(nursery)
        for client, join_ref in ((alice, "3"), (bob, "5")):
            subscription = hub.subscribe(client.connection, TOPIC, join_ref, 7)
            subscription.admitted = True
            hub.track_presence(subscription)
            hub.go_live(subscription)
        other = hub.subscribe(alice.connection, "channel:other", "9", 8)
        hub.go_live(other)
        await trio.testing.wait_all_tasks_blocked()
        alice.messages()
        bob.messages()

        # A late event of an earlier channel with the same name changes nothing.
        hub.handle_bus_event(
            {"event": "channel_deleted", "channel_id": 6, "topic": TOPIC}
        )
        assert hub.subscriber_count(TOPIC) == 2

        hub.handle_bus_event(
            {"event": "channel_deleted", "channel_id": 7, "topic": TOPIC}
        )
        await trio.testing.wait_all_tasks_blocked()

        assert alice.messages() == [["3", None, TOPIC, "phx_close", {}]]
        assert bob.messages() == [["5", None, TOPIC, "phx_close", {}]]
        assert hub.subscriber_count(TOPIC) == 0
        assert hub.presence_state(TOPIC) == {}
        assert hub.admission.snapshot()["joins"] == {}
        assert list(alice.connection.subscriptions) == ["channel:other"]
        assert alice.connection.is_open
        assert bob.connection.is_open
        nursery.cancel_scope.cancel()


async def test_join_watch_sees_deletes(tmp_path: Path) -> None:
    """A join in progress learns of deletions of its channel applied meanwhile."""
    hub = Hub(make_settings(tmp_path))
    hub.handle_bus_event({"event": "channel_deleted", "channel_id": 7, "topic": TOPIC})
    with hub.deletes.watch() as watch:
        assert not watch.deleted(TOPIC, 7)
        hub.handle_bus_event(
            {"event": "channel_deleted", "channel_id": 7, "topic": TOPIC}
        )
        assert watch.deleted(TOPIC, 7)
        assert not watch.deleted(TOPIC, 8)
        assert not watch.deleted("channel:other", 7)
    assert hub.deletes.recent == {}
