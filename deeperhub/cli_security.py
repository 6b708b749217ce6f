"""`bin/deeperhub security ...`: blocks, reputation and alerts of the running daemon.

Every command sends one request to the security monitor over its Unix socket
(`<var_dir>/run/security.sock`). Exit codes: 0 done, 1 the request failed,
2 invalid input, 3 DeeperHub is not running.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from .config import load_settings
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["format_duration", "parse_duration", "parse_since", "security_group"]

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_NOT_RUNNING = 3
EXIT_CONFIG = 78
REQUEST_TIMEOUT = 15.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Return seconds for `90`, `90s`, `15m`, `2h`, `1d`, `1w` or sums like `1h30m`.

    Raises ValueError for anything else or a duration of zero.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif value and _DURATION.sub("", value) == "":
        seconds = sum(
            float(number) * _UNITS[unit] for number, unit in _DURATION.findall(value)
        )
    else:
        raise ValueError(
            f"invalid duration {text!r}: expected seconds or a number with s, m, "
            "h, d or w, such as 90, 15m, 2h or 1h30m"
        )
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be above zero")
    return seconds


def parse_since(text: str, now: datetime | None = None) -> str:
    """Return the stored-time form of `--since`: a duration ago, or an ISO time.

    A date or time without a zone is UTC.
    """
    now = now or datetime.now(UTC)
    try:
        moment = now - timedelta(seconds=parse_duration(text))
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"invalid --since {text!r}: expected a duration such as 1h or 2d, "
                "or an ISO 8601 date or time such as 2026-01-31T12:00:00Z"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_duration(seconds: float | None) -> str:
    """Return `1d 2h`, `14m 59s` or `forever` (None)."""
    if seconds is None:
        return "forever"
    remaining = int(round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= size or (unit == "s" and not parts):
            parts.append(f"{remaining // size}{unit}")
            remaining %= size
    return " ".join(parts[:2])


def _format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _settings() -> Settings:
    try:
        return load_settings(create_dev_key=False)
    except ConfigError as exc:
        click.echo(f"deeperhub: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def _request(op: str, **args: Any) -> Any:
    """Send `op` to the security monitor and return its result, or exit."""
    import trio

    from .ipc import RemoteError, open_rpc_client

    settings = _settings()
    path = settings.socket_path("security")

    async def call() -> Any:
        with trio.fail_after(REQUEST_TIMEOUT):
            async with open_rpc_client(path) as client:
                return await client.call(op, **args)

    try:
        return trio.run(call)
    except OSError as exc:
        click.echo(
            f"DeeperHub is not running: cannot reach the security monitor at {path} "
            f"({exc.strerror or exc})",
            err=True,
        )
        sys.exit(EXIT_NOT_RUNNING)
    except trio.TooSlowError:
        click.echo(
            f"request {op} to the security monitor timed out after "
            f"{REQUEST_TIMEOUT:g} s",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        click.echo(f"connection to the security monitor failed: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except RemoteError as exc:
        click.echo(f"deeperhub security {op}: {exc.message}", err=True)
        sys.exit(EXIT_INVALID if exc.code == "invalid" else EXIT_FAILED)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [
        max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))
    ]
    for row in [header, *rows]:
        click.echo(
            "  ".join(
                str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)
            ).rstrip()
        )


_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group("security")
def security_group() -> None:
    """Inspect and change the IP blocks and alerts of the running daemon."""


@security_group.command("blocked")
@_JSON_OPTION
def blocked(as_json: bool) -> None:
    """List the blocked IPs with reason, expiry and offences."""
    entries = _request("blocked")["blocked"]
    if as_json:
        _echo_json(entries)
        return
    if not entries:
        click.echo("No IP is blocked.")
        return
    rows = [
        [
            entry["ip"],
            entry["reason"] or "-",
            entry["source"],
            _format_time(entry["expires_at"]),
            format_duration(entry["ttl"]),
            str(entry["offences"] or "-"),
            f"{entry['score']:g}",
        ]
        for entry in entries
    ]
    header = ["IP", "REASON", "SOURCE", "EXPIRES (UTC)", "LEFT", "OFFENCES", "SCORE"]
    _table(rows, header)


@security_group.command("block")
@click.argument("ip")
@click.option(
    "--for",
    "duration",
    metavar="DURATION",
    help="How long: seconds, or 15m, 2h, 1d, 1h30m. Default: until unblocked.",
)
@click.option("--reason", default="", help="Note stored with the alert.")
def block(ip: str, duration: str | None, reason: str) -> None:
    """Block IP on every acceptor, now and after restarts."""
    seconds = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--for") from None
    result = _request("block", ip=ip, duration=seconds, reason=reason)
    state = result["reputation"]
    until = (
        "until unblocked"
        if seconds is None
        else f"for {format_duration(seconds)} (until "
        f"{_format_time(state['expires_at'])} UTC)"
    )
    click.echo(f"Blocked {state['ip']} {until}.")
    if not result.get("stored"):
        click.echo(
            "warning: the block is active but not yet stored; it is lost if the "
            "daemon stops before the DB writer stores it",
            err=True,
        )


@security_group.command("unblock")
@click.argument("ip")
def unblock(ip: str) -> None:
    """Lift the block of IP and reset its score and offences."""
    result = _request("unblock", ip=ip)
    if result["unblocked"]:
        click.echo(f"Unblocked {ip}; its score and offences are reset.")
    else:
        click.echo(f"{ip} was not blocked; its score and offences are reset.")


@security_group.command("reputation")
@click.argument("ip")
@_JSON_OPTION
def reputation(ip: str, as_json: bool) -> None:
    """Show the score (0 to 100), risk level, block and offences of IP."""
    state = _request("reputation", ip=ip)["reputation"]
    if as_json:
        _echo_json(state)
        return
    click.echo(f"IP:          {state['ip']}")
    click.echo(f"score:       {state['score']:g} ({state['level']})")
    click.echo(f"allowlisted: {'yes' if state['allowlisted'] else 'no'}")
    if state["blocked"]:
        click.echo(
            f"blocked:     yes, {state['reason']}, {format_duration(state['ttl'])} left"
        )
    else:
        click.echo("blocked:     no")
    click.echo(f"rate limits: x{state['rate_factor']:g}")
    click.echo(f"offences:    {state['offences']}")


@security_group.command("events")
@click.option(
    "--since",
    metavar="WHEN",
    help="Only alerts since WHEN: a duration ago (1h, 2d) or an ISO 8601 time.",
)
@click.option(
    "--severity",
    type=click.Choice(["info", "warning", "critical"]),
    help="Only alerts of this severity or higher.",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Maximum alerts shown, newest first.",
)
@_JSON_OPTION
def events(since: str | None, severity: str | None, limit: int, as_json: bool) -> None:
    """List recorded security alerts, newest first."""
    since_value = None
    if since is not None:
        try:
            since_value = parse_since(since)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    found = _request("events", since=since_value, severity=severity, limit=limit)[
        "events"
    ]
    if as_json:
        _echo_json(found)
        return
    if not found:
        click.echo("No security alerts.")
        return
    rows = [
        [
            str(event["id"]),
            event["inserted_at"][:19].replace("T", " "),
            event["severity"],
            event["type"],
            event["ip"] or "-",
            str(event["user_id"] or "-"),
            str(event["count"]),
            json.dumps(event["details"], sort_keys=True)[:80],
        ]
        for event in found
    ]
    header = ["ID", "TIME (UTC)", "SEVERITY", "TYPE", "IP", "USER", "COUNT", "DETAILS"]
    _table(rows, header)
