"""The acceptor's security gate: client IPs, blocks, rate limits, payload rules.

Every decision here is local, so the gate adds no round trip to a request:

- the client IP comes from the socket peer and, behind trusted proxies, the
  proxy header (`deeperhub.security.client_ip`);
- blocks and halved limits come from the security monitor's decisions, pushed
  over `security.sock` when they change and kept in a `DecisionCache`;
- rate limits are checked here: HTTP requests per IP, WebSocket messages per
  user across all of the user's connections. Every `security.rate_sync_interval`
  seconds the gate sends what it allowed to the monitor, which relays it to the
  other acceptors, and charges its limiters with what they allowed
  (`deeperhub.security.rate_sync`), so the limits count over all acceptors;
- payload rules run here (`deeperhub.security.rules`).

Events for the monitor (failed logins, 404s, malicious payloads, rate limit
hits, WebSocket floods) wait in a bounded queue and are sent by a background
task. When the queue is full they are dropped and counted.

Allowlisted IPs are never blocked or rate limited, but their events are sent.
When a decision blocks an IP, its open WebSockets are closed with 1008.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.metrics import (
    SECURITY_BLOCKED_REQUESTS,
    SECURITY_EVENTS_DROPPED,
    SECURITY_PAYLOADS_REJECTED,
    SECURITY_RATE_LIMITED,
)
from deeperhub.phoenix.protocol import EVENT_JOIN
from deeperhub.security.addresses import AddressSet
from deeperhub.security.anomaly import MALICIOUS_PAYLOAD
from deeperhub.security.client_ip import resolve_client_ip
from deeperhub.security.decisions import DecisionCache
from deeperhub.security.links import Link
from deeperhub.security.policy import RATE_LIMITED, WS_FLOOD
from deeperhub.security.rate_limit import RateLimiter, WindowCounter
from deeperhub.security.rate_sync import USAGE_EVENT, UsageLedger, parse_usage
from deeperhub.security.rules import (
    INSPECTED_FIELDS,
    JSON_TOO_DEEP,
    Match,
    inspect_field,
    inspect_headers,
    inspect_target,
    inspect_text,
    json_nesting_depth,
)
from deeperhub.ws.frames import CloseCode
from deeperhub.ws.handshake import error_response

from .hub import CLOSE_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import Iterable

    from deeperhub.config import Settings
    from deeperhub.http_head import RequestHead
    from deeperhub.ipc import RpcClient
    from deeperhub.phoenix.protocol import PhoenixMessage

    from .hub import Connection

__all__ = ["BLOCKED_REASON", "MessageVerdict", "Rejection", "SecurityGate"]

log = logging.getLogger("deeperhub.acceptor.security")

HTTP = "http"
WEBSOCKET = "websocket"
# Close reason sent to the WebSockets of an IP when it gets blocked.
BLOCKED_REASON = "blocked"
RATE_PERIOD = 60.0
# Events waiting for the security monitor. Past that they are dropped.
EVENT_QUEUE_SIZE = 10_000
# Seconds between two `rate_limited` events for one IP or user.
RATE_REPORT_INTERVAL = 60.0
# Seconds the `subscribe` request may take.
SUBSCRIBE_TIMEOUT = 5.0
# Seconds a starting acceptor waits for the monitor's decisions before it
# serves requests without them, so that blocks apply from the first request.
STARTUP_SNAPSHOT_TIMEOUT = 5.0
# Seconds between two attempts to send an event while the link reconnects.
SEND_RETRY_DELAY = 0.05
# Seconds between two log records about dropped events.
DROP_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Rejection:
    """An HTTP error response for a request the gate rejects."""

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}

    def response_bytes(self) -> bytes:
        """Return the complete HTTP/1.1 response, for the WebSocket upgrade path."""
        headers = [("Content-Type", "application/json"), *self.headers().items()]
        body = json.dumps(self.body()).encode()
        return error_response(self.status, tuple(headers), body)


@dataclass(frozen=True)
class MessageVerdict:
    """Why a WebSocket message is rejected, and whether to close the connection."""

    reason: str
    close: bool = False


class SecurityGate:
    """Security checks of one acceptor process, fed by the security monitor."""

    def __init__(self, settings: Settings) -> None:
        self.trusted_proxies = AddressSet(settings["security.trusted_proxies"])
        self.proxy_header = str(settings["security.proxy_header"])
        self.allowlist = AddressSet(settings["security.allowlist"])
        self.api_limit = int(settings["security.rate_limit_api"])
        self.ws_limit = int(settings["security.rate_limit_ws"])
        self.ws_close_after = int(settings["security.ws_flood_close_after"])
        self.inspect_bodies = bool(settings["security.inspect_message_bodies"])
        self.max_json_depth = int(settings["security.max_json_depth"])
        self.rate_sync_interval = float(settings["security.rate_sync_interval"])
        max_keys = int(settings["security.max_tracked_ips"])

        self.decisions = DecisionCache()
        # The limiters count this acceptor's events when it allows them and the
        # other acceptors' events when their usage arrives (`apply_usage`).
        self.api_limiter = RateLimiter[str](period=RATE_PERIOD, max_keys=max_keys)
        self.ws_limiter = RateLimiter[int](period=RATE_PERIOD, max_keys=max_keys)
        self.ws_rejections = WindowCounter[int](
            RATE_PERIOD, max_events=self.ws_close_after, max_keys=max_keys
        )
        self.usage = UsageLedger(max_keys)
        self.link = Link(settings.socket_path("security"), "security monitor")
        self.subscribed = trio.Event()
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](
            EVENT_QUEUE_SIZE
        )
        self._rate_reports: dict[str, tuple[float, int]] = {}
        self._max_keys = max_keys
        self._connections: dict[str, set[Connection]] = {}
        self._connection_ips: dict[Connection, str] = {}
        self._dropped = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL

    # Client identity.

    def client_ip(self, peer: str, headers: Iterable[tuple[str, str]]) -> str:
        """Return the canonical client IP of a request from `peer`."""
        return resolve_client_ip(peer, headers, self.trusted_proxies, self.proxy_header)

    # Checks shared by HTTP and WebSocket upgrades.

    def check_access(
        self, ip: str, transport: str, *, rate_limited: bool = True
    ) -> Rejection | None:
        """Reject a blocked IP (403) or one over the HTTP rate limit (429)."""
        if ip in self.allowlist:
            return None
        if self.decisions.blocked(ip) is not None:
            SECURITY_BLOCKED_REQUESTS.labels(transport=transport).inc()
            return Rejection(403, "forbidden", "requests from this address are blocked")
        if not rate_limited:
            return None

        factor = self.decisions.rate_factor(ip)
        limit = self.api_limit * factor
        decision = self.api_limiter.check(ip, limit)
        if decision.allowed:
            self.usage.add_api(ip, factor)
            return None
        SECURITY_RATE_LIMITED.labels(transport=HTTP).inc()
        self._report_rate_limited(ip, ip, None, transport)
        return Rejection(
            429,
            "rate_limited",
            f"rate limit of {limit:g} requests per minute exceeded; retry in "
            f"{decision.retry_after_seconds} s",
            retry_after=decision.retry_after_seconds,
        )

    def inspect_request(
        self, ip: str, path: str, query: str, headers: Iterable[tuple[str, str]]
    ) -> Rejection | None:
        """Apply the payload rules to a raw path, query string and headers."""
        found = inspect_target(path, query) or inspect_headers(headers)
        return None if found is None else self.reject_payload(ip, found, path)

    def inspect_json_body(self, ip: str, path: str, data: bytes) -> Rejection | None:
        """Apply the depth rule and the field rules to a JSON request body."""
        if not data:
            return None
        if json_nesting_depth(data, self.max_json_depth) > self.max_json_depth:
            return self.reject_payload(ip, Match(JSON_TOO_DEEP, "body"), path)
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return None  # the route responds with 400 invalid_json
        if not isinstance(document, dict):
            return None
        for name in INSPECTED_FIELDS:
            found = inspect_field(name, document.get(name))
            if found is not None:
                return self.reject_payload(ip, found, path)
        if self.inspect_bodies:
            found = inspect_field("body", document.get("body"))
            if found is not None:
                return self.reject_payload(ip, found, path)
        return None

    def reject_payload(self, ip: str, found: Match, path: str) -> Rejection:
        """Count and report a malicious payload, and return its 400 response."""
        SECURITY_PAYLOADS_REJECTED.labels(rule=found.rule).inc()
        log.info(
            "rejected request from %s: rule %s matched in %s",
            ip,
            found.rule,
            found.location,
        )
        self.report(
            MALICIOUS_PAYLOAD,
            ip,
            rule=found.rule,
            location=found.location,
            path=path,
        )
        return Rejection(
            400,
            "malicious_payload",
            f"request rejected by the {found.rule} rule ({found.location})",
        )

    # WebSockets.

    async def admit_upgrade(
        self, stream: trio.abc.SendStream, head: RequestHead
    ) -> bool:
        """Check a WebSocket upgrade request and send the error response if rejected.

        The upgrade counts as one HTTP request for the rate limit.
        """
        ip = self.client_ip(head.client[0], head.headers)
        query = head.target.partition("?")[2]
        rejection = self.check_access(ip, WEBSOCKET) or self.inspect_request(
            ip, head.path, query, head.headers
        )
        if rejection is None:
            return True
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await stream.send_all(rejection.response_bytes())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return False

    def track(self, connection: Connection, head: RequestHead) -> None:
        """Remember the client IP of an open connection, to close it on a block."""
        ip = self.client_ip(head.client[0], head.headers)
        self._connection_ips[connection] = ip
        self._connections.setdefault(ip, set()).add(connection)
        if self.decisions.blocked(ip) is not None and ip not in self.allowlist:
            connection.close(CloseCode.POLICY_VIOLATION, BLOCKED_REASON)

    def untrack(self, connection: Connection) -> None:
        ip = self._connection_ips.pop(connection, None)
        if ip is None:
            return
        connections = self._connections.get(ip)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._connections[ip]

    def check_message(
        self, connection: Connection, message: PhoenixMessage
    ) -> MessageVerdict | None:
        """Rate limit and inspect one client message; the caller skips heartbeats."""
        ip = self._connection_ips.get(connection, "")
        user_id = connection.user_id
        if ip not in self.allowlist:
            factor = self.decisions.rate_factor(ip)
            if not self.ws_limiter.check(user_id, self.ws_limit * factor).allowed:
                return self._reject_message(connection, ip)
            self.usage.add_ws(user_id, factor)

        if message.event == EVENT_JOIN:
            found = inspect_field("topic", message.topic)
        elif self.inspect_bodies:
            body = message.payload.get("body")
            found = inspect_text(body, "field:body") if isinstance(body, str) else None
        else:
            found = None
        if found is not None:
            self.reject_payload(ip, found, "/socket/websocket")
            return MessageVerdict("malicious_payload")
        return None

    def _reject_message(self, connection: Connection, ip: str) -> MessageVerdict:
        user_id = connection.user_id
        SECURITY_RATE_LIMITED.labels(transport=WEBSOCKET).inc()
        rejected = self.ws_rejections.add(user_id)
        if rejected < self.ws_close_after:
            self._report_rate_limited(f"user:{user_id}", ip, user_id, WEBSOCKET)
            return MessageVerdict("rate_limited")
        self.ws_rejections.clear(user_id)
        log.warning(
            "closing WebSocket of user %d from %s: %d messages over the rate limit "
            "within %g s",
            user_id,
            ip,
            rejected,
            RATE_PERIOD,
            extra=connection.extra,
        )
        self.report(WS_FLOOD, ip, user_id, rejected=rejected, window=RATE_PERIOD)
        return MessageVerdict("rate_limited", close=True)

    # Decisions from the monitor.

    def apply_decision(self, message: dict[str, Any]) -> None:
        """Store one pushed decision and close the WebSockets of a blocked IP."""
        ip = self.decisions.apply(message)
        if ip is not None:
            self._close_blocked(ip)

    def apply_snapshot(self, decisions: Iterable[dict[str, Any]]) -> None:
        for ip in self.decisions.replace(decisions):
            self._close_blocked(ip)

    def _close_blocked(self, ip: str) -> None:
        if ip in self.allowlist:
            return
        connections = list(self._connections.get(ip, ()))
        for connection in connections:
            connection.close(CloseCode.POLICY_VIOLATION, BLOCKED_REASON)
        if connections:
            log.warning(
                "closed %d WebSocket connections of blocked IP %s",
                len(connections),
                ip,
            )

    # Usage of the other acceptors.

    def apply_usage(self, message: dict[str, Any]) -> None:
        """Charge the limiters with the events another acceptor allowed.

        Counts are weighted by the rate factor the sender applied, so they are
        charged against the full limits.
        """
        usage = parse_usage(message)
        for ip, count in usage.api.items():
            if ip not in self.allowlist:
                self.api_limiter.charge(ip, count, self.api_limit)
        for user_id, count in usage.ws.items():
            self.ws_limiter.charge(user_id, count, self.ws_limit)

    # Events for the monitor.

    def report(
        self, kind: str, ip: str, user_id: int | None = None, **details: Any
    ) -> None:
        """Queue one security event for the monitor without blocking."""
        event: dict[str, Any] = {"event": "security", "kind": kind, "ip": ip}
        if user_id is not None:
            event["user_id"] = user_id
        if details:
            event["details"] = details
        try:
            self._events_send.send_nowait(event)
        except trio.WouldBlock:
            self._count_dropped(kind)

    def _count_dropped(self, kind: str) -> None:
        SECURITY_EVENTS_DROPPED.inc()
        self._dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            self._drop_logged_at = now
            log.warning(
                "dropped %d security events (last: %s): %d are waiting for the "
                "security monitor",
                self._dropped,
                kind,
                EVENT_QUEUE_SIZE,
            )
            self._dropped = 0

    def _report_rate_limited(
        self, key: str, ip: str, user_id: int | None, transport: str
    ) -> None:
        """Report a rate limit hit at most once per RATE_REPORT_INTERVAL per key."""
        now = time.monotonic()
        next_at, suppressed = self._rate_reports.get(key, (0.0, 0))
        if now < next_at:
            self._rate_reports[key] = (next_at, suppressed + 1)
            return
        if len(self._rate_reports) >= self._max_keys:
            self._forget_rate_reports(now)
        self._rate_reports[key] = (now + RATE_REPORT_INTERVAL, 0)
        self.report(
            RATE_LIMITED,
            ip,
            user_id,
            transport=transport,
            rejected=suppressed + 1,
        )

    def _forget_rate_reports(self, now: float) -> None:
        for key in [k for k, (at, _) in self._rate_reports.items() if at <= now]:
            del self._rate_reports[key]
        while len(self._rate_reports) >= self._max_keys:
            del self._rate_reports[next(iter(self._rate_reports))]

    # The link to the monitor.

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the monitor link open and send queued events and usage, forever.

        Reports started once the first snapshot of decisions is applied, or
        after STARTUP_SNAPSHOT_TIMEOUT seconds without one.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.link.run, self._subscribe)
            nursery.start_soon(self._send_events)
            nursery.start_soon(self._send_usage)
            with trio.move_on_after(STARTUP_SNAPSHOT_TIMEOUT):
                await self.subscribed.wait()
            if not self.subscribed.is_set():
                log.warning(
                    "no decisions from the security monitor after %g s; serving "
                    "without blocks until it replies",
                    STARTUP_SNAPSHOT_TIMEOUT,
                )
            task_status.started()

    async def _subscribe(self, client: RpcClient) -> None:
        result = await client.call("subscribe", timeout=SUBSCRIBE_TIMEOUT)
        decisions = result.get("decisions") if isinstance(result, dict) else None
        self.apply_snapshot(decisions if isinstance(decisions, list) else [])
        self.subscribed.set()
        log.info(
            "subscribed to the security monitor: %d decisions", len(self.decisions)
        )
        # Pushes that arrived before the reply are newer than the snapshot and
        # wait in `client.events`, so applying them in order is correct.
        async for event in client.events:
            if event.get("event") == "decision":
                self.apply_decision(event)
            elif event.get("event") == USAGE_EVENT:
                self.apply_usage(event)

    async def _send_events(self) -> None:
        async for event in self._events:
            while not await self.link.notify(event):
                await self.link.connected.wait()
                # The link may still look connected right after its peer closed.
                await trio.sleep(SEND_RETRY_DELAY)

    async def _send_usage(self) -> None:
        """Send the usage allowed since the last send, every sync interval.

        Nothing is sent while idle. Usage that cannot be sent because the
        monitor is down is dropped, so the other acceptors never count it.
        """
        while True:
            await trio.sleep(self.rate_sync_interval)
            usage = self.usage.take()
            if usage:
                await self.link.notify(usage.message())
