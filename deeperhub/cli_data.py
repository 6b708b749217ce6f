"""`bin/deeperhub tokens`, `backup` and `restore`: data safety commands.

Each command works against a running daemon and while it is stopped. The
instance lock of the data directory (`<var_dir>/run/deeperhub.lock`, held by
the supervisor) distinguishes the two. While the daemon runs, `tokens
revoke-all` and `backup` go to the DB writer over `db.sock`, so open
WebSockets see a revocation at once and the backup is taken online. While it
is stopped, the command holds the lock itself, so that no daemon starts in
the middle, and opens the database directly. `restore` only runs while the
daemon is stopped.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .errors import ConfigError, ProtocolError, StorageError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .config import Settings

__all__ = ["backup", "restore", "tokens"]

EXIT_FAILED = 1
EXIT_RUNNING = 2
EXIT_CONFIG = 78
# Seconds `tokens revoke-all` waits for the DB writer.
REVOKE_TIMEOUT = 30.0


def _settings() -> Settings:
    from .config import load_settings

    try:
        return load_settings(create_dev_key=False)
    except ConfigError as exc:
        click.echo(f"deeperhub: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"deeperhub: {message}", err=True)
    sys.exit(code)


@contextmanager
def _instance_lock(settings: Settings) -> Iterator[bool]:
    """Yield True while holding the data directory's lock, False if a daemon has it."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "deeperhub.lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _call_db_writer(settings: Settings, op: str, timeout: float, **args: Any) -> Any:
    """Send `op` to the running DB writer and return its result.

    Exits with a message when the DB writer cannot be reached or fails.
    """
    import trio

    from .ipc import RemoteError, open_rpc_client

    async def call() -> Any:
        with trio.fail_after(timeout):
            async with open_rpc_client(settings.socket_path("db")) as client:
                return await client.call(op, **args)

    try:
        return trio.run(call)
    except RemoteError as exc:
        _fail(f"{op} failed: {exc.message}")
    except trio.TooSlowError:
        _fail(f"{op} did not finish within {timeout:g} s; see the DB writer's log")
    except (OSError, ProtocolError, trio.BrokenResourceError) as exc:
        _fail(
            f"cannot reach the DB writer at {settings.socket_path('db')}: {exc}; "
            "check `bin/deeperhub status`"
        )


def _open_stopped_database(settings: Settings) -> Any:
    """Open the database of a stopped daemon for writing, with migrations applied."""
    from .storage.database import open_write_connection
    from .storage.migrations import apply_migrations

    conn = open_write_connection(
        settings.db_path,
        synchronous=str(settings["database.synchronous"]),
        busy_timeout_ms=int(settings["database.busy_timeout_ms"]),
        checkpoint_pages=int(settings["database.checkpoint_pages"]),
    )
    apply_migrations(conn)
    return conn


# tokens


@click.group()
def tokens() -> None:
    """Revoke access and refresh tokens."""


def _parse_time(value: str) -> int:
    """Parse `now`, Unix seconds or an ISO 8601 time (UTC unless an offset is given)."""
    text = value.strip()
    if text == "now":
        return int(time.time())
    # isdigit() alone also accepts non-ASCII digits such as "١".
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"invalid time {value!r}: expected now, Unix seconds or ISO 8601 such "
            "as 2026-12-04T15:00:00Z",
            param_hint="--before",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


@tokens.command("revoke-all")
@click.option(
    "--before",
    default="now",
    show_default=True,
    help="Revoke tokens issued before this time: now, Unix seconds or ISO 8601.",
)
@click.option(
    "--user",
    "user_id",
    # Up to the largest SQLite integer, the range of user ids.
    type=click.IntRange(min=1, max=2**63 - 1),
    default=None,
    help="Only this user's tokens.",
)
def revoke_all(before: str, user_id: int | None) -> None:
    """Revoke every access and refresh token issued before a time.

    Open WebSockets whose token is revoked close with 1008 within a second.
    Users log in again to get new tokens.
    """
    cutoff = _parse_time(before)
    if cutoff > time.time() + 1:
        raise click.BadParameter(
            f"{before!r} is in the future: it would also reject tokens issued "
            "until then",
            param_hint="--before",
        )
    settings = _settings()
    args: dict[str, Any] = {"before": cutoff}
    if user_id is not None:
        args["user_id"] = user_id

    with _instance_lock(settings) as stopped:
        if stopped:
            result = _revoke_all_stopped(settings, args)
        else:
            result = _call_db_writer(settings, "revoke_all", REVOKE_TIMEOUT, **args)
    in_force = datetime.fromtimestamp(int(result["before"]), UTC)
    scope = f"of user {user_id}" if user_id is not None else "of every user"
    click.echo(
        f"revoked every token {scope} issued before {in_force:%Y-%m-%dT%H:%M:%SZ}"
    )


def _revoke_all_stopped(settings: Settings, args: dict[str, Any]) -> dict[str, Any]:
    from .storage.writes import WriteExecutor

    try:
        conn = _open_stopped_database(settings)
    except StorageError as exc:
        _fail(exc.message)
    try:
        (outcome,) = WriteExecutor(conn).execute_batch([("revoke_all", args)])
    finally:
        conn.close()
    if outcome.error is not None:
        _fail(f"revoke-all failed: {outcome.error[1]}")
    assert outcome.result is not None
    return outcome.result


# backup and restore


@click.command()
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the backup [default: backup.dir, <var_dir>/backups].",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="Backups to keep in the folder; older ones are deleted "
    "[default: backup.keep, 30].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def backup(dest: Path | None, keep: int | None, as_json: bool) -> None:
    """Write a checked, gzip-compressed copy of the database.

    With the daemon running, the DB writer takes the copy online while writes
    go on.
    """
    from .storage.backup import create_backup

    settings = _settings()
    dest_dir = (dest or Path(settings["backup.dir"])).expanduser().resolve()
    keep_count = keep if keep is not None else int(settings["backup.keep"])

    with _instance_lock(settings) as stopped:
        if stopped:
            try:
                result = create_backup(settings.db_path, dest_dir, keep=keep_count)
            except StorageError as exc:
                _fail(exc.message)
            summary = result.to_dict()
        else:
            summary = _call_db_writer(
                settings,
                "backup",
                float(settings["backup.timeout"]),
                dest=str(dest_dir),
                keep=keep_count,
            )
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"backup written to {summary['path']} ({summary['compressed_bytes']} bytes "
        f"compressed, {summary['database_bytes']} bytes of database, "
        f"{summary['seconds']:.2f} s)"
    )
    for path in summary["pruned"]:
        click.echo(f"deleted old backup {path}")


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def restore(file: Path) -> None:
    """Replace the database with the backup FILE (.db.gz or plain SQLite).

    Rejected while the daemon runs. FILE is checked first; the current
    database is kept next to it as <name>.before-restore-<time>.
    """
    from .storage.backup import restore_backup

    settings = _settings()
    with _instance_lock(settings) as stopped:
        if not stopped:
            _fail(
                f"DeeperHub is running on {settings.var_dir}: stop it with "
                "`bin/deeperhub stop`, then restore",
                EXIT_RUNNING,
            )
        try:
            result = restore_backup(file.resolve(), settings.db_path)
        except StorageError as exc:
            _fail(exc.message)
    click.echo(
        f"restored {result.database} from {file} (schema version "
        f"{result.schema_version})"
    )
    if result.previous:
        click.echo(f"the previous database was moved to {result.previous}")
