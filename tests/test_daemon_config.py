"""Invalid start-up settings exit 78 with a message, on the real `start` command."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .daemon import Daemon

if TYPE_CHECKING:
    from pathlib import Path

EXIT_CONFIG = 78


def start_with(tmp_path: Path, **env: str) -> tuple[int, str]:
    """Run `deeperhub start` with `env` and return its exit status and stderr."""
    instance = Daemon(tmp_path / "var", env=env)
    result = instance.cli("start", timeout=30)
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DEEPERHUB_HOST", "999.1.1.1", "an IPv4 or IPv6 address, or a host name"),
        ("PORT", "0", "an integer from 1 to 65535"),
    ],
)
def test_start_rejects_invalid_value(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    code, stderr = start_with(tmp_path, **{variable: value})
    assert code == EXIT_CONFIG, stderr
    assert variable in stderr
    assert repr(value) in stderr
    assert expected in stderr
    assert "Traceback" not in stderr


def test_start_rejects_address_of_other_host(tmp_path: Path) -> None:
    """An address this machine does not have fails before any worker starts."""
    # 192.0.2.0/24 is TEST-NET-1, reserved for documentation (RFC 5737).
    code, stderr = start_with(tmp_path, DEEPERHUB_HOST="192.0.2.1")
    assert code == EXIT_CONFIG, stderr
    assert "DEEPERHUB_HOST" in stderr
    assert "'192.0.2.1'" in stderr
    assert "cannot bind" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "var" / "db").exists()


def test_start_rejects_database_directory(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    code, stderr = start_with(tmp_path, DEEPER_HUB_DB_PATH=str(folder))
    assert code == EXIT_CONFIG, stderr
    assert "DEEPER_HUB_DB_PATH" in stderr
    assert "is a directory" in stderr
    assert "Traceback" not in stderr


def test_daemon_command_rejects_invalid_host(tmp_path: Path) -> None:
    instance = Daemon(tmp_path / "var", env={"DEEPERHUB_HOST": "192.0.2.1"})
    result = instance.cli("daemon", "--wait", "20", timeout=30)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "DEEPERHUB_HOST" in result.stderr
    assert "cannot bind" in result.stderr
