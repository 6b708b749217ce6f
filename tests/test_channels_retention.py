"""Retention ops of the DB writer and the replay window read, on SQLite files."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from deeperhub.storage import reads
from deeperhub.storage.database import open_read_connection, open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.writes import WriteExecutor
from workers.db_writer.retention import run_retention

from .test_fanout_reconnect import serve_fake_db_writer
from .test_hub import make_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from deeperhub.ipc import MessageStream

START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class Store:
    """A migrated database with a settable clock."""

    def __init__(self, path: Path) -> None:
        self.now = START
        self.writer = open_write_connection(path)
        apply_migrations(self.writer)
        self.executor = WriteExecutor(self.writer, clock=lambda: self.now)
        self.reader = open_read_connection(path)
        owner = self.write(
            "register_user", username="owner", email="o@example.com", password_hash="h"
        )
        self.owner = owner["user"]["id"]

    def run(self, op: str, **args: Any) -> Any:
        (outcome,) = self.executor.execute_batch([(op, args)])
        return outcome

    def write(self, op: str, **args: Any) -> dict[str, Any]:
        outcome = self.run(op, **args)
        assert outcome.error is None, outcome.error
        return dict(outcome.result)

    def channel(self, name: str) -> int:
        result = self.write(
            "create_channel", name=name, owner_id=self.owner, private=False
        )
        return int(result["channel"]["id"])

    def publish(self, channel_id: int, count: int) -> list[dict[str, Any]]:
        sent = []
        for n in range(count):
            result = self.write(
                "insert_message",
                channel_id=channel_id,
                user_id=self.owner,
                body=f"m{n}",
            )
            sent.append(result["message"])
            self.now += timedelta(seconds=1)
        return sent

    def prune(self, **defaults: int) -> dict[str, Any]:
        args = {"max_messages": 0, "max_age": 0, "limit": 1000, **defaults}
        return self.write("prune_messages", **args)

    def stored_seqs(self, channel_id: int) -> list[int]:
        rows = self.reader.execute(
            "SELECT seq FROM messages WHERE channel_id = ? ORDER BY seq", (channel_id,)
        ).fetchall()
        return [row[0] for row in rows]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    instance = Store(tmp_path / "hub.db")
    yield instance
    instance.reader.close()
    instance.writer.close()


def test_prune_default_count(store: Store) -> None:
    channel = store.channel("a")
    store.publish(channel, 10)
    assert store.prune(max_messages=4) == {"deleted": 6, "more": False}
    assert store.stored_seqs(channel) == [7, 8, 9, 10]
    assert store.prune(max_messages=4) == {"deleted": 0, "more": False}


def test_prune_in_batches(store: Store) -> None:
    channel = store.channel("a")
    store.publish(channel, 10)
    assert store.prune(max_messages=1, limit=4) == {"deleted": 4, "more": True}
    assert store.prune(max_messages=1, limit=4) == {"deleted": 4, "more": True}
    assert store.prune(max_messages=1, limit=4) == {"deleted": 1, "more": False}
    assert store.stored_seqs(channel) == [10]


def test_prune_by_age(store: Store) -> None:
    channel = store.channel("a")
    store.publish(channel, 5)  # stamped START .. START + 4 s
    store.now = START + timedelta(seconds=10)
    # Older than 8 s: the messages stamped at START and START + 1 s. The one
    # at START + 2 s is exactly 8 s old and stays.
    assert store.prune(max_age=8)["deleted"] == 2
    assert store.stored_seqs(channel) == [3, 4, 5]


def test_channel_override_beats_default(store: Store) -> None:
    kept = store.channel("kept")
    trimmed = store.channel("trimmed")
    store.publish(kept, 5)
    store.publish(trimmed, 5)
    store.write(
        "set_channel_retention",
        channel_id=kept,
        user_id=store.owner,
        max_messages=0,
        max_age=None,
    )
    store.write(
        "set_channel_retention",
        channel_id=trimmed,
        user_id=store.owner,
        max_messages=2,
        max_age=None,
    )
    store.prune(max_messages=3)
    assert store.stored_seqs(kept) == [1, 2, 3, 4, 5]
    assert store.stored_seqs(trimmed) == [4, 5]
    assert reads.channel_retention(store.reader, trimmed) == {
        "max_messages": 2,
        "max_age": None,
    }


def test_set_retention_checks(store: Store) -> None:
    channel = store.channel("a")
    other = store.write(
        "register_user", username="other", email="x@example.com", password_hash="h"
    )["user"]["id"]
    outcome = store.run(
        "set_channel_retention", channel_id=channel, user_id=other, max_messages=1
    )
    assert outcome.error[0] == "forbidden"
    outcome = store.run(
        "set_channel_retention", channel_id=channel, user_id=store.owner, max_age=-1
    )
    assert outcome.error[0] == "invalid"
    outcome = store.run(
        "set_channel_retention", channel_id=999, user_id=store.owner, max_age=1
    )
    assert outcome.error[0] == "not_found"


def test_replay_window_complete(store: Store) -> None:
    channel = store.channel("a")
    sent = store.publish(channel, 5)
    window = reads.replay_window(
        store.reader, channel, after_id=sent[1]["id"], limit=10
    )
    assert [m["id"] for m in window["messages"]] == [m["id"] for m in sent[2:]]
    assert window["complete"] is True
    assert window["pruned"] is False
    assert window["last_seq"] == 5
    assert window["earliest_id"] == sent[0]["id"]


def test_replay_window_limit_keeps_newest(store: Store) -> None:
    channel = store.channel("a")
    sent = store.publish(channel, 8)
    window = reads.replay_window(store.reader, channel, after_seq=0, limit=3)
    assert [m["seq"] for m in window["messages"]] == [6, 7, 8]
    assert window["complete"] is False
    assert window["pruned"] is False
    assert window["earliest_seq"] == 1
    assert sent[-1]["seq"] == window["last_seq"]


def test_replay_window_reports_pruned(store: Store) -> None:
    channel = store.channel("a")
    sent = store.publish(channel, 6)
    store.prune(max_messages=2)
    by_id = reads.replay_window(store.reader, channel, after_id=sent[0]["id"], limit=50)
    by_seq = reads.replay_window(store.reader, channel, after_seq=1, limit=50)
    for window in (by_id, by_seq):
        assert window["pruned"] is True
        assert window["complete"] is False
        assert window["earliest_id"] == sent[4]["id"]
        assert [m["seq"] for m in window["messages"]] == [5, 6]
    # A client that saw everything up to the oldest kept message lost nothing.
    after = reads.replay_window(store.reader, channel, after_id=sent[4]["id"], limit=50)
    assert after["pruned"] is False
    assert after["complete"] is True


def test_replay_window_unknown_channel(store: Store) -> None:
    with pytest.raises(LookupError):
        reads.replay_window(store.reader, 999, after_id=0, limit=5)
    with pytest.raises(ValueError, match="exactly one"):
        reads.replay_window(store.reader, 1, limit=5)


async def test_retention_runner_survives_errors() -> None:
    with tempfile.TemporaryDirectory(prefix="dh-prune-") as tmp:
        directory = Path(tmp)
        (directory / "run").mkdir()
        settings = make_settings(directory, **{"retention.interval": 0.01})
        calls: list[dict[str, Any]] = []
        pruned = trio.Event()

        async def handler(messages: MessageStream, number: int) -> None:
            request = await messages.receive()
            while request is not None:
                calls.append(request)
                if len(calls) == 1:
                    error = {"code": "storage", "message": "disk full"}
                    reply = {"id": request["id"], "ok": False, "error": error}
                else:
                    reply = {
                        "id": request["id"],
                        "ok": True,
                        "result": {"deleted": 1, "more": len(calls) == 2},
                    }
                    if len(calls) == 3:
                        pruned.set()
                await messages.send(reply)
                request = await messages.receive()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_fake_db_writer, settings.socket_path("db"), handler
            )
            nursery.start_soon(run_retention, settings)
            with trio.fail_after(5):
                await pruned.wait()
            nursery.cancel_scope.cancel()
        assert [call["op"] for call in calls[:3]] == ["prune_messages"] * 3
        assert calls[0]["args"] == {"max_messages": 0, "max_age": 0, "limit": 1000}
