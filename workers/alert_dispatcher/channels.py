"""Alert channels: the log, a signed JSON webhook, and email over SMTP.

Each channel's `deliver(event, attempt)` returns once the receiver accepted
the alert and raises DeliveryError otherwise. `event` is the stored alert
(`security_events` row: id, type, severity, ip, user_id, details, count,
inserted_at).
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import time
from email.message import EmailMessage
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import trio

from deeperhub import __version__
from deeperhub.security.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign_webhook

if TYPE_CHECKING:
    from deeperhub.security.config import AlertConfig

__all__ = [
    "Channel",
    "DeliveryError",
    "EmailChannel",
    "LogChannel",
    "WebhookChannel",
    "alert_payload",
]

alerts_log = logging.getLogger("deeperhub.alerts")

SEVERITY_LEVELS = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "critical": logging.CRITICAL,
}
ALERT_ID_HEADER = "X-DeeperHub-Alert-Id"
# Characters of a receiver's response kept in an error message.
_ERROR_BODY_CHARS = 200


class DeliveryError(Exception):
    """A receiver did not accept an alert. The message gives the reason."""


class Channel(Protocol):
    name: str

    async def deliver(self, event: dict[str, Any], attempt: int) -> None: ...

    async def aclose(self) -> None: ...


def alert_payload(event: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON object sent to receivers for a stored alert."""
    return {
        "id": event["id"],
        "type": event["type"],
        "severity": event["severity"],
        "ip": event["ip"],
        "user_id": event["user_id"],
        "details": event["details"],
        "count": event["count"],
        "time": event["inserted_at"],
    }


class LogChannel:
    """Writes alerts to the `deeperhub.alerts` logger at their severity's level."""

    name = "log"

    async def deliver(self, event: dict[str, Any], attempt: int) -> None:
        alerts_log.log(
            SEVERITY_LEVELS.get(str(event["severity"]), logging.WARNING),
            "security alert %s: %s (%s) ip=%s user=%s count=%s details=%s",
            event["id"],
            event["type"],
            event["severity"],
            event["ip"],
            event["user_id"],
            event["count"],
            json.dumps(event["details"], sort_keys=True),
        )

    async def aclose(self) -> None:
        return None


class WebhookChannel:
    """POSTs each alert as JSON, signed with HMAC-SHA256 (see `security.alerts`).

    Any 2xx status is a success, and redirects are not followed. httpx reads the
    usual proxy variables (HTTPS_PROXY, NO_PROXY) from the environment.
    """

    name = "webhook"

    def __init__(self, config: AlertConfig) -> None:
        self.url = config.webhook_url
        self.secret = config.webhook_secret
        self.client = httpx.AsyncClient(
            timeout=config.webhook_timeout,
            follow_redirects=False,
            headers={"User-Agent": f"DeeperHub/{__version__}"},
        )

    async def deliver(self, event: dict[str, Any], attempt: int) -> None:
        body = json.dumps(alert_payload(event), separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            ALERT_ID_HEADER: str(event["id"]),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign_webhook(self.secret, timestamp, body),
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(
                f"POST to the webhook failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not 200 <= response.status_code < 300:
            text = response.text[:_ERROR_BODY_CHARS]
            raise DeliveryError(
                f"webhook returned HTTP {response.status_code}: {text!r}"
            )

    async def aclose(self) -> None:
        await self.client.aclose()


class EmailChannel:
    """Sends each alert as a plain-text email with the stdlib smtplib, in a thread."""

    name = "email"

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self.context = ssl.create_default_context(cafile=config.smtp_ca_file or None)

    async def deliver(self, event: dict[str, Any], attempt: int) -> None:
        message = self._message(event)
        try:
            # abandon_on_cancel: a hung server must not hold up the outbox. The
            # thread still ends once smtplib's own timeout fires.
            await trio.to_thread.run_sync(
                partial(self._send, message), abandon_on_cancel=True
            )
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(
                f"SMTP delivery to {self.config.smtp_host}:{self.config.smtp_port} "
                f"failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _message(self, event: dict[str, Any]) -> EmailMessage:
        payload = alert_payload(event)
        message = EmailMessage()
        message["From"] = self.config.email_sender
        message["To"] = ", ".join(self.config.email_recipients)
        subject = f"[DeeperHub] {event['severity']}: {event['type']}"
        if event["ip"]:
            subject += f" from {event['ip']}"
        message["Subject"] = subject
        message["X-DeeperHub-Alert-Id"] = str(event["id"])
        message.set_content(
            f"Security alert {event['id']} at {event['inserted_at']}\n\n"
            + json.dumps(payload, indent=2, sort_keys=True)
            + "\n"
        )
        return message

    def _send(self, message: EmailMessage) -> None:
        config = self.config
        smtp: smtplib.SMTP
        if config.smtp_security == "tls":
            smtp = smtplib.SMTP_SSL(
                config.smtp_host,
                config.smtp_port,
                timeout=config.smtp_timeout,
                context=self.context,
            )
        else:
            smtp = smtplib.SMTP(
                config.smtp_host, config.smtp_port, timeout=config.smtp_timeout
            )
        with smtp:
            smtp.ehlo()
            if config.smtp_security == "starttls":
                smtp.starttls(context=self.context)
                smtp.ehlo()
            if config.smtp_username:
                smtp.login(config.smtp_username, config.smtp_password)
            refused = smtp.send_message(message)
        if refused:
            alerts_log.warning(
                "SMTP server refused alert email for %d of %d recipients: %s",
                len(refused),
                len(config.email_recipients),
                ", ".join(sorted(refused)),
            )

    async def aclose(self) -> None:
        return None
