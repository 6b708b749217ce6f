"""`bin/deeperhub security ...` against a running daemon, and its parsers."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from deeperhub.cli_security import format_duration, parse_duration, parse_since

from .daemon import Daemon
from .security_helpers import open_daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with open_daemon() as running:
        yield running


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
     ("1h30m", 5400), ("1w", 604800), ("0.5", 0.5)],
)  # fmt: skip
def test_parse_duration_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "-5", "0", "1h-2m", "h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_since_forms() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert parse_since("1h", now) == "2026-12-04T11:00:00.000000Z"
    assert parse_since("2026-12-01", now) == "2026-12-01T00:00:00.000000Z"
    assert parse_since("2026-12-01T10:30:00+02:00", now) == (
        "2026-12-01T08:30:00.000000Z"
    )
    with pytest.raises(ValueError, match="invalid --since"):
        parse_since("yesterday", now)


def test_format_duration_two_units() -> None:
    assert format_duration(None) == "forever"
    assert format_duration(0) == "0s"
    assert format_duration(899.6) == "15m"
    assert format_duration(93784) == "1d 2h"


def test_block_lifecycle(daemon: Daemon) -> None:
    blocked = daemon.cli("security", "block", "198.51.100.5", "--for", "2h")
    assert blocked.returncode == 0, blocked.stderr
    assert blocked.stdout.startswith("Blocked 198.51.100.5 for 2h (until ")

    listed = daemon.cli("security", "blocked")
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["IP", "REASON", "SOURCE"]
    assert row.split()[:3] == ["198.51.100.5", "manual_block", "manual"]

    shown = daemon.cli("security", "reputation", "198.51.100.5", "--json")
    state = json.loads(shown.stdout)
    assert state["blocked"] is True
    assert state["score"] == pytest.approx(80, abs=0.5)
    assert 7190 < state["ttl"] <= 7200

    events = daemon.cli("security", "events", "--since", "1h", "--json")
    (event,) = json.loads(events.stdout)
    assert event["type"] == "manual_block"
    warnings = daemon.cli("security", "events", "--severity", "warning")
    assert warnings.stdout.strip() == "No security alerts."

    unblocked = daemon.cli("security", "unblock", "198.51.100.5")
    assert unblocked.returncode == 0
    assert unblocked.stdout.startswith("Unblocked 198.51.100.5")
    assert daemon.cli("security", "blocked").stdout.strip() == "No IP is blocked."
    again = daemon.cli("security", "unblock", "198.51.100.5")
    assert "was not blocked" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("block", "not-an-ip"), "invalid IP address 'not-an-ip'"),
        (("block", "198.51.100.6", "--for", "soon"), "invalid duration 'soon'"),
        (("reputation", "300.1.2.3"), "invalid IP address"),
        (("events", "--since", "whenever"), "invalid --since"),
    ],
)
def test_invalid_input_exit_2(
    daemon: Daemon, args: tuple[str, ...], message: str
) -> None:
    result = daemon.cli("security", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_not_running_exit_3() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dh-cli-"))
    try:
        idle = Daemon(folder / "var")
        result = idle.cli("security", "blocked")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 3
    assert "DeeperHub is not running" in result.stderr
