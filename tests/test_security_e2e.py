"""The security layer in a real daemon: client IPs, anomaly blocks, rate limits.

Every request comes from 127.0.0.1. Most tests share one daemon that trusts
127.0.0.1 as a proxy, and each uses its own client address in
`X-Forwarded-For`, so their counters, blocks and alerts stay apart.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from .security_helpers import (
    monitor_call,
    open_daemon,
    query_db,
    register,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .daemon import Daemon

pytestmark = pytest.mark.timeout(90)

BEHIND_PROXY = {"security.trusted_proxies": ["127.0.0.1"]}
SHARED = {
    **BEHIND_PROXY,
    "security.allowlist": ["192.0.2.0/24"],
    "security.rate_limit_ws": 5,
    "security.ws_flood_close_after": 3,
}


@pytest.fixture(scope="module")
def proxied() -> Iterator[Daemon]:
    """One daemon behind a trusted proxy (127.0.0.1) for the tests below."""
    with open_daemon(SHARED) as daemon:
        yield daemon


def client(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


def failed_login(base_url: str, headers: dict[str, str] | None = None) -> int:
    response = httpx.post(
        base_url + "/api/auth/login",
        json={"username": "nobody", "password": "wrong-password"},
        headers=headers or {},
    )
    return response.status_code


def status_of(base_url: str, path: str, headers: dict[str, str] | None = None) -> int:
    return httpx.get(base_url + path, headers=headers or {}).status_code


def alerts(daemon: Daemon, alert_type: str, ip: str) -> list[dict[str, Any]]:
    found = monitor_call(daemon, "events", limit=1000)["events"]
    return [e for e in found if e["type"] == alert_type and e["ip"] == ip]


def blocked_ips(daemon: Daemon) -> list[str]:
    return [entry["ip"] for entry in monitor_call(daemon, "blocked")["blocked"]]


def test_rotating_forwarded_for_blocks_peer() -> None:
    with open_daemon() as daemon:
        base = daemon.base_url
        for index in range(5):
            assert failed_login(base, client(f"198.51.100.{index + 1}")) == 401

        # No proxy is trusted, so the block lands on the socket peer.
        wait_for(lambda: status_of(base, "/api/channels") == 403)
        assert status_of(base, "/api/channels", client("192.0.2.77")) == 403
        assert blocked_ips(daemon) == ["127.0.0.1"]
        (alert,) = wait_for(lambda: alerts(daemon, "login_failures", "127.0.0.1"))
        assert alert["severity"] == "warning"
        assert alert["details"]["offences"] == 1
        assert alert["details"]["count"] == 5
        response = httpx.get(base + "/api/channels")
        assert response.json()["error"]["code"] == "forbidden"


def test_trusted_proxy_blocks_client(proxied: Daemon) -> None:
    base = proxied.base_url
    attacker = "198.51.100.7"
    for _ in range(5):
        assert failed_login(base, client(attacker)) == 401

    wait_for(lambda: status_of(base, "/api/channels", client(attacker)) == 403)
    # Another client behind the same proxy is not affected.
    assert status_of(base, "/api/channels", client("198.51.100.8")) == 401
    # Without the header the proxy itself is the client, and it is not blocked.
    assert status_of(base, "/api/channels") == 401
    # Entries the client wrote left of the proxy's are not trusted, so it can
    # pose neither as another client nor as an allowlisted address.
    for forged in (f"198.51.100.8, {attacker}", f"192.0.2.1, {attacker}"):
        assert status_of(base, "/api/channels", client(forged)) == 403
    assert attacker in blocked_ips(proxied)
    assert "127.0.0.1" not in blocked_ips(proxied)
    (alert,) = wait_for(lambda: alerts(proxied, "login_failures", attacker))
    assert alert["severity"] == "warning"


def test_not_found_scan_blocks(proxied: Daemon) -> None:
    base = proxied.base_url
    scanner = "198.51.100.20"
    for index in range(10):
        assert status_of(base, f"/admin/backup-{index}.zip", client(scanner)) == 404
    wait_for(lambda: status_of(base, "/api/channels", client(scanner)) == 403)
    (alert,) = wait_for(lambda: alerts(proxied, "not_found_scan", scanner))
    assert alert["details"]["count"] == 10
    assert alert["details"]["blocked_for"] == 900
    reputation = monitor_call(proxied, "reputation", ip=scanner)["reputation"]
    # Ten 404s and one block: 100 - 20 - 20.
    assert reputation["score"] == pytest.approx(60, abs=0.5)
    assert reputation["blocked"] is True


def test_malicious_payloads_rejected_and_block(proxied: Daemon) -> None:
    base = proxied.base_url
    attacker = client("198.51.100.30")
    query = httpx.get(base + "/api/channels?limit=1'%20OR%20'1'='1", headers=attacker)
    assert query.status_code == 400
    assert query.json()["error"]["code"] == "malicious_payload"
    assert "sql_injection" in query.json()["error"]["message"]

    field = httpx.post(
        base + "/api/auth/register",
        json={
            "username": "<script>alert(1)</script>",
            "email": "x@example.test",
            "password": "Correct-Horse-9",
        },
        headers=attacker,
    )
    assert field.status_code == 400
    assert "script_injection" in field.json()["error"]["message"]

    # Passwords are data, so SQL in one is not a malicious payload.
    password = httpx.post(
        base + "/api/auth/register",
        json={
            "username": "mallory",
            "email": "m@example.test",
            "password": "' OR '1'='1 --",
        },
        headers=attacker,
    )
    assert password.status_code == 201

    deep = httpx.post(
        base + "/api/channels",
        content=b'{"name": ' + b"[" * 100 + b"]" * 100 + b"}",
        headers={"Content-Type": "application/json", **attacker},
    )
    assert deep.status_code == 400
    assert "json_too_deep" in deep.json()["error"]["message"]

    wait_for(lambda: status_of(base, "/api/channels", attacker) == 403)
    (alert,) = wait_for(lambda: alerts(proxied, "malicious_payload", "198.51.100.30"))
    assert alert["details"]["rule"] == "json_too_deep"
    assert alert["details"]["count"] == 3


def test_allowlisted_ip_never_blocked(proxied: Daemon) -> None:
    base = proxied.base_url
    trusted = "192.0.2.5"
    for _ in range(7):
        assert failed_login(base, client(trusted)) == 401
    (alert,) = wait_for(lambda: alerts(proxied, "login_failures", trusted))
    assert alert["severity"] == "info"
    assert alert["details"]["allowlisted"] is True
    assert alert["details"]["blocked"] is False
    assert status_of(base, "/api/channels", client(trusted)) == 401
    assert trusted not in blocked_ips(proxied)
    result = monitor_call(proxied, "reputation", ip=trusted)["reputation"]
    assert result["allowlisted"] is True
    assert result["score"] < 100


def test_ws_flood_rejected_then_closed(proxied: Daemon) -> None:
    user = register(proxied, "flooder")
    created = httpx.post(
        proxied.base_url + "/api/channels",
        json={"name": "flood"},
        headers={"Authorization": f"Bearer {user['access_token']}"},
    )
    assert created.status_code == 201
    url = f"{proxied.ws_url}?token={user['access_token']}&vsn=2.0.0"
    replies: dict[str, dict[str, Any]] = {}
    code = None
    # Leaving the block may raise again for the close that already happened.
    with (
        contextlib.suppress(ConnectionClosed),
        connect(url, open_timeout=5, additional_headers=client("198.51.100.50")) as ws,
    ):
        ws.send(json.dumps(["1", "1", "channel:flood", "phx_join", {}]))
        for ref in range(2, 12):
            body = {"body": f"message {ref}"}
            ws.send(json.dumps(["1", str(ref), "channel:flood", "new_msg", body]))
        try:
            while True:
                frame = json.loads(ws.recv(timeout=5))
                if frame[3] == "phx_reply":
                    replies[frame[1]] = frame[4]
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None

    # The join and 4 pushes fit into 5 messages a minute. The close waits for
    # the replies to the 4 stored pushes, and the 3 pushes read after it get no
    # reply and are not stored.
    assert replies["1"]["status"] == "ok"
    accepted = [replies[str(ref)] for ref in range(2, 6)]
    assert all(r["status"] == "ok" for r in accepted)
    rejected = [replies[str(ref)] for ref in range(6, 9)]
    assert all(r["status"] == "error" for r in rejected)
    assert all(r["response"] == {"reason": "rate_limited"} for r in rejected)
    assert set(replies) == {str(ref) for ref in range(1, 9)}
    assert code == 1008

    stored = [row[0] for row in query_db(proxied, "SELECT body FROM messages")]
    assert sorted(stored) == [f"message {ref}" for ref in range(2, 6)]
    (alert,) = wait_for(lambda: alerts(proxied, "ws_flood", "198.51.100.50"))
    assert alert["user_id"] == user["id"]
    assert alert["severity"] == "warning"


def test_ws_phoenix_topic_rate_limited(proxied: Daemon) -> None:
    """Only heartbeats are exempt; other `phoenix` messages count and flood."""
    user = register(proxied, "phoenix-flooder")
    url = f"{proxied.ws_url}?token={user['access_token']}&vsn=2.0.0"
    frames = [[None, f"h{ref}", "phoenix", "heartbeat", {}] for ref in range(10)]
    # The limit is 5 a minute: these 5 are allowed.
    frames += [
        [None, "t1", "phoenix", "access_token", {"token": "not-a-token"}],
        [None, "u1", "phoenix", "unknown_event", {}],
        ["j1", "j1", "phoenix", "phx_join", {}],
        [None, "t2", "phoenix", "access_token", {"token": "not-a-token"}],
        [None, "u2", "phoenix", "unknown_event", {}],
    ]
    # A heartbeat between rejected messages still gets its reply, and the third
    # rejected message (`ws_flood_close_after`) closes the connection.
    frames += [
        [None, "r1", "phoenix", "access_token", {"token": "not-a-token"}],
        [None, "h10", "phoenix", "heartbeat", {}],
        [None, "r2", "phoenix", "unknown_event", {}],
        ["r3", "r3", "phoenix", "phx_join", {}],
    ]
    replies: dict[str, dict[str, Any]] = {}
    code = None
    with (
        contextlib.suppress(ConnectionClosed),
        connect(url, open_timeout=5, additional_headers=client("198.51.100.55")) as ws,
    ):
        for frame in frames:
            ws.send(json.dumps(frame))
        try:
            while True:
                frame = json.loads(ws.recv(timeout=5))
                if frame[3] == "phx_reply":
                    replies[frame[1]] = frame[4]
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None

    for ref in [f"h{index}" for index in range(11)]:
        assert replies[ref] == {"status": "ok", "response": {}}, ref
    for ref in ("t1", "u1", "j1", "t2", "u2"):
        assert replies[ref]["status"] == "error", ref
        assert replies[ref]["response"].get("reason") != "rate_limited", ref
    for ref in ("r1", "r2", "r3"):
        assert replies[ref] == {
            "status": "error",
            "response": {"reason": "rate_limited"},
        }, ref
    assert code == 1008
    (alert,) = wait_for(lambda: alerts(proxied, "ws_flood", "198.51.100.55"))
    assert alert["user_id"] == user["id"]


def test_block_closes_open_websocket(proxied: Daemon) -> None:
    user = register(proxied, "watcher")
    url = f"{proxied.ws_url}?token={user['access_token']}&vsn=2.0.0"
    headers = client("198.51.100.60")
    with connect(url, open_timeout=5, additional_headers=headers) as ws:
        blocked_at = time.monotonic()
        result = monitor_call(proxied, "block", ip="198.51.100.60", duration=30)
        assert result["stored"] is True
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        elapsed = time.monotonic() - blocked_at
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "blocked"
    assert elapsed < 1.0

    with pytest.raises(InvalidStatus) as rejected:
        connect(url, open_timeout=5, additional_headers=headers)
    assert rejected.value.response.status_code == 403
    (alert,) = wait_for(lambda: alerts(proxied, "manual_block", "198.51.100.60"))
    assert alert["severity"] == "info"

    unblocked = monitor_call(proxied, "unblock", ip="198.51.100.60")
    assert unblocked["unblocked"] is True
    wait_for(lambda: status_of(proxied.base_url, "/api/channels", headers) == 401)
    with connect(url, open_timeout=5, additional_headers=headers):
        pass


def test_block_expires_and_escalates() -> None:
    settings = {
        "anomaly_detection.not_found_threshold": 3,
        "anomaly_detection.block_duration": 1.0,
        "anomaly_detection.block_multiplier": 2.0,
        "anomaly_detection.max_block_duration": 1.5,
        "ip_reputation.not_found_penalty": 0.0,
        "ip_reputation.block_penalty": 0.0,
        # Each block raises its own alert instead of a grouped follow-up.
        "security_alerts.group_window": 0,
    }
    with open_daemon(settings) as daemon:
        base = daemon.base_url
        durations = []
        for _ in range(3):
            for _ in range(2):
                assert status_of(base, "/nothing-here") == 404
            # The block starts after the third 404, so never before this.
            started = time.monotonic()
            assert status_of(base, "/nothing-here") == 404
            wait_for(lambda: status_of(base, "/api/channels") == 403)
            wait_for(lambda: status_of(base, "/api/channels") == 401, interval=0.02)
            durations.append(time.monotonic() - started)

        # 1 s, then 2 s capped at 1.5 s, then 1.5 s. The upper bounds leave
        # room for a loaded machine.
        assert 1.0 <= durations[0] < 2.5
        assert 1.5 <= durations[1] < 3.0
        assert 1.5 <= durations[2] < 3.0
        found = wait_for(
            lambda: (
                len(alerts(daemon, "not_found_scan", "127.0.0.1")) == 3
                and alerts(daemon, "not_found_scan", "127.0.0.1")
            )
        )
        by_offence = sorted(found, key=lambda alert: alert["details"]["offences"])
        assert [a["details"]["offences"] for a in by_offence] == [1, 2, 3]
        assert [a["severity"] for a in by_offence] == [
            "warning",
            "critical",
            "critical",
        ]
        assert [a["details"]["blocked_for"] for a in by_offence] == [1.0, 1.5, 1.5]


def test_http_rate_limit_429() -> None:
    # Limits count per acceptor process, so one acceptor must get every request.
    settings = {"security.rate_limit_api": 5, "server.acceptors": 1}
    with open_daemon(settings) as daemon:
        base = daemon.base_url
        statuses = [status_of(base, "/api/channels") for _ in range(5)]
        assert statuses == [401] * 5
        response = httpx.get(base + "/api/channels")
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 12
        # Health checks are exempt.
        assert status_of(base, "/health") == 200
        (alert,) = wait_for(lambda: alerts(daemon, "rate_limited", "127.0.0.1"))
        assert alert["severity"] == "info"
        assert alert["details"]["transport"] == "http"
        metrics = httpx.get(base + "/metrics").text
        assert 'deeperhub_security_rate_limited_total{transport="http"}' in metrics


def test_restart_keeps_blocks() -> None:
    folder = Path(tempfile.mkdtemp(prefix="dh-sec-"))
    try:
        with open_daemon(BEHIND_PROXY, folder=folder) as daemon:
            monitor_call(daemon, "block", ip="198.51.100.9", duration=None)
            for _ in range(5):
                failed_login(daemon.base_url, client("198.51.100.10"))
            wait_for(lambda: len(blocked_ips(daemon)) == 2)
            before = monitor_call(daemon, "reputation", ip="198.51.100.10")
        with open_daemon(BEHIND_PROXY, folder=folder) as daemon:
            assert blocked_ips(daemon) == ["198.51.100.10", "198.51.100.9"]
            after = monitor_call(daemon, "reputation", ip="198.51.100.10")
            assert after["reputation"]["offences"] == 1
            assert after["reputation"]["score"] == pytest.approx(
                before["reputation"]["score"], abs=1
            )
            for ip in ("198.51.100.9", "198.51.100.10"):
                response = httpx.get(daemon.base_url + "/api/x", headers=client(ip))
                assert response.status_code == 403
            rows = query_db(daemon, "SELECT ip, source FROM ip_blocks ORDER BY ip")
            assert rows == [("198.51.100.10", "anomaly"), ("198.51.100.9", "manual")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
