"""Read queries on read-only connections, and ReadPool."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import trio
from prometheus_client import REGISTRY

from deeperhub.errors import StorageError
from deeperhub.storage import reads
from deeperhub.storage.database import open_read_connection, open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.writes import WriteExecutor

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import apsw


class Hub:
    """A migrated database written through WriteExecutor, with a reader."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = open_write_connection(path)
        apply_migrations(self.writer)
        self.executor = WriteExecutor(self.writer)
        self.reader = open_read_connection(path)

    def write(self, op: str, **args: Any) -> dict[str, Any]:
        (outcome,) = self.executor.execute_batch([(op, args)])
        assert outcome.error is None, outcome.error
        assert outcome.result is not None
        return outcome.result

    def user(self, name: str, email: str | None = None) -> dict[str, Any]:
        result = self.write(
            "register_user",
            username=name,
            email=email or f"{name}@example.com",
            password_hash=f"hash-of-{name}",
        )
        return dict(result["user"])

    def channel(
        self, name: str, owner_id: int, private: bool = False
    ) -> dict[str, Any]:
        result = self.write(
            "create_channel", name=name, owner_id=owner_id, private=private
        )
        return dict(result["channel"])

    def message(self, channel_id: int, user_id: int, body: str) -> dict[str, Any]:
        result = self.write(
            "insert_message", channel_id=channel_id, user_id=user_id, body=body
        )
        return dict(result["message"])

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    store = Hub(tmp_path / "hub.db")
    yield store
    store.close()


def test_user_by_id(hub: Hub) -> None:
    """user_by_id returns the register_user result, or None."""
    alice = hub.user("alice")

    assert reads.user_by_id(hub.reader, alice["id"]) == alice
    assert reads.user_by_id(hub.reader, 999) is None


def test_user_for_login_by_name_or_email(hub: Hub) -> None:
    """A login matches the username or the email in any ASCII case."""
    alice = hub.user("Alice", "Alice@Example.com")
    expected = {
        "id": alice["id"],
        "username": "Alice",
        "email": "Alice@Example.com",
        "password_hash": "hash-of-Alice",
    }

    assert reads.user_for_login(hub.reader, "alice") == expected
    assert reads.user_for_login(hub.reader, "ALICE@example.COM") == expected
    assert reads.user_for_login(hub.reader, "nobody") is None


def test_user_for_login_prefers_matching_kind(hub: Hub) -> None:
    """When a login names two users, `@` picks the email match, else the username."""
    bob = hub.user("bob", "bob@example.com")
    hub.user("bob@example.com", "squatter@example.com")
    carol = hub.user("carol", "carol@example.com")
    hub.user("erin", "carol")

    by_email = reads.user_for_login(hub.reader, "bob@example.com")
    by_name = reads.user_for_login(hub.reader, "carol")

    assert by_email is not None
    assert by_email["id"] == bob["id"]
    assert by_name is not None
    assert by_name["id"] == carol["id"]


def test_channel_lookups(hub: Hub) -> None:
    """Channels are found by id or exact name, with `private` as a bool."""
    alice = hub.user("alice")
    ops = hub.channel("ops", alice["id"], private=True)

    assert reads.channel_by_id(hub.reader, ops["id"]) == ops
    assert reads.channel_by_name(hub.reader, "ops") == ops
    assert reads.channel_by_id(hub.reader, ops["id"])["private"] is True  # type: ignore[index]
    assert reads.channel_by_name(hub.reader, "OPS") is None
    assert reads.channel_by_id(hub.reader, 999) is None


def test_list_channels_for_hides_foreign_private(hub: Hub) -> None:
    """A user sees public channels and the private ones they belong to, by id."""
    alice = hub.user("alice")
    bob = hub.user("bob")
    public = hub.channel("lobby", alice["id"])
    alices = hub.channel("alice-only", alice["id"], private=True)
    shared = hub.channel("shared", alice["id"], private=True)
    bobs = hub.channel("bob-only", bob["id"], private=True)
    hub.write("add_member", channel_id=shared["id"], user_id=bob["id"])

    for_bob = reads.list_channels_for(hub.reader, bob["id"])
    for_alice = reads.list_channels_for(hub.reader, alice["id"])

    assert [c["id"] for c in for_bob] == [public["id"], shared["id"], bobs["id"]]
    assert [c["id"] for c in for_alice] == [public["id"], alices["id"], shared["id"]]
    assert for_bob[0] == public


def test_is_member(hub: Hub) -> None:
    """is_member follows add_member and remove_member."""
    alice = hub.user("alice")
    bob = hub.user("bob")
    ops = hub.channel("ops", alice["id"])

    assert reads.is_member(hub.reader, ops["id"], alice["id"]) is True
    assert reads.is_member(hub.reader, ops["id"], bob["id"]) is False
    hub.write("add_member", channel_id=ops["id"], user_id=bob["id"])
    assert reads.is_member(hub.reader, ops["id"], bob["id"]) is True
    hub.write("remove_member", channel_id=ops["id"], user_id=bob["id"])
    assert reads.is_member(hub.reader, ops["id"], bob["id"]) is False


def test_messages_after_pages_in_id_order(hub: Hub) -> None:
    """messages_after returns insert_message results above an id, oldest first."""
    alice = hub.user("alice")
    ops = hub.channel("ops", alice["id"])
    other = hub.channel("other", alice["id"])
    sent = []
    for i in range(5):
        sent.append(hub.message(ops["id"], alice["id"], f"m{i}"))
        hub.message(other["id"], alice["id"], "noise")

    assert reads.messages_after(hub.reader, ops["id"], 0, 100) == sent
    assert reads.messages_after(hub.reader, ops["id"], 0, 2) == sent[:2]
    assert reads.messages_after(hub.reader, ops["id"], sent[2]["id"], 100) == sent[3:]
    assert reads.messages_after(hub.reader, ops["id"], sent[-1]["id"], 100) == []
    assert reads.messages_after(hub.reader, ops["id"], 0, 0) == []


def test_earliest_message_id(hub: Hub) -> None:
    """earliest_message_id is the smallest id in the channel, None when empty."""
    alice = hub.user("alice")
    ops = hub.channel("ops", alice["id"])
    empty = hub.channel("empty", alice["id"])
    first = hub.message(ops["id"], alice["id"], "a")
    hub.message(ops["id"], alice["id"], "b")

    assert reads.earliest_message_id(hub.reader, ops["id"]) == first["id"]
    assert reads.earliest_message_id(hub.reader, empty["id"]) is None


def test_is_token_revoked(hub: Hub) -> None:
    """is_token_revoked is true once revoke_token recorded the jti."""
    hub.write("revoke_token", jti="gone", expires_at=2_000_000_000)

    assert reads.is_token_revoked(hub.reader, "gone") is True
    assert reads.is_token_revoked(hub.reader, "fine") is False


def test_reader_sees_commits_during_write_transaction(hub: Hub) -> None:
    """WAL lets a reader read committed rows during a write transaction."""
    alice = hub.user("alice")
    hub.writer.execute("BEGIN IMMEDIATE")
    hub.writer.execute(
        "UPDATE users SET username = 'uncommitted' WHERE id = ?", (alice["id"],)
    )

    assert reads.user_by_id(hub.reader, alice["id"]) == alice
    hub.writer.execute("ROLLBACK")


def _read_samples() -> float:
    value = REGISTRY.get_sample_value(
        "deeperhub_db_query_duration_seconds_count", {"kind": "read"}
    )
    return value or 0.0


async def test_read_pool_limits_concurrency(hub: Hub) -> None:
    """ReadPool runs at most `size` queries at once, each on its own connection."""
    alice = hub.user("alice")
    lock = threading.Lock()
    active: set[int] = set()
    peak = 0
    used: set[int] = set()

    def slow_lookup(conn: apsw.Connection, user_id: int) -> dict[str, Any] | None:
        nonlocal peak
        with lock:
            assert id(conn) not in active, "connection lent twice at once"
            active.add(id(conn))
            used.add(id(conn))
            peak = max(peak, len(active))
        time.sleep(0.02)
        with lock:
            active.discard(id(conn))
        return reads.user_by_id(conn, user_id)

    samples_before = _read_samples()
    results: list[Any] = []
    with trio.fail_after(20):
        async with reads.open_read_pool(hub.path, 2) as pool:
            assert pool.size == 2

            async def one() -> None:
                results.append(await pool.run(slow_lookup, alice["id"]))

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)

    assert results == [alice] * 8
    assert peak == 2
    assert len(used) == 2
    assert _read_samples() - samples_before == 8


async def test_read_pool_closed(hub: Hub) -> None:
    """run() on a closed pool raises ClosedResourceError."""
    async with reads.open_read_pool(hub.path, 1) as pool:
        pass

    with pytest.raises(trio.ClosedResourceError):
        await pool.run(reads.user_by_id, 1)


async def test_read_pool_missing_database(tmp_path: Path) -> None:
    """Opening a pool on a missing file raises StorageError."""
    with pytest.raises(StorageError, match="read-only"):
        async with reads.open_read_pool(tmp_path / "missing.db", 2):
            pass
