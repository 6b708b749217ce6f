"""Admission of WebSocket connections and joins over several acceptors.

The registry of the DB writer is tested on its own, then two hubs with real
bus clients against an in-process DB writer, including its restart.
"""

from __future__ import annotations

import tempfile
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from deeperhub.config import Settings, load_settings
from deeperhub.ipc import serve_unix
from workers.acceptor import bus as bus_module
from workers.acceptor.bus import BusClient
from workers.acceptor.hub import Hub
from workers.common import WorkerContext
from workers.db_writer.admission import AdmissionRegistry
from workers.db_writer.server import serve as serve_db_writer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    import pytest

    from deeperhub.ipc import MessageStream

STEP_TIMEOUT = 10
MAX_CONNECTIONS = 4
MAX_JOINS_PER_USER = 2


def make_settings(var_dir: Path) -> Settings:
    config_file = var_dir / "deeperhub.toml"
    config_file.write_text(
        f"[server]\nmax_connections = {MAX_CONNECTIONS}\nacceptors = 2\n"
        f"[websocket]\nmax_joins_per_user = {MAX_JOINS_PER_USER}\n"
    )
    environ = {
        "DEEPERHUB_VAR_DIR": str(var_dir),
        "GUARDIAN_SECRET_KEY": "admission-test-key-" + "k" * 40,
    }
    return load_settings(environ, config_file, create_dev_key=False)


# The registry of the DB writer


def test_registry_limits_connections_over_owners() -> None:
    """Connections of all owners count against one limit; drop frees them."""
    registry = AdmissionRegistry(max_connections=3, max_joins_per_user=50)
    first, second = object(), object()
    assert registry.admit_connection(first)
    assert registry.admit_connection(first)
    assert registry.admit_connection(second)
    assert not registry.admit_connection(second)
    assert not registry.admit_connection(first)

    registry.release_connection(first)
    assert registry.admit_connection(second)
    registry.drop(second)
    assert registry.connection_count == 1
    assert registry.admit_connection(first)


def test_registry_counts_distinct_topics_per_user() -> None:
    """A topic held through two owners counts once and is freed by the last."""
    registry = AdmissionRegistry(max_connections=10, max_joins_per_user=2)
    first, second = object(), object()
    assert registry.admit_join(first, "7", "channel:a")
    assert registry.admit_join(second, "7", "channel:b")
    assert not registry.admit_join(second, "7", "channel:c")
    # The same topic again, from either owner, passes at the limit.
    assert registry.admit_join(second, "7", "channel:a")
    # Other users have their own limit.
    assert registry.admit_join(first, "8", "channel:c")

    registry.release_join(first, "7", "channel:a")
    assert registry.topics_of_user(7) == {"channel:a", "channel:b"}
    assert not registry.admit_join(first, "7", "channel:c")
    registry.release_join(second, "7", "channel:a")
    assert registry.topics_of_user(7) == {"channel:b"}
    assert registry.admit_join(first, "7", "channel:c")

    registry.drop(first)
    assert registry.topics_of_user(7) == {"channel:b"}
    assert registry.topics_of_user(8) == set()


def test_registry_sync_replaces_owner_counts() -> None:
    """A sync replaces an owner's counts, even above the limits."""
    registry = AdmissionRegistry(max_connections=2, max_joins_per_user=1)
    owner = object()
    assert registry.admit_connection(owner)
    assert registry.admit_join(owner, "7", "channel:old")
    registry.sync(
        owner,
        {
            "event": "admission_sync",
            "connections": 3,
            "joins": {"7": {"channel:a": 2, "channel:b": 1}},
        },
    )
    assert registry.connection_count == 3
    assert registry.topics_of_user(7) == {"channel:a", "channel:b"}
    assert not registry.admit_connection(owner)
    assert not registry.admit_join(owner, "7", "channel:c")
    assert registry.admit_join(owner, "7", "channel:a")


def test_registry_rejects_invalid_requests() -> None:
    """A join request without an integer user id is an `invalid` error."""
    registry = AdmissionRegistry(max_connections=2, max_joins_per_user=1)
    owner = object()
    outcome = registry.request(owner, "admit_join", {"user_id": "7", "topic": "t"})
    assert outcome.error is not None
    assert outcome.error[0] == "invalid"
    # Releases of what was never admitted change nothing.
    registry.apply_event(owner, {"event": "release_connection"})
    registry.apply_event(owner, {"event": "release_join", "user_id": 7, "topic": "t"})
    assert registry.counts() == {"connections": 0, "topics_by_user": {}}


# The acceptor side, without a DB writer or with a scripted one


class ScriptedBus:
    """Stand-in for `BusClient`: replies with `results` and records the events sent."""

    def __init__(self, results: list[dict[str, Any] | None]) -> None:
        self.session = 1
        self.results = results
        self.sent: list[dict[str, Any]] = []
        self.requested = trio.Event()
        self.answer = trio.Event()
        self.answer.set()

    async def request(
        self, op: str, args: dict[str, Any], *, release: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        self.requested.set()
        await self.answer.wait()
        return self.results.pop(0)

    def send(self, event: dict[str, Any]) -> None:
        self.sent.append(event)


async def test_local_share_without_db_writer(tmp_path: Path) -> None:
    """Without a DB writer reply, an acceptor admits its static share."""
    hub = Hub(make_settings(tmp_path), worker_id="acceptor-1")
    assert await hub.reserve_slot()
    assert await hub.reserve_slot()
    assert not await hub.reserve_slot()
    hub.release_slot()
    assert await hub.reserve_slot()
    assert hub.admission.slots == 2


async def test_db_writer_decides_over_share(tmp_path: Path) -> None:
    """The DB writer's reply wins over the static share in both directions."""
    hub = Hub(make_settings(tmp_path), worker_id="acceptor-1")
    bus = ScriptedBus([{"admitted": True}] * 3 + [{"admitted": False}])
    hub.admission.bus = bus  # type: ignore[assignment]
    for _ in range(3):
        assert await hub.reserve_slot()
    hub.release_slot()
    hub.release_slot()
    assert not await hub.reserve_slot()
    assert hub.admission.slots == 1
    # Only the two releases were sent: a rejection was never counted.
    assert bus.sent == [{"event": "release_connection"}] * 2


async def test_rejection_after_resync_sends_release(tmp_path: Path) -> None:
    """A reservation that a newer sync counted is released when rejected."""
    hub = Hub(make_settings(tmp_path), worker_id="acceptor-1")
    hub.admission.slots = 2  # the share is used up
    bus = ScriptedBus([None])
    bus.answer = trio.Event()
    hub.admission.bus = bus  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        results: list[bool] = []

        async def reserve() -> None:
            results.append(await hub.reserve_slot())

        nursery.start_soon(reserve)
        await bus.requested.wait()
        # The bus resubscribed meanwhile, and its sync counted 3 slots.
        assert hub.admission.snapshot()["connections"] == 3
        bus.session += 1
        bus.answer.set()
    assert results == [False]
    assert hub.admission.slots == 2
    assert bus.sent == [{"event": "release_connection"}]


async def test_cancelled_join_is_undone(tmp_path: Path) -> None:
    """A join cancelled while waiting for the DB writer is not counted."""
    hub = Hub(make_settings(tmp_path), worker_id="acceptor-1")
    bus = ScriptedBus([{"admitted": True}])
    bus.answer = trio.Event()
    hub.admission.bus = bus  # type: ignore[assignment]
    with trio.move_on_after(0.1):
        await hub.admission.admit_join(7, "channel:a")
    assert hub.admission.snapshot()["joins"] == {}
    assert bus.sent == []


async def test_local_join_rule_counts_presence(tmp_path: Path) -> None:
    """Without a DB writer reply, presence and local joins limit the user."""
    hub = Hub(make_settings(tmp_path), worker_id="acceptor-1")
    hub.handle_bus_event(
        {
            "event": "presence",
            "topic": "channel:remote",
            "joins": {"7": {"metas": [{"phx_ref": "r1"}]}},
            "leaves": {},
        }
    )
    admission = hub.admission
    assert await admission.admit_join(7, "channel:a")
    assert not await admission.admit_join(7, "channel:b")
    # Topics the user already has pass at the limit.
    assert await admission.admit_join(7, "channel:a")
    assert await admission.admit_join(7, "channel:remote")
    admission.release_join(7, "channel:a")
    admission.release_join(7, "channel:a")
    assert await admission.admit_join(7, "channel:b")


# Two acceptors' hubs and bus clients against a real DB writer


@asynccontextmanager
async def running_db_writer(settings: Settings) -> AsyncIterator[WorkerContext]:
    ctx = WorkerContext(settings=settings, worker_id="db_writer")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_db_writer, ctx)
        with trio.fail_after(STEP_TIMEOUT):
            await ctx.is_ready.wait()
        yield ctx
        ctx.stopping.set()


async def admission_counts(ctx: WorkerContext) -> dict[str, Any]:
    return dict(await ctx.handlers["admission"]("admission", {}))


async def eventually(attempt: Callable[[], Awaitable[bool]]) -> None:
    """Retry `attempt` every 10 ms until it returns True, or fail.

    A release travels on one bus connection and the next request on another,
    so the DB writer may see them in either order for a moment.
    """
    for _ in range(int(STEP_TIMEOUT / 0.01)):
        if await attempt():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"still false after {STEP_TIMEOUT} s")


async def wait_for_counts(ctx: WorkerContext, expected: dict[str, Any]) -> None:
    async def reached() -> bool:
        return await admission_counts(ctx) == expected

    await eventually(reached)


async def test_two_acceptors_share_limits() -> None:
    """Two hubs' bus clients make both limits exact over the pair."""
    var_dir = Path(tempfile.mkdtemp(prefix="dh-adm-"))
    settings = make_settings(var_dir)
    first = Hub(settings, worker_id="acceptor-1")
    second = Hub(settings, worker_id="acceptor-2")
    async with trio.open_nursery() as nursery:
        async with running_db_writer(settings) as ctx:
            for hub in (first, second):
                await nursery.start(BusClient(settings, hub).run)

            # Three on one acceptor, over its static share of 2.
            for _ in range(3):
                assert await first.reserve_slot()
            assert await second.reserve_slot()
            assert not await second.reserve_slot()
            assert not await first.reserve_slot()
            first.release_slot()
            await eventually(second.reserve_slot)
            assert not await first.reserve_slot()

            # Joins of user 7 on both acceptors.
            assert await first.admission.admit_join(7, "channel:a")
            assert await second.admission.admit_join(7, "channel:b")
            assert not await first.admission.admit_join(7, "channel:c")
            assert await second.admission.admit_join(7, "channel:a")
            first.admission.release_join(7, "channel:a")
            await wait_for_counts(
                ctx,
                {
                    "connections": 4,
                    "topics_by_user": {"7": ["channel:a", "channel:b"]},
                },
            )
            assert not await first.admission.admit_join(7, "channel:c")

        # A restarted DB writer learns the counts from each bus's sync.
        async with running_db_writer(settings) as ctx:
            await wait_for_counts(
                ctx,
                {
                    "connections": 4,
                    "topics_by_user": {"7": ["channel:a", "channel:b"]},
                },
            )
            assert not await first.reserve_slot()
            assert not await second.reserve_slot()
            assert not await first.admission.admit_join(7, "channel:c")
            second.admission.release_join(7, "channel:a")
            await eventually(partial(first.admission.admit_join, 7, "channel:c"))
        nursery.cancel_scope.cancel()


async def test_request_timeout_resubscribes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DB writer that never replies gets the local rule, then a fresh sync."""
    monkeypatch.setattr(bus_module, "REQUEST_TIMEOUT", 0.2)
    var_dir = Path(tempfile.mkdtemp(prefix="dh-adm-"))
    settings = make_settings(var_dir)
    hub = Hub(settings, worker_id="acceptor-1")
    syncs: list[dict[str, Any]] = []
    second_sync = trio.Event()

    async def stuck_db_writer(messages: MessageStream) -> None:
        """Reply to bus_subscribe only, and record each admission_sync."""
        while (message := await messages.receive()) is not None:
            if message.get("op") == "bus_subscribe":
                await messages.send({"id": message["id"], "ok": True, "result": {}})
            elif message.get("event") == "admission_sync":
                syncs.append(message)
                if len(syncs) == 2:
                    second_sync.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, settings.socket_path("db"), stuck_db_writer)
        await nursery.start(BusClient(settings, hub).run)
        with trio.fail_after(STEP_TIMEOUT):
            # The static share of acceptor-1 (2 of 4) decides without a reply.
            assert await hub.reserve_slot()
            await second_sync.wait()
        assert syncs[0]["connections"] == 0
        assert syncs[1]["connections"] == 1
        nursery.cancel_scope.cancel()
