"""Supervisor strategies, restart types and intensity, in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from deeperhub.errors import SupervisionError
from supervisor.childspec import ChildSpec, Restart, Strategy
from supervisor.tree import Supervisor


class FakeChild:
    """A child living in this process: exits when told, or on terminate."""

    next_pid = 100

    def __init__(self, log: list[str], name: str, ignore_term: bool = False) -> None:
        FakeChild.next_pid += 1
        self.pid: int | None = FakeChild.next_pid
        self.name = name
        self.log = log
        self.ignore_term = ignore_term
        self.status: int | None = None
        self._exited = trio.Event()

    def exit(self, status: int) -> None:
        if self.status is None:
            self.status = status
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.status is not None
        return self.status

    def terminate(self) -> None:
        self.log.append(f"term {self.name}")
        if not self.ignore_term:
            self.exit(0)

    def kill(self) -> None:
        self.log.append(f"kill {self.name}")
        self.exit(-9)


class Harness:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.current: dict[str, FakeChild] = {}
        self.fail_start: set[str] = set()
        self.ignore_term: set[str] = set()

    def spec(
        self,
        name: str,
        restart: Restart = Restart.PERMANENT,
        shutdown: float | None = 1.0,
    ) -> ChildSpec:
        async def start() -> FakeChild:
            if name in self.fail_start:
                self.log.append(f"fail {name}")
                raise RuntimeError(f"{name} cannot start")
            child = FakeChild(self.log, name, name in self.ignore_term)
            self.current[name] = child
            self.log.append(f"start {name}")
            return child

        return ChildSpec(id=name, start=start, restart=restart, shutdown=shutdown)


async def run_tree(
    nursery: trio.Nursery, harness: Harness, specs: list[ChildSpec], **options: object
) -> Supervisor:
    tree = Supervisor(name="test", specs=specs, **options)  # type: ignore[arg-type]
    await nursery.start(tree.run)
    return tree


async def test_start_order_and_reverse_stop(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    specs = [harness.spec(name) for name in ("a", "b", "c")]
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, specs)
        await tree.shutdown()
    assert harness.log == [
        "start a",
        "start b",
        "start c",
        "term c",
        "term b",
        "term a",
    ]


async def test_one_for_one_restarts_only_crashed(
    autojump_clock: trio.abc.Clock,
) -> None:
    harness = Harness()
    specs = [harness.spec(name) for name in ("a", "b", "c")]
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, specs)
        harness.log.clear()
        harness.current["b"].exit(1)
        await trio.testing.wait_all_tasks_blocked()
        assert harness.log == ["start b"]
        assert tree.children["b"].restarts == 1
        assert tree.children["a"].restarts == 0
        await tree.shutdown()


async def test_one_for_all_restarts_everything(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    specs = [harness.spec(name) for name in ("a", "b", "c")]
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, specs, strategy=Strategy.ONE_FOR_ALL)
        harness.log.clear()
        harness.current["b"].exit(1)
        await trio.testing.wait_all_tasks_blocked()
        assert harness.log == ["term c", "term a", "start a", "start b", "start c"]
        await tree.shutdown()


async def test_rest_for_one_restarts_later_children(
    autojump_clock: trio.abc.Clock,
) -> None:
    harness = Harness()
    specs = [harness.spec(name) for name in ("a", "b", "c")]
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, specs, strategy=Strategy.REST_FOR_ONE)
        harness.log.clear()
        harness.current["b"].exit(1)
        await trio.testing.wait_all_tasks_blocked()
        assert harness.log == ["term c", "start b", "start c"]
        await tree.shutdown()


@pytest.mark.parametrize(
    ("restart", "status", "restarted"),
    [
        (Restart.PERMANENT, 0, True),
        (Restart.PERMANENT, 1, True),
        (Restart.TRANSIENT, 0, False),
        (Restart.TRANSIENT, 1, True),
        (Restart.TRANSIENT, -9, True),
        (Restart.TEMPORARY, 1, False),
    ],
)
async def test_restart_types(
    autojump_clock: trio.abc.Clock, restart: Restart, status: int, restarted: bool
) -> None:
    harness = Harness()
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, [harness.spec("a", restart=restart)])
        harness.log.clear()
        harness.current["a"].exit(status)
        await trio.testing.wait_all_tasks_blocked()
        assert (harness.log == ["start a"]) is restarted
        await tree.shutdown()


async def test_intensity_exceeded_stops_all(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    specs = [harness.spec("a"), harness.spec("b")]
    tree = Supervisor(name="test", specs=specs, intensity=2, period=5.0)
    expected = pytest.RaisesExc(
        SupervisionError, match="child b of test crashed repeatedly"
    )
    with pytest.RaisesGroup(expected):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tree.run)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                harness.current["b"].exit(1)
                await trio.testing.wait_all_tasks_blocked()
    assert harness.log[-1] == "term a"
    assert all(child.state == "stopped" for child in tree.children.values())


async def test_restarts_spread_over_period_are_allowed(
    autojump_clock: trio.abc.Clock,
) -> None:
    harness = Harness()
    async with trio.open_nursery() as nursery:
        tree = await run_tree(
            nursery, harness, [harness.spec("a")], intensity=1, period=5.0
        )
        for _ in range(4):
            harness.current["a"].exit(1)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(6)
        assert tree.children["a"].restarts == 4
        await tree.shutdown()


async def test_first_start_failure_stops_started(
    autojump_clock: trio.abc.Clock,
) -> None:
    harness = Harness()
    harness.fail_start.add("c")
    specs = [harness.spec(name) for name in ("a", "b", "c")]
    tree = Supervisor(name="test", specs=specs)
    with pytest.raises(SupervisionError, match="child c failed to start"):
        await tree.run()
    assert harness.log == ["start a", "start b", "fail c", "term b", "term a"]


async def test_shutdown_timeout_then_kill(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    harness.ignore_term.add("a")
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, [harness.spec("a", shutdown=3.0)])
        before = trio.current_time()
        await tree.shutdown()
        assert trio.current_time() - before == pytest.approx(3.0)
    assert harness.log[-2:] == ["term a", "kill a"]


async def test_brutal_kill_skips_terminate(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, [harness.spec("a", shutdown=None)])
        await tree.shutdown()
    assert harness.log == ["start a", "kill a"]


async def test_no_restart_while_stopping(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    specs = [harness.spec("a"), harness.spec("b")]
    async with trio.open_nursery() as nursery:
        tree = await run_tree(nursery, harness, specs)
        harness.log.clear()
        tree.stopping = True
        harness.current["a"].exit(1)
        await tree.shutdown()
    assert "start a" not in harness.log


async def test_failed_restart_backs_off(autojump_clock: trio.abc.Clock) -> None:
    harness = Harness()
    async with trio.open_nursery() as nursery:
        tree = await run_tree(
            nursery, harness, [harness.spec("a")], intensity=100, period=1000.0
        )
        harness.fail_start.add("a")
        before = trio.current_time()
        harness.current["a"].exit(1)
        await trio.sleep(1.0)
        failures = harness.log.count("fail a")
        # 0.1 + 0.2 + 0.4 s of back-off fit in one second: a few tries, not a spin.
        assert 3 <= failures <= 5
        assert trio.current_time() - before == pytest.approx(1.0)
        harness.fail_start.clear()
        await trio.sleep(3)
        assert tree.children["a"].state == "running"
        await tree.shutdown()
