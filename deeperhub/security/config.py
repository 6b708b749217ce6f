"""The security settings as typed objects, and the checks that span several of them.

The settings themselves are declared in `deeperhub.config.SETTINGS` (sections
`security`, `anomaly_detection`, `ip_reputation` and `security_alerts`).
`validate_security_settings` runs inside `load_settings`, so a bad combination
stops start-up with exit code 78 like any other invalid setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .addresses import AddressSet
from .anomaly import LOGIN_FAILED, MALICIOUS_PAYLOAD, NOT_FOUND, Threshold
from .blocks import Escalation

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..config import Settings

__all__ = [
    "ALERT_CHANNELS",
    "AlertConfig",
    "MonitorConfig",
    "active_channels",
    "alert_config",
    "monitor_config",
    "validate_security_settings",
]

LOG = "log"
WEBHOOK = "webhook"
EMAIL = "email"
ALERT_CHANNELS = (LOG, WEBHOOK, EMAIL)
# Pairs of settings where the first must not exceed the second.
_ORDERED_SETTINGS = (
    ("ip_reputation.high_risk_threshold", "ip_reputation.medium_risk_threshold"),
    ("anomaly_detection.block_duration", "anomaly_detection.max_block_duration"),
    ("security_alerts.retry_base_delay", "security_alerts.retry_max_delay"),
)


@dataclass(frozen=True)
class MonitorConfig:
    """What the security monitor decides with: thresholds, scores, blocks."""

    thresholds: dict[str, Threshold]
    penalties: dict[str, float]
    block_penalty: float
    escalation: Escalation
    high_risk_threshold: float
    medium_risk_threshold: float
    recovery_per_hour: float
    check_interval: float  # seconds
    allowlist: AddressSet
    group_window: float
    max_tracked_ips: int
    retention_days: int


@dataclass(frozen=True)
class AlertConfig:
    """How the alert dispatcher delivers: channels and their settings."""

    channels: tuple[str, ...]
    min_severity: str
    webhook_url: str
    webhook_secret: str
    webhook_timeout: float
    smtp_host: str
    smtp_port: int
    smtp_security: str
    smtp_username: str
    smtp_password: str
    smtp_timeout: float
    smtp_ca_file: str
    email_sender: str
    email_recipients: tuple[str, ...]
    retry_base_delay: float
    retry_max_delay: float
    delivery_deadline: float


def active_channels(values: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the alert channels in use, `log` first.

    `log` is always on. `webhook` is on when listed or when a webhook URL is
    set, so that `DEEPER_HUB_SECURITY_ALERT_WEBHOOK` alone enables it.
    """
    listed = tuple(values["security_alerts.notification_channels"])
    channels = [LOG]
    if WEBHOOK in listed or values["security_alerts.webhook_url"]:
        channels.append(WEBHOOK)
    if EMAIL in listed:
        channels.append(EMAIL)
    return tuple(channels)


def monitor_config(settings: Settings) -> MonitorConfig:
    """Build the security monitor's configuration from validated settings."""
    anomaly = "anomaly_detection."
    reputation = "ip_reputation."

    def threshold(name: str) -> Threshold:
        return Threshold(
            count=int(settings[f"{anomaly}{name}_threshold"]),
            window=float(settings[f"{anomaly}{name}_window"]),
        )

    return MonitorConfig(
        thresholds={
            LOGIN_FAILED: threshold("login_failure"),
            NOT_FOUND: threshold("not_found"),
            MALICIOUS_PAYLOAD: threshold("malicious_payload"),
        },
        penalties={
            LOGIN_FAILED: float(settings[f"{reputation}login_failure_penalty"]),
            NOT_FOUND: float(settings[f"{reputation}not_found_penalty"]),
            MALICIOUS_PAYLOAD: float(
                settings[f"{reputation}malicious_payload_penalty"]
            ),
        },
        block_penalty=float(settings[f"{reputation}block_penalty"]),
        escalation=Escalation(
            base=float(settings[f"{anomaly}block_duration"]),
            multiplier=float(settings[f"{anomaly}block_multiplier"]),
            maximum=float(settings[f"{anomaly}max_block_duration"]),
            reset_after=float(settings[f"{anomaly}offence_reset"]),
        ),
        high_risk_threshold=float(settings[f"{reputation}high_risk_threshold"]),
        medium_risk_threshold=float(settings[f"{reputation}medium_risk_threshold"]),
        recovery_per_hour=float(settings[f"{reputation}recovery_per_hour"]),
        check_interval=int(settings[f"{reputation}check_interval"]) / 1000.0,
        allowlist=AddressSet(settings["security.allowlist"]),
        group_window=float(settings["security_alerts.group_window"]),
        max_tracked_ips=int(settings["security.max_tracked_ips"]),
        retention_days=int(settings["security_alerts.retention_days"]),
    )


def alert_config(settings: Settings) -> AlertConfig:
    """Build the alert dispatcher's configuration from validated settings."""
    alerts = "security_alerts."
    return AlertConfig(
        channels=active_channels(settings.values),
        min_severity=str(settings[f"{alerts}min_severity"]),
        webhook_url=str(settings[f"{alerts}webhook_url"]),
        webhook_secret=str(settings[f"{alerts}webhook_secret"]),
        webhook_timeout=float(settings[f"{alerts}webhook_timeout"]),
        smtp_host=str(settings[f"{alerts}smtp_host"]),
        smtp_port=int(settings[f"{alerts}smtp_port"]),
        smtp_security=str(settings[f"{alerts}smtp_security"]),
        smtp_username=str(settings[f"{alerts}smtp_username"]),
        smtp_password=str(settings[f"{alerts}smtp_password"]),
        smtp_timeout=float(settings[f"{alerts}smtp_timeout"]),
        smtp_ca_file=str(settings[f"{alerts}smtp_ca_file"]),
        email_sender=str(settings[f"{alerts}email_sender"]),
        email_recipients=tuple(settings[f"{alerts}email_recipients"]),
        retry_base_delay=float(settings[f"{alerts}retry_base_delay"]),
        retry_max_delay=float(settings[f"{alerts}retry_max_delay"]),
        delivery_deadline=float(settings[f"{alerts}delivery_deadline"]),
    )


def validate_security_settings(values: Mapping[str, Any]) -> None:
    """Raise ConfigError for security settings that are invalid together."""
    for key in ("security.trusted_proxies", "security.allowlist"):
        try:
            AddressSet(values[key])
        except ValueError as exc:
            raise ConfigError(f"invalid {key}: {exc}") from None

    for lower, upper in _ORDERED_SETTINGS:
        if values[lower] > values[upper]:
            raise ConfigError(
                f"invalid {lower} {values[lower]:g}: must not exceed "
                f"{upper} {values[upper]:g}"
            )

    channels = active_channels(values)
    if WEBHOOK in channels:
        _check_webhook(values)
    if EMAIL in channels:
        _check_email(values)


def _check_webhook(values: Mapping[str, Any]) -> None:
    url = values["security_alerts.webhook_url"]
    if not url:
        raise ConfigError(
            "missing security_alerts.webhook_url (DEEPER_HUB_SECURITY_ALERT_WEBHOOK): "
            "notification_channels lists webhook, so set the URL or remove webhook"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"invalid security_alerts.webhook_url {url!r}: expected an http:// or "
            "https:// URL with a host"
        )
    if not values["security_alerts.webhook_secret"]:
        raise ConfigError(
            "missing DEEPER_HUB_SECURITY_ALERT_WEBHOOK_SECRET "
            "(security_alerts.webhook_secret): webhook alerts are signed with it; "
            "generate one with `bin/deeperhub gen-secret`"
        )


def _check_email(values: Mapping[str, Any]) -> None:
    missing = [
        key
        for key in (
            "security_alerts.smtp_host",
            "security_alerts.email_sender",
            "security_alerts.email_recipients",
        )
        if not values[key]
    ]
    if missing:
        raise ConfigError(
            f"missing {', '.join(missing)}: notification_channels lists email, so "
            "set them or remove email"
        )
    for address in (
        values["security_alerts.email_sender"],
        *values["security_alerts.email_recipients"],
    ):
        if "@" not in address or any(char.isspace() for char in address):
            raise ConfigError(
                f"invalid email address {address!r} in security_alerts: expected "
                "name@domain"
            )
