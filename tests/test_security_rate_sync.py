"""Rate limit usage shared between acceptors: ledger, gates, monitor relay."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import trio

from deeperhub.config import Settings, load_settings
from deeperhub.ipc import open_rpc_client, serve_unix
from deeperhub.phoenix.protocol import PhoenixMessage
from deeperhub.security.clock import SteadyClock
from deeperhub.security.config import alert_config, monitor_config
from deeperhub.security.links import Link
from deeperhub.security.policy import SecurityPolicy
from deeperhub.security.rate_sync import UsageLedger, parse_usage
from workers.acceptor.security_gate import HTTP, SecurityGate
from workers.security_monitor.monitor import Monitor

if TYPE_CHECKING:
    from collections.abc import Iterator

    from deeperhub.storage.reads import ReadPool
    from workers.acceptor.hub import Connection

API_LIMIT = 6
WS_LIMIT = 4


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path, because Unix socket paths are limited."""
    path = Path(tempfile.mkdtemp(prefix="dh-sync-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_settings(var_dir: Path, **overrides: Any) -> Settings:
    environ = {
        "DEEPERHUB_VAR_DIR": str(var_dir),
        "GUARDIAN_SECRET_KEY": "k" * 40,
        "DEEPER_HUB_SECURITY_RATE_LIMIT_API": str(API_LIMIT),
        "DEEPER_HUB_SECURITY_RATE_LIMIT_WS": str(WS_LIMIT),
        "DEEPER_HUB_SECURITY_ALLOWLIST": "192.0.2.0/24",
    }
    settings = load_settings(environ, create_dev_key=False)
    values = dict(settings.values)
    values.update(overrides)
    return Settings(values=values, config_file=None)


def relayed(message: dict[str, Any]) -> dict[str, Any]:
    """Return `message` as it arrives after a trip through JSON."""
    return dict(json.loads(json.dumps(message)))


class FakeConnection:
    """The two attributes of a connection that `SecurityGate.check_message` reads."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.extra: dict[str, Any] = {}


def push(gate: SecurityGate, connection: FakeConnection) -> str | None:
    message = PhoenixMessage("1", "2", "channel:lobby", "new_msg", {"body": "hi"})
    verdict = gate.check_message(cast("Connection", connection), message)
    return None if verdict is None else verdict.reason


# The ledger and the message format.


def test_ledger_counts_per_key_and_resets() -> None:
    ledger = UsageLedger(max_keys=10)
    ledger.add_api("203.0.113.1")
    ledger.add_api("203.0.113.1")
    ledger.add_ws(7, factor=0.5)
    usage = ledger.take()
    assert usage.message() == {
        "event": "usage",
        "api": {"203.0.113.1": 2.0},
        "ws": {"7": 2.0},
    }
    assert not ledger.take()


def test_ledger_bounds_keys() -> None:
    ledger = UsageLedger(max_keys=3)
    for index in range(10):
        ledger.add_api(f"203.0.113.{index}")
    ledger.add_api("203.0.113.0")
    usage = ledger.take()
    assert len(usage.api) == 3
    assert usage.api["203.0.113.0"] == 2.0


def test_parse_usage_skips_invalid_entries() -> None:
    message = {
        "event": "usage",
        "api": {"203.0.113.1": 3, "203.0.113.2": -1, "203.0.113.3": "x"},
        "ws": {"7": 1.5, "user": 1, "8": True, "9": float("inf")},
    }
    usage = parse_usage(message)
    assert usage.api == {"203.0.113.1": 3.0}
    assert usage.ws == {7: 1.5}
    assert not parse_usage({"event": "usage", "api": [], "ws": None})


# Two gates, as two acceptors, with the usage passed by hand.


def test_gate_http_usage_spends_other_gate(short_dir: Path) -> None:
    first = SecurityGate(make_settings(short_dir))
    second = SecurityGate(make_settings(short_dir))
    ip = "203.0.113.10"
    for _ in range(API_LIMIT):
        assert first.check_access(ip, HTTP) is None

    second.apply_usage(relayed(first.usage.take().message()))

    rejection = second.check_access(ip, HTTP)
    assert rejection is not None
    assert rejection.status == 429
    assert second.check_access("203.0.113.11", HTTP) is None


def test_gate_ws_usage_spends_other_gate(short_dir: Path) -> None:
    first = SecurityGate(make_settings(short_dir))
    second = SecurityGate(make_settings(short_dir))
    for _ in range(WS_LIMIT - 1):
        assert push(first, FakeConnection(42)) is None

    second.apply_usage(relayed(first.usage.take().message()))

    assert push(second, FakeConnection(42)) is None
    assert push(second, FakeConnection(42)) == "rate_limited"
    assert push(second, FakeConnection(43)) is None


def test_gate_halved_limit_usage_is_weighted(short_dir: Path) -> None:
    """Usage under a halved limit spends the same share on the other gate."""
    first = SecurityGate(make_settings(short_dir))
    second = SecurityGate(make_settings(short_dir))
    ip = "203.0.113.20"
    decision = {"event": "decision", "ip": ip, "blocked": False, "rate_factor": 0.5}
    for gate in (first, second):
        gate.apply_decision(decision)
    for _ in range(API_LIMIT // 2):
        assert first.check_access(ip, HTTP) is None

    # 3 requests under the halved limit of 3 count 2 each.
    message = relayed(first.usage.take().message())
    assert message["api"] == {ip: float(API_LIMIT)}
    second.apply_usage(message)

    assert second.check_access(ip, HTTP) is not None


def test_gate_allowlisted_ip_not_recorded(short_dir: Path) -> None:
    gate = SecurityGate(make_settings(short_dir))
    for _ in range(API_LIMIT * 2):
        assert gate.check_access("192.0.2.1", HTTP) is None
    assert not gate.usage.take()


def test_gate_rejected_requests_not_recorded(short_dir: Path) -> None:
    gate = SecurityGate(make_settings(short_dir))
    for _ in range(API_LIMIT * 3):
        gate.check_access("203.0.113.30", HTTP)
    assert gate.usage.take().api == {"203.0.113.30": float(API_LIMIT)}


# The monitor's relay over a real Unix socket.


def make_monitor(settings: Settings) -> Monitor:
    config = monitor_config(settings)
    return Monitor(
        SecurityPolicy(config, SteadyClock()),
        config,
        alert_config(settings),
        db=Link(settings.socket_path("db"), "DB writer"),
        alerts=Link(settings.socket_path("alerts"), "alert dispatcher"),
        # The relay never reads from the database.
        reads=cast("ReadPool", None),
    )


async def test_monitor_relays_usage_to_other_subscribers(short_dir: Path) -> None:
    """Usage goes to every other subscribed acceptor, never back to its sender."""
    settings = make_settings(short_dir)
    monitor = make_monitor(settings)
    path = settings.socket_path("security")
    usage = {"event": "usage", "api": {"203.0.113.40": 2}, "ws": {"5": 1}}

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_unix, path, monitor.handle_connection)
            async with (
                open_rpc_client(path) as sender,
                open_rpc_client(path) as receiver,
                open_rpc_client(path) as bystander,
            ):
                await sender.call("subscribe")
                await receiver.call("subscribe")
                await sender.notify(usage)
                # A usage message from a connection that did not subscribe
                # still reaches every subscriber.
                await bystander.notify(usage | {"api": {"203.0.113.41": 1}})

                first = await receiver.events.receive()
                second = await receiver.events.receive()
                assert first == {
                    "event": "usage",
                    "api": {"203.0.113.40": 2.0},
                    "ws": {"5": 1.0},
                }
                assert second["api"] == {"203.0.113.41": 1.0}
                back = await sender.events.receive()
                assert back["api"] == {"203.0.113.41": 1.0}
                with trio.move_on_after(0.2):
                    extra = await sender.events.receive()
                    pytest.fail(f"the sender got its own usage back: {extra}")
                stats = await sender.call("stats")
                assert stats["usage_relayed"] == 2
            nursery.cancel_scope.cancel()


async def test_monitor_ignores_invalid_usage(short_dir: Path) -> None:
    settings = make_settings(short_dir)
    monitor = make_monitor(settings)
    path = settings.socket_path("security")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_unix, path, monitor.handle_connection)
            async with (
                open_rpc_client(path) as sender,
                open_rpc_client(path) as receiver,
            ):
                await receiver.call("subscribe")
                await sender.notify({"event": "usage", "api": {"x": -3}})
                await sender.notify({"event": "usage", "api": {"x": 1}})
                message = await receiver.events.receive()
                assert message["api"] == {"x": 1.0}
                stats = await sender.call("stats")
                assert stats["usage_relayed"] == 1
            nursery.cancel_scope.cancel()
