"""`bin/deeperhub`: the release-style command line.

Exit codes of `status` follow LSB init scripts: 0 running, 1 dead with a
pidfile left, 3 not running. `stop` exits 0 once everything stopped, and also 0
with a message when nothing was running (as LSB asks of `stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .config import load_settings
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["main"]

EXIT_RUNNING = 0
EXIT_DEAD_WITH_PIDFILE = 1
EXIT_NOT_RUNNING = 3
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h

STOP_TIMEOUT = 60.0


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        click.echo(f"deeperhub: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def _start_settings() -> Settings:
    """Set the daemon's umask, load the settings and check the bind address."""
    from supervisor.main import check_bind_address

    # Files the daemon and its workers create (logs, sockets, folders) are then
    # owner-only. The database and key files get 0600 explicitly as well.
    os.umask(0o077)
    settings = _settings()
    try:
        check_bind_address(settings)
    except ConfigError as exc:
        click.echo(f"deeperhub: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return settings


def _read_pid(settings: Settings) -> int | None:
    from supervisor.main import pid_path

    try:
        return int(pid_path(settings).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _query_status(settings: Settings, timeout: float = 3.0) -> dict[str, Any] | None:
    """Return the supervisor's status over its control socket, or None."""
    import trio

    from .ipc import open_rpc_client

    async def query() -> Any:
        with trio.move_on_after(timeout):
            async with open_rpc_client(settings.socket_path("supervisor")) as client:
                return await client.call("status")
        return None

    try:
        result = trio.run(query)
    except OSError:
        return None
    return result if isinstance(result, dict) else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run and operate a DeeperHub daemon.

    Settings come from etc/deeperhub.toml and environment variables such as
    PORT, GUARDIAN_SECRET_KEY and DEEPERHUB_VAR_DIR (see README).
    """


@main.command()
def start() -> None:
    """Run the supervisor and its workers in the foreground (Ctrl-C stops)."""
    os.environ.setdefault("DEEPERHUB_LOG_STDERR", "1")
    settings = _start_settings()
    from supervisor.main import run

    from .logs import RUNTIME_LOG, configure_logging

    configure_logging(settings, RUNTIME_LOG)
    sys.exit(run(settings))


@main.command()
@click.option(
    "--wait",
    "wait_seconds",
    default=60.0,
    show_default=True,
    help="Seconds to wait for every worker to be running.",
)
def daemon(wait_seconds: float) -> None:
    """Start DeeperHub in the background; logs go to <var_dir>/log/."""
    settings = _start_settings()
    pid = _read_pid(settings)
    if pid is not None and _alive(pid):
        click.echo(f"DeeperHub is already running (pid {pid})", err=True)
        sys.exit(2)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["DEEPERHUB_LOG_STDERR"] = "0"
    with (settings.log_dir / "console.log").open("ab") as console:
        process = subprocess.Popen(
            [sys.executable, "-m", "deeperhub.cli", "start"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=console,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            click.echo(
                f"DeeperHub exited during start-up with status {code}; see "
                f"{settings.log_dir}/runtime.log and console.log",
                err=True,
            )
            sys.exit(1)
        status = _query_status(settings, timeout=1.0)
        if status is not None and _all_running(status.get("tree") or {}):
            click.echo(f"DeeperHub started (pid {process.pid})")
            return
        time.sleep(0.2)
    click.echo(f"DeeperHub did not become ready within {wait_seconds:g} s", err=True)
    sys.exit(1)


def _all_running(tree: dict[str, Any]) -> bool:
    """Return whether every child in a status tree, nested ones included, runs."""
    if not tree:
        return False
    for child in tree.values():
        if child.get("state") != "running":
            return False
        if child.get("type") == "supervisor" and not _all_running(
            child.get("children") or {}
        ):
            return False
    return True


def _stop(settings: Settings, reason: str = "shutdown") -> int:
    pid = _read_pid(settings)
    if pid is None or not _alive(pid):
        click.echo("DeeperHub is not running")
        return 0
    if not _request_stop(settings, reason):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(pid):
            click.echo(f"DeeperHub stopped (pid {pid})")
            return 0
        time.sleep(0.1)
    click.echo(
        f"DeeperHub (pid {pid}) did not stop within {STOP_TIMEOUT:g} s", err=True
    )
    return 1


def _request_stop(settings: Settings, reason: str) -> bool:
    """Ask the supervisor to stop over its socket; False if it cannot be reached."""
    import trio

    from .ipc import open_rpc_client

    async def request() -> bool:
        with trio.move_on_after(3):
            async with open_rpc_client(settings.socket_path("supervisor")) as client:
                await client.call("stop", reason=reason)
                return True
        return False

    try:
        return trio.run(request)
    except OSError:
        return False


@main.command()
def stop() -> None:
    """Stop the running daemon and wait until every process has exited."""
    sys.exit(_stop(_settings()))


@main.command()
@click.pass_context
def restart(ctx: click.Context) -> None:
    """Stop the daemon if it runs, then start it in the background."""
    code = _stop(_settings(), reason="restart")
    if code != 0:
        sys.exit(code)
    ctx.invoke(daemon)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Show the supervisor and each worker (exit 0 running, 1 dead, 3 stopped)."""
    settings = _settings()
    pid = _read_pid(settings)
    result = _query_status(settings) if pid is not None and _alive(pid) else None
    if result is None:
        code = EXIT_DEAD_WITH_PIDFILE if pid is not None else EXIT_NOT_RUNNING
        state = "dead (stale pidfile)" if pid is not None else "not running"
        if as_json:
            click.echo(json.dumps({"state": state, "pid": pid}))
        else:
            click.echo(f"DeeperHub is {state}")
        sys.exit(code)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    sup = result["supervisor"]
    click.echo(
        f"DeeperHub {sup['version']} running, supervisor pid {sup['pid']}, "
        f"up {sup['uptime']:.0f} s, memory {_memory(sup['pid'])}"
    )
    _print_tree(result.get("tree") or result["workers"], depth=1)


def _memory(pid: int | None) -> str:
    """Return the resident memory of `pid` from /proc, or "-"."""
    if pid is None:
        return "-"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) / 1024:.1f} MiB"
    except (OSError, ValueError, IndexError):
        pass
    return "-"


def _print_tree(children: dict[str, Any], depth: int) -> None:
    for child_id, child in children.items():
        uptime = child.get("uptime")
        shown = f"{uptime:.0f} s" if uptime is not None else "-"
        indent = "  " * depth
        if child.get("type") == "supervisor":
            click.echo(
                f"{indent}{child_id:<18} {child['state']:<9} supervisor"
                f"{'':<14} restarts {child['restarts']}"
            )
            _print_tree(child.get("children") or {}, depth + 1)
            continue
        click.echo(
            f"{indent}{child_id:<18} {child['state']:<9} pid {child['pid'] or '-':<8} "
            f"up {shown:<8} restarts {child['restarts']:<3} "
            f"memory {_memory(child['pid'])}"
        )


@main.command()
def pid() -> None:
    """Print the supervisor's pid (exit 3 when not running)."""
    settings = _settings()
    value = _read_pid(settings)
    if value is None or not _alive(value):
        click.echo("DeeperHub is not running", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    click.echo(str(value))


@main.command()
def version() -> None:
    """Print the version without contacting the daemon."""
    click.echo(f"DeeperHub {__version__}")


@main.command("gen-secret")
@click.option("--bytes", "length", default=64, show_default=True, help="Random bytes.")
def gen_secret(length: int) -> None:
    """Print a new random secret for GUARDIAN_SECRET_KEY."""
    if length < 32:
        raise click.BadParameter("use at least 32 bytes", param_hint="--bytes")
    click.echo(secrets.token_urlsafe(length))


@main.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (docs/configuration.md) as Markdown."""
    from .configdoc import render_configuration_reference

    click.echo(render_configuration_reference(), nl=False)


@main.group(invoke_without_command=True)
@click.pass_context
def remote(ctx: click.Context) -> None:
    """Open a Python console attached to the running daemon.

    The console offers helpers such as status(), connections(),
    presence("channel:NAME"), disconnect(USER_ID) and block_ip(IP); help()
    lists them. `remote eval EXPR` evaluates one expression and prints it.
    """
    if ctx.invoked_subcommand is not None:
        return
    import code

    from .remote import HELP

    settings = _settings()
    session = _remote_session(settings)
    pid = session.status()["supervisor"]["pid"]
    namespace = session.namespace()
    banner = (
        f"DeeperHub {__version__} remote console, supervisor pid {pid}.\n"
        f"{HELP}Ctrl-D leaves."
    )
    code.interact(banner=banner, local=namespace, exitmsg="")


def _remote_session(settings: Settings) -> Any:
    from .ipc import RemoteError
    from .remote import RemoteSession

    session = RemoteSession(settings)
    try:
        session.status()
    except (OSError, RemoteError, TimeoutError) as exc:
        click.echo(f"DeeperHub is not running ({exc})", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    return session


@remote.command("eval")
@click.argument("expression")
def remote_eval(expression: str) -> None:
    """Evaluate EXPRESSION with the console's helpers and print the result."""
    from .ipc import RemoteError
    from .remote import format_result

    session = _remote_session(_settings())
    try:
        value = eval(expression, session.namespace())  # noqa: S307 (operator input)
    except RemoteError as exc:
        click.echo(f"deeperhub remote: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        click.echo(f"deeperhub remote: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    click.echo(format_result(value))


from .cli_data import backup, restore, tokens  # noqa: E402

main.add_command(tokens)
main.add_command(backup)
main.add_command(restore)

from .cli_security import security_group  # noqa: E402

main.add_command(security_group)

if __name__ == "__main__":
    main(prog_name="deeperhub")
