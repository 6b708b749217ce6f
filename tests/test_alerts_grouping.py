"""Alert grouping, retry delays and webhook signatures (sans-I/O)."""

from __future__ import annotations

import pytest

from deeperhub.security.alerts import (
    AlertDraft,
    AlertGrouper,
    retry_delay,
    sign_webhook,
    verify_webhook,
)

IP = "203.0.113.9"


def draft(kind: str = "not_found_scan", severity: str = "warning", ip: str = IP):
    return AlertDraft(kind, severity, ip, {"n": 1})


def test_first_alert_passes_repeats_counted() -> None:
    grouper = AlertGrouper(window=60)
    assert grouper.offer(draft(), 0) is not None
    for moment in range(1, 50):
        assert grouper.offer(draft(), moment) is None
    assert grouper.flush(59) == []
    follow_ups = grouper.flush(60)
    assert len(follow_ups) == 1
    assert follow_ups[0].count == 49
    assert follow_ups[0].details["grouped_window"] == 60
    assert grouper.flush(120) == []


def test_single_alert_has_no_follow_up() -> None:
    grouper = AlertGrouper(window=60)
    grouper.offer(draft(), 0)
    assert grouper.flush(100) == []


def test_groups_per_type_and_ip() -> None:
    grouper = AlertGrouper(window=60)
    assert grouper.offer(draft(), 0) is not None
    assert grouper.offer(draft(ip="198.51.100.1"), 1) is not None
    assert grouper.offer(draft(kind="login_failures"), 2) is not None
    assert grouper.offer(draft(), 3) is None


def test_higher_severity_not_held_back() -> None:
    grouper = AlertGrouper(window=60)
    grouper.offer(draft(severity="warning"), 0)
    critical = grouper.offer(draft(severity="critical"), 1)
    assert critical is not None
    assert critical.severity == "critical"
    assert grouper.offer(draft(severity="warning"), 2) is None


def test_window_ended_before_flush_still_reported() -> None:
    grouper = AlertGrouper(window=10)
    grouper.offer(draft(), 0)
    grouper.offer(draft(), 1)
    # The window ended; this opens a new one without a flush in between.
    assert grouper.offer(draft(), 15) is not None
    follow_ups = grouper.flush(16)
    assert [f.count for f in follow_ups] == [1]


def test_zero_window_disables_grouping() -> None:
    grouper = AlertGrouper(window=0)
    assert all(grouper.offer(draft(), 0) is not None for _ in range(3))


def test_invalid_severity_rejected() -> None:
    with pytest.raises(ValueError, match="invalid severity 'loud'"):
        AlertDraft("x", "loud", IP)


def test_retry_delay_doubles_to_cap() -> None:
    delays = [retry_delay(n, 1.0, 30.0, jitter=0) for n in range(1, 8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30]


def test_retry_delay_jitter_bounded() -> None:
    for _ in range(100):
        assert 9.0 <= retry_delay(4, 1.25, 100.0, jitter=0.1) <= 11.0


def test_signature_verifies() -> None:
    body = b'{"id": 1}'
    signature = sign_webhook("s3cret", 1_700_000_000, body)
    assert signature.startswith("sha256=")
    assert verify_webhook("s3cret", "1700000000", signature, body, 1_700_000_010)


@pytest.mark.parametrize(
    ("secret", "timestamp", "body", "now"),
    [
        ("wrong", "1700000000", b'{"id": 1}', 1_700_000_000),
        ("s3cret", "1700000001", b'{"id": 1}', 1_700_000_000),
        ("s3cret", "1700000000", b'{"id": 2}', 1_700_000_000),
        ("s3cret", "1700000000", b'{"id": 1}', 1_700_000_400),
        ("s3cret", "soon", b'{"id": 1}', 1_700_000_000),
    ],
)
def test_signature_rejects_tampering(
    secret: str, timestamp: str, body: bytes, now: float
) -> None:
    signature = sign_webhook("s3cret", 1_700_000_000, b'{"id": 1}')
    assert not verify_webhook(secret, timestamp, signature, body, now)
