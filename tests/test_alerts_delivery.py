"""Alert delivery in a real daemon: a webhook receiver and an SMTP server on loopback.

Alerts are raised with operator blocks (`manual_block`, severity info) or
failed logins (`login_failures`, severity warning), both through the running
security monitor.
"""

from __future__ import annotations

import email
import json
import os
import signal
import subprocess
import time
from email import policy as email_policy
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from deeperhub.security.alerts import verify_webhook

from .daemon import free_port
from .security_helpers import (
    WebhookReceiver,
    monitor_call,
    open_daemon,
    query_db,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .daemon import Daemon

pytestmark = pytest.mark.timeout(90)

SECRET = "webhook-test-secret"


def webhook_settings(receiver: WebhookReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "security_alerts.webhook_url": receiver.url,
        "security_alerts.webhook_secret": SECRET,
        **extra,
    }


def outbox(daemon: Daemon, channel: str) -> list[tuple[Any, ...]]:
    return query_db(
        daemon,
        "SELECT o.status, o.attempts, e.type, e.ip FROM alert_outbox AS o "
        "JOIN security_events AS e ON e.id = o.event_id WHERE o.channel = ? "
        "ORDER BY o.id",
        (channel,),
    )


def fail_logins(daemon: Daemon, count: int = 5) -> None:
    for _ in range(count):
        response = httpx.post(
            daemon.base_url + "/api/auth/login",
            json={"username": "nobody", "password": "wrong-password"},
        )
        assert response.status_code in (401, 403)


def restarted(daemon: Daemon, worker_id: str, old_pid: int) -> bool:
    worker = daemon.status()["workers"][worker_id]
    return worker["state"] == "running" and worker["pid"] not in (None, old_pid)


@pytest.fixture(scope="module")
def hooked() -> Iterator[tuple[Daemon, WebhookReceiver]]:
    """A daemon whose webhook receiver is up; every severity goes to it."""
    receiver = WebhookReceiver(free_port())
    receiver.start()
    settings = webhook_settings(
        receiver,
        **{"security_alerts.min_severity": "info", "security_alerts.group_window": 1.0},
    )
    try:
        with open_daemon(settings) as daemon:
            yield daemon, receiver
    finally:
        receiver.stop()


def test_webhook_receives_signed_alert(
    hooked: tuple[Daemon, WebhookReceiver],
) -> None:
    daemon, receiver = hooked
    monitor_call(daemon, "block", ip="198.51.100.1", duration=60, reason="test")
    headers, body = wait_for(
        lambda: next((r for r in receiver.received() if b"198.51.100.1" in r[1]), None)
    )
    payload = json.loads(body)
    assert payload["type"] == "manual_block"
    assert payload["severity"] == "info"
    assert payload["ip"] == "198.51.100.1"
    assert payload["count"] == 1
    assert payload["details"]["note"] == "test"
    assert payload["details"]["blocked_for"] == 60
    assert payload["time"].endswith("Z")
    assert headers["content-type"] == "application/json"
    assert headers["x-deeperhub-alert-id"] == str(payload["id"])
    timestamp = headers["x-deeperhub-timestamp"]
    signature = headers["x-deeperhub-signature"]
    assert verify_webhook(SECRET, timestamp, signature, body, time.time())
    assert not verify_webhook("other-secret", timestamp, signature, body, time.time())
    wait_for(
        lambda: (
            ("delivered", 1, "manual_block", "198.51.100.1")
            in outbox(daemon, "webhook")
        )
    )


def test_repeats_grouped_into_follow_up(
    hooked: tuple[Daemon, WebhookReceiver],
) -> None:
    daemon, receiver = hooked
    for _ in range(5):
        monitor_call(daemon, "block", ip="198.51.100.2", duration=60)

    def for_ip(alert_type: str) -> list[dict[str, Any]]:
        return [
            p
            for p in receiver.payloads()
            if p["ip"] == "198.51.100.2" and p["type"] == alert_type
        ]

    first, follow_up = wait_for(
        lambda: len(for_ip("manual_block")) == 2 and for_ip("manual_block")
    )
    assert first["count"] == 1
    assert follow_up["count"] == 4
    assert follow_up["details"]["grouped_window"] == 1.0
    # Each block costs 20 points, so the fourth one made the IP high risk.
    (high_risk,) = for_ip("ip_high_risk")
    assert high_risk["severity"] == "critical"
    time.sleep(1.5)
    assert len(for_ip("manual_block")) == 2


def test_webhook_survives_outage_and_restart() -> None:
    receiver = WebhookReceiver(free_port())
    with open_daemon(webhook_settings(receiver)) as daemon:
        fail_logins(daemon)
        # Nothing listens yet: attempts fail and are retried with back-off.
        wait_for(lambda: any(row[1] >= 2 for row in outbox(daemon, "webhook")))
        assert outbox(daemon, "webhook")[0][0] == "pending"
        # The log channel does not wait for the webhook.
        wait_for(lambda: outbox(daemon, "log")[0][0] == "delivered")

        pid = daemon.worker_pid("alert_dispatcher")
        os.kill(pid, signal.SIGKILL)
        receiver.start()
        try:
            wait_for(lambda: restarted(daemon, "alert_dispatcher", pid), timeout=20)
            (payload,) = wait_for(receiver.payloads, timeout=20)
        finally:
            receiver.stop()
        assert payload["type"] == "login_failures"
        assert payload["severity"] == "warning"
        assert payload["ip"] == "127.0.0.1"
        status, attempts, _, _ = wait_for(
            lambda: (
                outbox(daemon, "webhook")[0][0] == "delivered"
                and outbox(daemon, "webhook")[0]
            )
        )
        assert attempts >= 3


def test_slow_receiver_never_delays_requests() -> None:
    receiver = WebhookReceiver(free_port())
    receiver.delay = 3.0
    receiver.start()
    settings = webhook_settings(
        receiver,
        **{
            "security_alerts.webhook_timeout": 1.0,
            "security_alerts.min_severity": "info",
            "security.trusted_proxies": ["127.0.0.1"],
        },
    )
    try:
        with open_daemon(settings) as daemon:
            for index in range(5):
                monitor_call(
                    daemon, "block", ip=f"198.51.100.{index + 70}", duration=60
                )
            latencies = []
            for _ in range(20):
                started = time.monotonic()
                response = httpx.get(daemon.base_url + "/api/channels")
                latencies.append(time.monotonic() - started)
                assert response.status_code == 401
            # Blocks still land at once while deliveries time out.
            forbidden = httpx.get(
                daemon.base_url + "/api/channels",
                headers={"X-Forwarded-For": "198.51.100.74"},
            )
            assert forbidden.status_code == 403
            wait_for(lambda: any(row[1] >= 1 for row in outbox(daemon, "webhook")))
    finally:
        receiver.stop()
    # A delivery blocked on the receiver would take at least its 1 s timeout.
    assert max(latencies) < 0.9


class SmtpRecorder:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(
            envelope.content, policy=email_policy.default
        )
        self.messages.append(message)  # type: ignore[arg-type]
        return "250 OK"


def email_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "security_alerts.notification_channels": ["log", "email"],
        "security_alerts.smtp_host": "127.0.0.1",
        "security_alerts.smtp_port": port,
        "security_alerts.smtp_security": "none",
        "security_alerts.email_sender": "deeperhub@example.test",
        "security_alerts.email_recipients": ["ops@example.test", "sec@example.test"],
        **extra,
    }


def test_email_after_smtp_outage() -> None:
    port = free_port()
    recorder = SmtpRecorder()
    with open_daemon(email_settings(port)) as daemon:
        # Info alerts stay in the log: min_severity is warning by default.
        monitor_call(daemon, "block", ip="198.51.100.80", duration=60)
        fail_logins(daemon)
        wait_for(lambda: any(row[1] >= 2 for row in outbox(daemon, "email")))

        controller = Controller(recorder, hostname="127.0.0.1", port=port)
        controller.start()
        try:
            (message,) = wait_for(lambda: recorder.messages, timeout=20)
        finally:
            controller.stop()
        assert [row[2] for row in outbox(daemon, "email")] == ["login_failures"]
        log_types = [row[2] for row in outbox(daemon, "log")]
        assert log_types == ["manual_block", "login_failures"]

    assert message["Subject"] == "[DeeperHub] warning: login_failures from 127.0.0.1"
    assert message["From"] == "deeperhub@example.test"
    assert message["To"] == "ops@example.test, sec@example.test"
    text = message.get_content()
    payload = json.loads(text[text.index("{") :])
    assert payload["type"] == "login_failures"
    assert payload["details"]["count"] == 5


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_email_over_tls(certificate: tuple[Path, Path], security: str) -> None:
    import ssl

    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = free_port()
    recorder = SmtpRecorder()
    if security == "starttls":
        tls: dict[str, Any] = {"tls_context": context, "require_starttls": True}
    else:
        tls = {"ssl_context": context}
    controller = Controller(recorder, hostname="127.0.0.1", port=port, **tls)
    controller.start()
    settings = email_settings(
        port,
        **{
            "security_alerts.smtp_security": security,
            "security_alerts.smtp_ca_file": str(cert),
            "security_alerts.min_severity": "info",
        },
    )
    try:
        with open_daemon(settings) as daemon:
            monitor_call(daemon, "block", ip="198.51.100.90", duration=60)
            (message,) = wait_for(lambda: recorder.messages, timeout=20)
            wait_for(lambda: outbox(daemon, "email")[0][0] == "delivered")
    finally:
        controller.stop()
    assert message["Subject"] == "[DeeperHub] info: manual_block from 198.51.100.90"
