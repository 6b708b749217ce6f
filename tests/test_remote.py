"""`bin/deeperhub remote`: the helpers offered to the console and to `eval`."""

from __future__ import annotations

import code
import contextlib
import io
from typing import TYPE_CHECKING

from deeperhub.config import load_settings
from deeperhub.remote import HELP, HelpText, RemoteSession, format_result

from .daemon import Daemon

if TYPE_CHECKING:
    from pathlib import Path


def test_remote_eval_help_prints_helpers(tmp_path: Path) -> None:
    """`remote eval 'help()'` prints the helper list, not Python's help."""
    daemon = Daemon(tmp_path / "var")
    daemon.start()
    try:
        result = daemon.cli("remote", "eval", "help()")
    finally:
        daemon.stop()

    assert result.returncode == 0, result.stderr
    assert result.stdout == HELP
    assert "null" not in result.stdout


def test_help_result_formats_as_text(tmp_path: Path) -> None:
    """format_result prints help() as its lines, without JSON quoting."""
    session = offline_session(tmp_path)
    value = session.namespace()["help"]()

    assert isinstance(value, HelpText)
    assert format_result(value) == HELP.rstrip("\n")
    assert format_result("plain") == '"plain"'


def test_console_help_shows_helpers(tmp_path: Path) -> None:
    """In the interactive console, help() shows the helper list."""
    session = offline_session(tmp_path)
    console = code.InteractiveConsole(locals=session.namespace())
    output = io.StringIO()

    with contextlib.redirect_stdout(output):
        console.push("help()")

    assert output.getvalue() == HELP


def offline_session(tmp_path: Path) -> RemoteSession:
    """Return a session for a data directory where no daemon runs."""
    environ = {
        "DEEPERHUB_VAR_DIR": str(tmp_path / "var"),
        "GUARDIAN_SECRET_KEY": "k" * 40,
    }
    return RemoteSession(load_settings(environ, None, create_dev_key=False))
