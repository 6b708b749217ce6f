"""Settings: defaults, `etc/deeperhub.toml`, then environment variables.

Every setting is declared once in `SETTINGS`, with its TOML key, its environment
variable (if any), its type, its allowed range and its help text. The loader,
the validation messages and the configuration reference in the docs all come
from that table, so they cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .security.config import validate_security_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "PROJECT_ROOT",
    "SETTINGS",
    "Setting",
    "Settings",
    "load_settings",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MIN_PROD_KEY_BYTES = 32


@dataclass(frozen=True)
class Setting:
    """One configurable value: where it is read from and what it may be."""

    key: str  # "section.name" in etc/deeperhub.toml
    kind: type  # int, float, str, bool, or tuple (a list of strings)
    default: Any
    help: str
    env: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False
    # A further check of a string value, and the description of what it accepts.
    check: Callable[[str], bool] | None = None
    allowed: str | None = None

    def describe_allowed(self) -> str:
        """Return what values are allowed, for error messages and docs."""
        if self.allowed is not None:
            return self.allowed
        if self.kind is tuple:
            if self.choices:
                return "a list of " + ", ".join(self.choices)
            return "a list of strings (TOML array, or comma-separated)"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            if self.minimum is not None and self.maximum is not None:
                return f"{noun} from {_number(self.minimum)} to {_number(self.maximum)}"
            if self.minimum is not None:
                return f"{noun} of at least {_number(self.minimum)}"
            return noun
        return "a string"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _s(key: str, kind: type, default: Any, help: str, **extra: Any) -> Setting:
    return Setting(key=key, kind=kind, default=default, help=help, **extra)


# One label of a host name (RFC 1123): letters, digits and inner hyphens.
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_host(value: str) -> bool:
    """Return whether `value` is an IP address or a syntactically valid host name.

    A name whose last label is all digits is rejected, because it is a
    mistyped IPv4 address such as 999.1.1.1 rather than a name.
    """
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return True
    labels = value.removesuffix(".").split(".")
    if len(value) > 253 or labels[-1].isdigit():
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels)


SETTINGS: tuple[Setting, ...] = (
    _s(
        "server.env",
        str,
        "dev",
        "Deployment mode; `prod` makes a strong key mandatory.",
        env="DEEPERHUB_ENV",
        choices=("dev", "prod"),
    ),
    _s(
        "server.var_dir",
        str,
        "var",
        "Folder for the database, logs, sockets and pidfile "
        "(relative paths are resolved from the install root).",
        env="DEEPERHUB_VAR_DIR",
    ),
    _s(
        "server.host",
        str,
        "127.0.0.1",
        "Address the HTTP and WebSocket port binds to: 0.0.0.0 for every IPv4 "
        "interface, :: for every IPv6 one. Start-up rejects an address that is "
        "not on this machine or a name that does not resolve.",
        env="DEEPERHUB_HOST",
        check=_is_host,
        allowed="an IPv4 or IPv6 address, or a host name",
    ),
    _s(
        "server.port",
        int,
        8080,
        "TCP port for HTTP and WebSocket.",
        env="PORT",
        minimum=1,
        maximum=65535,
    ),
    _s(
        "server.max_connections",
        int,
        10000,
        "Maximum open WebSocket connections over all acceptor processes; further "
        "upgrades get HTTP 503.",
        env="MAX_CONNECTIONS",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "server.acceptors",
        int,
        0,
        "Acceptor processes sharing the port (SO_REUSEPORT); 0 starts one per "
        "CPU core the process may run on.",
        env="DEEPERHUB_ACCEPTORS",
        minimum=0,
        maximum=64,
    ),
    _s(
        "server.drain_timeout",
        float,
        5.0,
        "Seconds in-flight HTTP requests get to finish when an acceptor stops.",
        minimum=0,
        maximum=600,
    ),
    _s(
        "server.keep_alive_timeout",
        float,
        15.0,
        "Seconds an idle HTTP keep-alive connection stays open before the server "
        "closes it.",
        minimum=1,
        maximum=3600,
    ),
    _s(
        "server.read_timeout",
        float,
        60.0,
        "Seconds the server waits for the next bytes of an HTTP request body "
        "before it closes the connection (a guard against stalled uploads). "
        "A request whose response takes longer is closed too.",
        minimum=1,
        maximum=3600,
    ),
    _s(
        "server.body_timeout",
        float,
        30.0,
        "Seconds from the end of an HTTP request head until its whole body must "
        "have arrived. A slower body gets 408 and the connection is closed.",
        minimum=1,
        maximum=3600,
    ),
    _s(
        "server.max_request_body",
        int,
        1_048_576,
        "Maximum HTTP request body in bytes.",
        minimum=1024,
        maximum=64 * 1_048_576,
    ),
    _s(
        "server.max_header_bytes",
        int,
        16384,
        "Maximum size of an HTTP request head in bytes.",
        minimum=1024,
        maximum=1_048_576,
    ),
    _s(
        "database.path",
        str,
        "",
        "SQLite database file, created if missing (a directory is rejected); "
        "empty means `<var_dir>/db/deeper_hub.db`.",
        env="DEEPER_HUB_DB_PATH",
    ),
    _s(
        "database.pool_size",
        int,
        10,
        "Read-only SQLite connections per acceptor process.",
        env="DEEPER_HUB_DB_POOL_SIZE",
        minimum=1,
        maximum=100,
    ),
    _s(
        "database.synchronous",
        str,
        "full",
        "SQLite `synchronous` pragma for the DB "
        "writer: `full` survives power loss, `normal` is faster but can lose the last "
        "commits on power loss.",
        choices=("full", "normal"),
    ),
    _s(
        "database.busy_timeout_ms",
        int,
        5000,
        "SQLite busy timeout in milliseconds.",
        minimum=0,
        maximum=600_000,
    ),
    _s(
        "database.checkpoint_pages",
        int,
        1000,
        "WAL pages after which the DB writer checkpoints the WAL into the database.",
        minimum=100,
        maximum=1_000_000,
    ),
    _s(
        "database.max_batch",
        int,
        256,
        "Maximum writes committed in one transaction (group commit).",
        minimum=1,
        maximum=100_000,
    ),
    _s(
        "backup.dir",
        str,
        "",
        "Folder of `bin/deeperhub backup`; empty means `<var_dir>/backups`.",
        env="DEEPERHUB_BACKUP_DIR",
    ),
    _s(
        "backup.keep",
        int,
        30,
        "Backups kept by `bin/deeperhub backup`; older ones are deleted.",
        minimum=1,
        maximum=100_000,
    ),
    _s(
        "backup.timeout",
        float,
        3600.0,
        "Seconds `bin/deeperhub backup` waits for the DB writer to finish a backup.",
        minimum=1,
        maximum=86400,
    ),
    _s(
        "logging.level",
        str,
        "info",
        "Log level.",
        env="DEEPER_HUB_LOG_LEVEL",
        choices=LOG_LEVELS,
    ),
    _s(
        "auth.secret_key",
        str,
        "",
        "HMAC key for JWTs. Empty in dev: a key is "
        "generated once into `<var_dir>/secret_key`.",
        env="GUARDIAN_SECRET_KEY",
        secret=True,
    ),
    _s("auth.issuer", str, "deeperhub", "JWT `iss` claim."),
    _s("auth.audience", str, "deeperhub", "JWT `aud` claim."),
    _s(
        "auth.access_ttl",
        int,
        3600,
        "Access token lifetime in seconds.",
        minimum=10,
        maximum=86400 * 7,
    ),
    _s(
        "auth.refresh_ttl",
        int,
        2_592_000,
        "Refresh token lifetime in seconds.",
        minimum=60,
        maximum=86400 * 365,
    ),
    _s(
        "auth.leeway",
        int,
        30,
        "Allowed clock skew in seconds when checking `exp`, `nbf` and `iat`.",
        minimum=0,
        maximum=300,
    ),
    _s(
        "auth.password_min",
        int,
        8,
        "Minimum password length in characters.",
        minimum=1,
        maximum=1024,
    ),
    _s(
        "auth.password_max",
        int,
        1024,
        "Maximum password length in characters.",
        minimum=8,
        maximum=65536,
    ),
    _s(
        "auth.previous_keys",
        str,
        "",
        "Comma-separated former values of GUARDIAN_SECRET_KEY: tokens signed with "
        "them are still accepted, but new tokens are signed with the current key.",
        env="GUARDIAN_PREVIOUS_KEYS",
        secret=True,
    ),
    _s(
        "auth.previous_keys_until",
        str,
        "",
        "ISO 8601 time (UTC unless an offset is given) after which tokens signed "
        "with a previous key are rejected; empty accepts them until they expire.",
        env="GUARDIAN_PREVIOUS_KEYS_UNTIL",
    ),
    _s(
        "auth.refresh_reuse_grace",
        int,
        2,
        "Seconds after a refresh token's first use during which presenting it "
        "again is refused without revoking its family (concurrent refreshes of "
        "one client); later reuse revokes every token of the login.",
        minimum=0,
        maximum=60,
    ),
    _s(
        "auth.purge_interval",
        float,
        3600.0,
        "Seconds between deletions of expired revocations and refresh tokens "
        "by the DB writer.",
        minimum=1,
        maximum=86400,
    ),
    _s(
        "websocket.heartbeat_timeout",
        float,
        60.0,
        "Seconds without any frame from a client before its connection is closed.",
        minimum=1,
        maximum=3600,
    ),
    _s(
        "websocket.max_frame_size",
        int,
        2_097_152,
        "Maximum WebSocket frame or "
        "message payload in bytes; larger gets close code 1009.",
        minimum=1024,
        maximum=64 * 1_048_576,
    ),
    _s(
        "websocket.max_body_bytes",
        int,
        16384,
        "Maximum `body` of a chat message in bytes (UTF-8).",
        minimum=1,
        maximum=1_048_576,
    ),
    _s(
        "websocket.max_joins",
        int,
        50,
        "Maximum topics joined per connection.",
        minimum=1,
        maximum=10000,
    ),
    _s(
        "websocket.send_queue_bytes",
        int,
        1_048_576,
        "Outgoing bytes buffered per "
        "connection before a client that does not read is disconnected.",
        minimum=4096,
        maximum=256 * 1_048_576,
    ),
    _s(
        "websocket.replay_limit",
        int,
        1000,
        "Maximum stored messages replayed on a join with `last_seen_id` or "
        "`last_seen_seq`; with more missed, the newest ones are replayed and the "
        "reply says `recovered: false`.",
        minimum=0,
        maximum=100_000,
    ),
    _s(
        "websocket.max_fragments",
        int,
        1024,
        "Maximum frames in one fragmented WebSocket message; more gets close "
        "code 1009.",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "websocket.max_joins_per_user",
        int,
        50,
        "Maximum distinct topics one user has joined, over all its connections "
        "and acceptors.",
        minimum=1,
        maximum=10000,
    ),
    _s(
        "websocket.max_pending_pushes",
        int,
        64,
        "Pushes of one connection awaiting their database commit before the "
        "server stops reading from that connection.",
        minimum=1,
        maximum=10000,
    ),
    _s(
        "retention.max_messages",
        int,
        0,
        "Messages kept per channel by default; older ones are deleted. 0 keeps "
        "every message. A channel's own retention overrides it.",
        minimum=0,
        maximum=1_000_000_000,
    ),
    _s(
        "retention.max_age",
        int,
        0,
        "Seconds a message is kept by default; older ones are deleted. 0 keeps "
        "messages regardless of age. A channel's own retention overrides it.",
        minimum=0,
        maximum=100 * 365 * 86400,
    ),
    _s(
        "retention.interval",
        float,
        60.0,
        "Seconds between the DB writer's retention passes.",
        minimum=0.05,
        maximum=86400,
    ),
    _s(
        "retention.batch",
        int,
        1000,
        "Messages deleted per transaction by a retention pass; other writes are "
        "committed between batches.",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "security.rate_limit_api",
        int,
        60,
        "HTTP API requests per minute per IP.",
        env="DEEPER_HUB_SECURITY_RATE_LIMIT_API",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "security.rate_limit_ws",
        int,
        120,
        "WebSocket messages per minute per user.",
        env="DEEPER_HUB_SECURITY_RATE_LIMIT_WS",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "security.rate_sync_interval",
        float,
        0.1,
        "Seconds between two reports of an acceptor's rate limit usage to the "
        "other acceptors, through the security monitor. With several acceptors "
        "an IP or user can exceed a limit by what the other acceptors allowed "
        "within about this time.",
        minimum=0.01,
        maximum=10,
    ),
    _s(
        "security.trusted_proxies",
        tuple,
        (),
        "Addresses or CIDR networks of reverse proxies whose proxy header "
        "(`proxy_header`) names the client; empty: the client is the socket peer.",
        env="DEEPER_HUB_SECURITY_TRUSTED_PROXIES",
    ),
    _s(
        "security.proxy_header",
        str,
        "x-forwarded-for",
        "Header that the trusted proxies set, read from the right; the other "
        "one is ignored.",
        choices=("x-forwarded-for", "forwarded"),
    ),
    _s(
        "security.allowlist",
        tuple,
        (),
        "Addresses or CIDR networks that are never blocked or rate limited; their "
        "security events are still recorded.",
        env="DEEPER_HUB_SECURITY_ALLOWLIST",
    ),
    _s(
        "security.ws_flood_close_after",
        int,
        20,
        "Rejected WebSocket messages of one user within a minute after which "
        "the connection is closed with 1008.",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "security.inspect_message_bodies",
        bool,
        False,
        "Apply the payload rules to chat message bodies too (they are stored as "
        "sent otherwise).",
    ),
    _s(
        "security.max_json_depth",
        int,
        32,
        "Maximum nesting depth of a JSON request body; deeper is a malicious payload.",
        minimum=1,
        maximum=1000,
    ),
    _s(
        "security.max_tracked_ips",
        int,
        100_000,
        "IPs (or users) remembered per rate limit, counter and score table; "
        "past that the least recently seen are forgotten.",
        minimum=100,
        maximum=10_000_000,
    ),
    _s(
        "anomaly_detection.login_failure_threshold",
        int,
        5,
        "Failed logins from one IP within `login_failure_window` that block it.",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "anomaly_detection.login_failure_window",
        float,
        300.0,
        "Window in seconds for `login_failure_threshold`.",
        minimum=0.1,
        maximum=604_800,
    ),
    _s(
        "anomaly_detection.not_found_threshold",
        int,
        10,
        "404 responses to one IP within `not_found_window` that block it.",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "anomaly_detection.not_found_window",
        float,
        60.0,
        "Window in seconds for `not_found_threshold`.",
        minimum=0.1,
        maximum=604_800,
    ),
    _s(
        "anomaly_detection.malicious_payload_threshold",
        int,
        3,
        "Malicious payloads from one IP within `malicious_payload_window` that "
        "block it.",
        minimum=1,
        maximum=1_000_000,
    ),
    _s(
        "anomaly_detection.malicious_payload_window",
        float,
        600.0,
        "Window in seconds for `malicious_payload_threshold`.",
        minimum=0.1,
        maximum=604_800,
    ),
    _s(
        "anomaly_detection.block_duration",
        float,
        900.0,
        "Seconds an IP is blocked for its first offence.",
        minimum=0.1,
        maximum=31_536_000,
    ),
    _s(
        "anomaly_detection.block_multiplier",
        float,
        2.0,
        "Factor applied to the block duration for each repeated offence.",
        minimum=1,
        maximum=100,
    ),
    _s(
        "anomaly_detection.max_block_duration",
        float,
        86_400.0,
        "Longest block in seconds, however often an IP offends.",
        minimum=0.1,
        maximum=31_536_000,
    ),
    _s(
        "anomaly_detection.offence_reset",
        float,
        86_400.0,
        "Seconds after a block ended after which the next offence of the IP "
        "counts as its first again.",
        minimum=0,
        maximum=31_536_000,
    ),
    _s(
        "ip_reputation.high_risk_threshold",
        int,
        30,
        "Score below which an IP is blocked until it recovers.",
        minimum=0,
        maximum=100,
    ),
    _s(
        "ip_reputation.medium_risk_threshold",
        int,
        60,
        "Score below which the rate limits of an IP are halved.",
        minimum=0,
        maximum=100,
    ),
    _s(
        "ip_reputation.check_interval",
        int,
        60_000,
        "Milliseconds between recomputations of every score (recovery, risk "
        "levels, expired blocks).",
        minimum=100,
        maximum=86_400_000,
    ),
    _s(
        "ip_reputation.recovery_per_hour",
        float,
        10.0,
        "Points a score recovers per hour, up to 100; 0 disables recovery.",
        minimum=0,
        maximum=100_000,
    ),
    _s(
        "ip_reputation.login_failure_penalty",
        float,
        5.0,
        "Points lost per failed login.",
        minimum=0,
        maximum=100,
    ),
    _s(
        "ip_reputation.not_found_penalty",
        float,
        2.0,
        "Points lost per 404 response.",
        minimum=0,
        maximum=100,
    ),
    _s(
        "ip_reputation.malicious_payload_penalty",
        float,
        10.0,
        "Points lost per malicious payload.",
        minimum=0,
        maximum=100,
    ),
    _s(
        "ip_reputation.block_penalty",
        float,
        20.0,
        "Points lost per block (automatic or manual).",
        minimum=0,
        maximum=100,
    ),
    _s(
        "security_alerts.webhook_url",
        str,
        "",
        "URL that receives security alerts as signed JSON; empty disables the webhook.",
        env="DEEPER_HUB_SECURITY_ALERT_WEBHOOK",
    ),
    _s(
        "security_alerts.notification_channels",
        tuple,
        ("log",),
        "Alert channels: `log` (always on), `webhook` (also on when "
        "`webhook_url` is set), `email`.",
        env="DEEPER_HUB_SECURITY_ALERT_CHANNELS",
        choices=("log", "webhook", "email"),
    ),
    _s(
        "security_alerts.webhook_secret",
        str,
        "",
        "HMAC-SHA256 key that signs webhook bodies; required with a webhook.",
        env="DEEPER_HUB_SECURITY_ALERT_WEBHOOK_SECRET",
        secret=True,
    ),
    _s(
        "security_alerts.webhook_timeout",
        float,
        5.0,
        "Seconds a webhook delivery may take before it counts as failed.",
        minimum=0.1,
        maximum=300,
    ),
    _s(
        "security_alerts.smtp_host",
        str,
        "",
        "SMTP server for the email channel.",
    ),
    _s(
        "security_alerts.smtp_port",
        int,
        587,
        "SMTP server port.",
        minimum=1,
        maximum=65535,
    ),
    _s(
        "security_alerts.smtp_security",
        str,
        "starttls",
        "`starttls` upgrades the connection, `tls` connects with TLS (port "
        "465), `none` sends in clear text.",
        choices=("starttls", "tls", "none"),
    ),
    _s(
        "security_alerts.smtp_username",
        str,
        "",
        "SMTP login; empty skips authentication.",
    ),
    _s(
        "security_alerts.smtp_password",
        str,
        "",
        "SMTP password.",
        env="DEEPER_HUB_SECURITY_SMTP_PASSWORD",
        secret=True,
    ),
    _s(
        "security_alerts.smtp_timeout",
        float,
        10.0,
        "Seconds an email delivery may take before it counts as failed.",
        minimum=0.1,
        maximum=300,
    ),
    _s(
        "security_alerts.smtp_ca_file",
        str,
        "",
        "PEM file of the CA certificates that verify the SMTP server; empty uses "
        "the system's.",
    ),
    _s(
        "security_alerts.email_sender",
        str,
        "",
        "`From` address of alert emails.",
    ),
    _s(
        "security_alerts.email_recipients",
        tuple,
        (),
        "Addresses that receive alert emails.",
        env="DEEPER_HUB_SECURITY_ALERT_EMAIL_TO",
    ),
    _s(
        "security_alerts.min_severity",
        str,
        "warning",
        "Lowest severity sent to the webhook and email channels; the log gets "
        "every alert.",
        choices=("info", "warning", "critical"),
    ),
    _s(
        "security_alerts.group_window",
        float,
        300.0,
        "Seconds during which repeats of an alert type for one IP are counted "
        "into one follow-up alert; 0 disables grouping.",
        minimum=0,
        maximum=86_400,
    ),
    _s(
        "security_alerts.retry_base_delay",
        float,
        1.0,
        "Seconds before the first retry of a failed delivery; each retry doubles it.",
        minimum=0.01,
        maximum=3600,
    ),
    _s(
        "security_alerts.retry_max_delay",
        float,
        300.0,
        "Longest wait in seconds between two delivery attempts.",
        minimum=0.1,
        maximum=86_400,
    ),
    _s(
        "security_alerts.delivery_deadline",
        float,
        86_400.0,
        "Seconds after an alert during which its delivery is retried; then it is "
        "marked failed.",
        minimum=1,
        maximum=2_592_000,
    ),
    _s(
        "security_alerts.retention_days",
        int,
        90,
        "Days security events and their delivery records are kept.",
        minimum=1,
        maximum=36_500,
    ),
    _s(
        "supervisor.intensity",
        int,
        3,
        "Restarts allowed within `period` before the supervisor gives up.",
        minimum=0,
        maximum=1000,
    ),
    _s(
        "supervisor.period",
        float,
        5.0,
        "Window in seconds for `intensity`.",
        minimum=0.1,
        maximum=3600,
    ),
    _s(
        "supervisor.start_timeout",
        float,
        30.0,
        "Seconds a worker may take to report ready.",
        minimum=1,
        maximum=600,
    ),
    _s(
        "supervisor.shutdown_timeout",
        float,
        10.0,
        "Seconds a worker gets after SIGTERM before SIGKILL.",
        minimum=0.1,
        maximum=600,
    ),
    _s(
        "supervisor.liveness_interval",
        float,
        2.0,
        "Seconds between liveness pings to each worker.",
        minimum=0.1,
        maximum=600,
    ),
    _s(
        "supervisor.liveness_timeout",
        float,
        10.0,
        "Seconds without a pong before a worker is killed and restarted.",
        minimum=0.5,
        maximum=3600,
    ),
    _s(
        "metrics.enabled",
        bool,
        True,
        "Serve Prometheus metrics at `/metrics` on the HTTP port; false answers 404.",
        env="DEEPERHUB_METRICS_ENABLED",
    ),
    _s(
        "metrics.supervisor_timeout",
        float,
        1.0,
        "Seconds `/metrics` waits for the supervisor's list of worker pids; "
        "after that only the answering acceptor's process series are shown.",
        minimum=0.05,
        maximum=30,
    ),
)

_BY_KEY = {setting.key: setting for setting in SETTINGS}

# Sections whose unknown keys are accepted unchecked, for a feature that
# validates its own keys (none today).
_OPEN_SECTIONS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Settings:
    """Validated settings, looked up by `section.name` key."""

    values: Mapping[str, Any]
    config_file: Path | None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def var_dir(self) -> Path:
        return Path(self.values["server.var_dir"])

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def db_path(self) -> Path:
        return Path(self.values["database.path"])

    @property
    def secret_key(self) -> str:
        return str(self.values["auth.secret_key"])

    def socket_path(self, name: str) -> Path:
        """Return the Unix socket path of a worker or service called `name`."""
        return self.run_dir / f"{name}.sock"

    def to_env(self) -> dict[str, str]:
        """Return environment variables that reproduce these settings in a child."""
        env = {"DEEPERHUB_CONFIG_FILE": str(self.config_file or "")}
        for setting in SETTINGS:
            if setting.env:
                env[setting.env] = _format(self.values[setting.key])
        return env


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _coerce(setting: Setting, raw: Any, source: str) -> Any:
    """Convert `raw` to the setting's type and check its range, or raise ConfigError."""
    shown = "<hidden>" if setting.secret else repr(raw)

    def invalid() -> ConfigError:
        where = f"{setting.env} ({setting.key})" if setting.env else setting.key
        return ConfigError(
            f"invalid value {shown} for {where} from {source}: "
            f"expected {setting.describe_allowed()}"
        )

    value: Any
    if setting.kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in (
            "true",
            "1",
            "yes",
            "false",
            "0",
            "no",
        ):
            value = raw.lower() in ("true", "1", "yes")
        else:
            raise invalid()
    elif setting.kind is int:
        if isinstance(raw, bool):
            raise invalid()
        try:
            value = int(raw) if isinstance(raw, int) else int(str(raw).strip(), 10)
        except ValueError:
            raise invalid() from None
    elif setting.kind is tuple:
        # A TOML array, or a comma-separated string from an environment variable.
        if isinstance(raw, str):
            raw = raw.split(",")
        if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
            raise invalid()
        value = tuple(item.strip() for item in raw if item.strip())
        if setting.choices is not None and not set(value) <= set(setting.choices):
            raise invalid()
        return value
    elif setting.kind is float:
        if isinstance(raw, bool):
            raise invalid()
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise invalid() from None
        if value != value:  # NaN
            raise invalid()
    else:
        if not isinstance(raw, str):
            raise invalid()
        value = raw.strip()
        if setting.key == "logging.level":
            value = {"warn": "warning"}.get(value.lower(), value.lower())
        if setting.check is not None and not setting.check(value):
            raise invalid()

    if setting.minimum is not None and value < setting.minimum:
        raise invalid()
    if setting.maximum is not None and value > setting.maximum:
        raise invalid()
    if setting.choices is not None and value not in setting.choices:
        raise invalid()
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc

    flat: dict[str, Any] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"invalid entry {section!r} in {path}: settings belong in [sections]"
            )
        for name, value in table.items():
            flat[f"{section}.{name}"] = value
    return flat


def _resolve_path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    *,
    create_dev_key: bool = True,
) -> Settings:
    """Load and validate settings.

    Order of precedence: environment variable, then the TOML file, then the
    default. The TOML file is `config_file`, else `$DEEPERHUB_CONFIG_FILE`, else
    `etc/deeperhub.toml` under the install root when it exists. Unknown keys in the
    file are rejected so that a typo does not silently keep a default.
    """
    env = os.environ if environ is None else environ
    if config_file is None and env.get("DEEPERHUB_CONFIG_FILE"):
        config_file = Path(env["DEEPERHUB_CONFIG_FILE"])
    if config_file is None:
        candidate = PROJECT_ROOT / "etc" / "deeperhub.toml"
        config_file = candidate if candidate.exists() else None

    from_file = _read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for key, raw in from_file.items():
        setting = _BY_KEY.get(key)
        if setting is None:
            # Sections owned by later features are accepted as they are.
            if key.split(".", 1)[0] in _OPEN_SECTIONS:
                values[key] = raw
                continue
            raise ConfigError(f"unknown setting {key!r} in {config_file}")
        values[key] = _coerce(setting, raw, str(config_file))

    for setting in SETTINGS:
        if setting.env and env.get(setting.env, "") != "":
            values[setting.key] = _coerce(
                setting, env[setting.env], f"environment variable {setting.env}"
            )
        elif setting.key not in values:
            values[setting.key] = setting.default

    var_dir = _resolve_path(values["server.var_dir"], PROJECT_ROOT).resolve()
    values["server.var_dir"] = str(var_dir)
    db_path = values["database.path"] or str(var_dir / "db" / "deeper_hub.db")
    values["database.path"] = str(_resolve_path(db_path, Path.cwd()).resolve())
    _check_database_path(Path(values["database.path"]))

    if values["auth.password_min"] > values["auth.password_max"]:
        raise ConfigError(
            f"invalid auth.password_min {values['auth.password_min']}: must not exceed "
            f"auth.password_max {values['auth.password_max']}"
        )

    validate_security_settings(values)

    values["auth.secret_key"] = _resolve_secret(
        values["auth.secret_key"], values["server.env"], var_dir, create_dev_key
    )
    from .auth.keys import parse_previous_keys, parse_until

    parse_previous_keys(values["auth.previous_keys"], env_name=values["server.env"])
    parse_until(values["auth.previous_keys_until"])
    backup_dir = values["backup.dir"] or str(var_dir / "backups")
    values["backup.dir"] = str(_resolve_path(backup_dir, Path.cwd()).resolve())
    if values["server.acceptors"] == 0:
        values["server.acceptors"] = _cpu_cores()
    return Settings(values=values, config_file=config_file)


def _check_database_path(path: Path) -> None:
    """Raise ConfigError when `path` cannot be the database file.

    The DB writer creates a missing file and its folders, so only an existing
    directory in its place (or a file in place of a folder) is caught here.
    """
    where = "DEEPER_HUB_DB_PATH (database.path)"
    if path.is_dir():
        raise ConfigError(
            f"invalid value {str(path)!r} for {where}: it is a directory, expected "
            f"the path of the SQLite database file, such as {path / 'deeper_hub.db'}"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"invalid value {str(path)!r} for {where}: {parent} is not a "
                    "directory"
                )
            return


def _cpu_cores() -> int:
    """Return the CPU cores this process may run on, at most 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(64, cores))


def _resolve_secret(key: str, env_name: str, var_dir: Path, create: bool) -> str:
    """Return the signing key, generating a development key when none is set."""
    if env_name == "prod":
        if not key:
            raise ConfigError(
                "missing GUARDIAN_SECRET_KEY: DEEPERHUB_ENV=prod requires a key of at "
                f"least {MIN_PROD_KEY_BYTES} bytes (generate one with "
                "`bin/deeperhub gen-secret`)"
            )
        if len(key.encode()) < MIN_PROD_KEY_BYTES:
            raise ConfigError(
                f"invalid GUARDIAN_SECRET_KEY: {len(key.encode())} bytes, "
                f"DEEPERHUB_ENV=prod requires at least {MIN_PROD_KEY_BYTES} bytes"
            )
        return key
    if key:
        return key

    key_file = var_dir / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    if not create:
        raise ConfigError(f"missing GUARDIAN_SECRET_KEY and no key file at {key_file}")

    import logging

    var_dir.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(48)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(generated + "\n")
    logging.getLogger("deeperhub.config").warning(
        "GUARDIAN_SECRET_KEY is not set: generated a development key in %s; "
        "set GUARDIAN_SECRET_KEY in production",
        key_file,
    )
    return generated
