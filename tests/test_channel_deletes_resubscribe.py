"""Channels deleted while the acceptor is not subscribed to the bus.

The DB writer publishes `channel_deleted` only to the bus connections open at
the commit. A fake DB writer on the real socket path replaces it and never
publishes the event, while the channel rows are deleted in a real
SQLite file that the acceptor reads through its read pool.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import trio
import trio.testing

from deeperhub.storage.database import open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.reads import open_read_pool
from deeperhub.storage.writes import WriteExecutor
from workers.acceptor.bus import BusClient
from workers.acceptor.hub import Hub

from .test_fanout_reconnect import reset, serve_fake_db_writer, settings_in
from .test_hub import Client, connect, make_settings

if TYPE_CHECKING:
    from deeperhub.ipc import MessageStream
    from deeperhub.storage.reads import ReadPool

LOBBY = "channel:lobby"
OTHER = "channel:other"
OLD = "channel:old"


def write(executor: WriteExecutor, op: str, **args: Any) -> dict[str, Any]:
    (outcome,) = executor.execute_batch([(op, args)])
    assert outcome.error is None, outcome.error
    assert outcome.result is not None
    return outcome.result


def closed_topics(messages: list[Any]) -> dict[str, str]:
    """Return {topic: join_ref} of the `phx_close` pushes among `messages`."""
    return {m[2]: m[0] for m in messages if m[3] == "phx_close"}


async def test_resubscription_ends_joins_of_deleted_channels() -> None:
    """Joins of a channel deleted while unsubscribed end after resubscribing."""
    with tempfile.TemporaryDirectory(prefix="dh-resubscribe-") as tmp:
        settings = settings_in(Path(tmp))
        writer = open_write_connection(settings.db_path)
        apply_migrations(writer)
        executor = WriteExecutor(writer)
        owner = write(
            executor,
            "register_user",
            username="alice",
            email="alice@example.com",
            password_hash="hash-of-alice",
        )["user"]
        channel_ids = {
            name: write(
                executor,
                "create_channel",
                name=name,
                owner_id=owner["id"],
                private=False,
            )["channel"]["id"]
            for name in ("lobby", "other", "old")
        }

        hub = Hub(settings)
        drop = trio.Event()
        subscriptions = 0

        async def handler(messages: MessageStream, number: int) -> None:
            nonlocal subscriptions
            request = await messages.receive()
            assert request is not None
            assert request["op"] == "bus_subscribe"
            await messages.send({"id": request["id"], "ok": True, "result": {}})
            subscriptions = number
            if number == 1:
                await drop.wait()
                reset(messages.stream)  # type: ignore[arg-type]
                return
            # Reads the acceptor's syncs and releases. It never sends an event.
            while await messages.receive() is not None:
                pass

        async with (
            open_read_pool(settings.db_path, 1) as pool,
            trio.open_nursery() as nursery,
        ):
            client = Client(connect(hub, owner["id"], "alice")).start(nursery)
            for join_ref, topic in (("1", LOBBY), ("2", OTHER), ("3", OLD)):
                channel_id = channel_ids[topic.removeprefix("channel:")]
                subscription = hub.subscribe(
                    client.connection, topic, join_ref, channel_id
                )
                assert await hub.admission.admit_join(owner["id"], topic)
                subscription.admitted = True
                hub.track_presence(subscription)
                hub.go_live(subscription)
            await nursery.start(
                serve_fake_db_writer, settings.socket_path("db"), handler
            )
            await nursery.start(BusClient(settings, hub, pool).run)
            await trio.testing.wait_all_tasks_blocked()
            client.messages()

            # Deleted with no event, and `old`'s id now names another channel.
            write(
                executor,
                "delete_channel",
                channel_id=channel_ids["lobby"],
                user_id=owner["id"],
            )
            writer.execute(
                "UPDATE channels SET name = 'renamed' WHERE id = ?",
                (channel_ids["old"],),
            )
            drop.set()

            closed: dict[str, str] = {}
            with trio.fail_after(5):
                while len(closed) < 2:
                    closed |= closed_topics(client.messages())
                    await trio.sleep(0.02)

            assert subscriptions == 2
            assert closed == {LOBBY: "1", OLD: "3"}
            assert list(client.connection.subscriptions) == [OTHER]
            assert hub.presence_state(LOBBY) == {}
            assert hub.presence_state(OLD) == {}
            assert hub.presence_state(OTHER) != {}
            assert hub.admission.snapshot()["joins"] == {str(owner["id"]): {OTHER: 1}}
            assert client.connection.is_open
            nursery.cancel_scope.cancel()
        writer.close()


class ChannelNames:
    """A read pool stand-in that returns the same `channel_names` result."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.calls: list[tuple[Any, ...]] = []

    async def run(self, fn: Any, *args: Any) -> dict[int, str]:
        self.calls.append(args)
        return self.names


async def test_check_waits_for_earlier_joins(tmp_path: Path) -> None:
    """The check reads only after joins begun before the resubscription end."""
    hub = Hub(make_settings(tmp_path))
    pool = ChannelNames({8: "other"})
    async with trio.open_nursery() as nursery:
        alice = Client(connect(hub, 1, "alice")).start(nursery)
        bob = Client(connect(hub, 2, "bob")).start(nursery)
        hub.subscribe(bob.connection, LOBBY, "5", 7)
        hub.subscribe(bob.connection, OTHER, "6", 8)

        with hub.deletes.watch():
            nursery.start_soon(hub.deletes.check_joins, cast("ReadPool", pool))
            await trio.testing.wait_all_tasks_blocked()
            assert pool.calls == []
            # A join that read its channel before the resubscription.
            hub.subscribe(alice.connection, LOBBY, "4", 7)
        await trio.testing.wait_all_tasks_blocked()

        assert pool.calls == [([7, 8],)]
        assert closed_topics(alice.messages()) == {LOBBY: "4"}
        assert closed_topics(bob.messages()) == {LOBBY: "5"}
        assert list(bob.connection.subscriptions) == [OTHER]
        nursery.cancel_scope.cancel()
