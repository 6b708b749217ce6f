"""The security monitor's I/O around `SecurityPolicy`.

`Monitor` turns acceptor events and operator requests into policy calls, and
carries out the resulting `Effects`:

- decisions are pushed to every subscribed acceptor at once, through a
  bounded outbox per acceptor, so a slow acceptor never delays the others;
- each acceptor's rate limit usage is relayed through the same outboxes to
  every other subscribed acceptor, so the limits count over all acceptors;
- block records, scores and alerts go through one write queue to the DB
  writer, in order, retried until the DB writer accepts them;
- after an alert is stored, the alert dispatcher is woken up over
  `alerts.sock` (it also scans its outbox on its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from deeperhub.ipc import RemoteError, RpcClient
from deeperhub.metrics import (
    SECURITY_ALERTS,
    SECURITY_BLOCKS,
    SECURITY_BLOCKS_ACTIVE,
    SECURITY_EVENTS,
    SECURITY_LOGIN_FAILURES,
    SECURITY_REPUTATION_IPS,
)
from deeperhub.security.alerts import SEVERITIES, severity_rank
from deeperhub.security.anomaly import LOGIN_FAILED
from deeperhub.security.config import LOG
from deeperhub.security.links import LinkDown
from deeperhub.security.policy import (
    ALERT_TYPES,
    HIGH_RISK_ALERT,
    MANUAL_BLOCK_ALERT,
    OBSERVATION_KINDS,
    Observation,
)
from deeperhub.security.rate_sync import USAGE_EVENT, parse_usage
from deeperhub.storage.security_reads import security_events

if TYPE_CHECKING:
    from deeperhub.ipc import MessageStream
    from deeperhub.security.alerts import AlertDraft
    from deeperhub.security.blocks import Block
    from deeperhub.security.config import AlertConfig, MonitorConfig
    from deeperhub.security.links import Link
    from deeperhub.security.policy import Effects, SecurityPolicy
    from deeperhub.storage.reads import ReadPool

__all__ = ["OPERATOR_OPS", "Monitor"]

log = logging.getLogger("deeperhub.security_monitor")

# Seconds one DB writer request may take before it is retried.
WRITE_TIMEOUT = 10.0
# Seconds between two retries of a write while the DB writer is unreachable.
WRITE_RETRY_DELAY = 0.5
# Writes waiting for the DB writer. Past that new ones are dropped and logged.
WRITE_QUEUE_SIZE = 10_000
# Decisions and relayed usage waiting to be sent to one acceptor. Past that it
# is disconnected and gets a fresh snapshot when it reconnects.
SUBSCRIBER_OUTBOX = 10_000
# Seconds between two saves of the changed reputation scores.
SCORE_SAVE_INTERVAL = 1.0
# Scores per `security_save_scores` request.
SCORE_BATCH = 500
# Seconds between two deletions of old alerts and block records.
PRUNE_INTERVAL = 3600.0
# Seconds a `block` or `unblock` request waits for its write to be stored.
COMMAND_TIMEOUT = 10.0
EVENTS_LIMIT_MAX = 1000
# Requests for operators, handled by `Monitor.handle_request`.
OPERATOR_OPS = ("blocked", "block", "unblock", "reputation", "events", "stats")


@dataclass
class _Write:
    """One DB writer request. `done` is set once it is stored or given up."""

    op: str
    args: dict[str, Any]
    alert: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    stored: bool = False


class _Subscriber:
    """An acceptor connection that receives decision pushes and relayed usage."""

    def __init__(self, peer: RpcClient, number: int) -> None:
        self.peer = peer
        self.number = number
        self._send, self._outbox = trio.open_memory_channel[dict[str, Any]](
            SUBSCRIBER_OUTBOX
        )
        self.cancel_scope = trio.CancelScope()

    def push(self, message: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            log.warning(
                "disconnecting acceptor connection %d: %d messages were not read",
                self.number,
                SUBSCRIBER_OUTBOX,
            )
            self.cancel_scope.cancel()
        except trio.ClosedResourceError:
            pass

    async def run_sender(self) -> None:
        try:
            async for message in self._outbox:
                await self.peer.notify(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.cancel_scope.cancel()

    def close(self) -> None:
        self._send.close()


class Monitor:
    """Policy calls from the security socket, and their effects."""

    def __init__(
        self,
        policy: SecurityPolicy,
        monitor_config: MonitorConfig,
        alert_config: AlertConfig,
        *,
        db: Link,
        alerts: Link,
        reads: ReadPool,
    ) -> None:
        self.policy = policy
        self.config = monitor_config
        self.alert_config = alert_config
        self.db = db
        self.alerts = alerts
        self.reads = reads
        self._writes_send, self._writes = trio.open_memory_channel[_Write](
            WRITE_QUEUE_SIZE
        )
        self._subscribers: set[_Subscriber] = set()
        self._connections = 0
        self._events_seen: dict[str, int] = {}
        self._usage_relayed = 0
        # Counters with labels exist only once a label value is used, and
        # Prometheus' increase() misses the first event of a new series, so the
        # labels alert rules watch are created at 0.
        for reason in (*ALERT_TYPES.values(), MANUAL_BLOCK_ALERT, HIGH_RISK_ALERT):
            SECURITY_BLOCKS.labels(reason=reason)
        for severity in SEVERITIES:
            SECURITY_ALERTS.labels(severity=severity)
        self.update_gauges()

    # Connections on security.sock.

    async def handle_connection(self, messages: MessageStream) -> None:
        """Serve one connection: requests, acceptor events and decision pushes."""
        self._connections += 1
        number = self._connections
        subscriber: _Subscriber | None = None

        async with trio.open_nursery() as nursery:

            async def handle_request(op: str, args: dict[str, Any]) -> Any:
                nonlocal subscriber
                if op == "subscribe":
                    if subscriber is None:
                        subscriber = _Subscriber(peer, number)
                        self._subscribers.add(subscriber)
                        nursery.start_soon(
                            self._run_subscriber, subscriber, nursery.cancel_scope
                        )
                    return {"decisions": self.policy.snapshot()}
                return await self.handle_request(op, args)

            peer = RpcClient(messages, 10_000, handle_request)
            nursery.start_soon(peer.run_receiver)
            async for event in peer.events:
                if event.get("event") == USAGE_EVENT:
                    self.relay_usage(event, number, sender=subscriber)
                else:
                    self.handle_event(event)
            nursery.cancel_scope.cancel()

    async def _run_subscriber(
        self, subscriber: _Subscriber, connection_scope: trio.CancelScope
    ) -> None:
        log.info("acceptor connection %d subscribed to decisions", subscriber.number)
        try:
            with subscriber.cancel_scope:
                await subscriber.run_sender()
        finally:
            self._subscribers.discard(subscriber)
            subscriber.close()
            # The acceptor missed decisions, so end the connection: it
            # reconnects and subscribes again for a fresh snapshot.
            connection_scope.cancel()

    def handle_event(self, event: dict[str, Any]) -> None:
        """Apply one acceptor event `{"event": "security", "kind", "ip", ...}`."""
        if event.get("event") != "security":
            log.debug("ignoring event %r", event.get("event"))
            return
        kind = event.get("kind")
        ip = event.get("ip")
        if kind not in OBSERVATION_KINDS or not isinstance(ip, str):
            log.warning("ignoring security event with kind %r and ip %r", kind, ip)
            return
        user_id = event.get("user_id")
        details = event.get("details")
        observation = Observation(
            kind=str(kind),
            ip=ip,
            user_id=user_id if isinstance(user_id, int) else None,
            details=details if isinstance(details, dict) else {},
        )
        SECURITY_EVENTS.labels(kind=observation.kind).inc()
        if observation.kind == LOGIN_FAILED:
            SECURITY_LOGIN_FAILURES.inc()
        self._events_seen[observation.kind] = (
            self._events_seen.get(observation.kind, 0) + 1
        )
        self.apply(self.policy.observe(observation))

    def relay_usage(
        self,
        event: dict[str, Any],
        connection: int,
        sender: _Subscriber | None = None,
    ) -> None:
        """Push rate limit usage from `connection` to every other subscriber.

        `sender` is the subscription of `connection`, if it has one, so the
        acceptor never gets its own usage back.
        """
        usage = parse_usage(event)
        if not usage:
            log.warning(
                "ignoring usage message without valid counts from connection %d",
                connection,
            )
            return
        self._usage_relayed += 1
        message = usage.message()
        for subscriber in list(self._subscribers):
            if subscriber is not sender:
                subscriber.push(message)

    # Operator and acceptor requests.

    async def handle_request(self, op: str, args: dict[str, Any]) -> Any:
        """Handle one request, or raise RemoteError for an invalid one."""
        if op == "ping":
            return {}
        if op == "stats":
            return self.stats()
        if op == "blocked":
            return {"blocked": self.policy.blocked_ips()}
        if op == "reputation":
            try:
                return {"reputation": self.policy.describe(_ip_arg(args))}
            except ValueError as exc:
                raise RemoteError("invalid", str(exc)) from None
        if op == "block":
            return await self._block(args)
        if op == "unblock":
            return await self._unblock(args)
        if op == "events":
            return {"events": await self._events(args)}
        raise RemoteError("invalid", f"unknown op {op}")

    async def _block(self, args: dict[str, Any]) -> dict[str, Any]:
        ip = _ip_arg(args)
        # `seconds` is the name `bin/deeperhub remote`'s block_ip uses.
        duration = args.get("duration", args.get("seconds"))
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or duration <= 0
        ):
            raise RemoteError(
                "invalid", f"invalid duration {duration!r}: expected seconds above 0"
            )
        reason = args.get("reason")
        try:
            effects = self.policy.block(ip, duration, str(reason or ""))
        except ValueError as exc:
            raise RemoteError("invalid", str(exc)) from None
        writes = self.apply(effects)
        stored = await self._wait_stored(writes)
        log.warning(
            "IP %s blocked by an operator for %s",
            ip,
            "ever" if duration is None else f"{duration:g} s",
        )
        return {"reputation": self.policy.describe(ip), "stored": stored}

    async def _unblock(self, args: dict[str, Any]) -> dict[str, Any]:
        ip = _ip_arg(args)
        try:
            effects, was_blocked = self.policy.unblock(ip)
        except ValueError as exc:
            raise RemoteError("invalid", str(exc)) from None
        stored = await self._wait_stored(self.apply(effects))
        log.warning("IP %s unblocked by an operator (was blocked: %s)", ip, was_blocked)
        return {"unblocked": was_blocked, "stored": stored}

    async def _events(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        since = args.get("since")
        severity = args.get("severity")
        limit = args.get("limit", 100)
        if since is not None and not isinstance(since, str):
            raise RemoteError("invalid", "invalid since: expected an ISO 8601 time")
        if severity is not None and severity not in SEVERITIES:
            raise RemoteError(
                "invalid",
                f"invalid severity {severity!r}: expected {', '.join(SEVERITIES)}",
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RemoteError("invalid", f"invalid limit {limit!r}: expected 1 or more")
        return await self.reads.run(
            security_events, since, severity, min(limit, EVENTS_LIMIT_MAX)
        )

    def stats(self) -> dict[str, Any]:
        return {
            "events": dict(self._events_seen),
            "blocked": self.policy.blocked_count(),
            "scored_ips": len(self.policy.reputation),
            "subscribers": len(self._subscribers),
            "usage_relayed": self._usage_relayed,
            "queued_writes": self._writes.statistics().current_buffer_used,
        }

    # Effects.

    def apply(self, effects: Effects) -> list[_Write]:
        """Push decisions and queue the writes of `effects`, and return the writes."""
        for decision in effects.decisions:
            message = {"event": "decision", **decision}
            for subscriber in list(self._subscribers):
                subscriber.push(message)
        writes = [self._queue_block(block) for block in effects.blocks]
        writes += [
            self._queue(_Write("security_unblock", {"ip": ip}))
            for ip in effects.unblocked
        ]
        writes += [self._queue_alert(draft) for draft in effects.alerts]
        if effects.blocks or effects.decisions:
            self.update_gauges()
        return writes

    def _queue_block(self, block: Block) -> _Write:
        SECURITY_BLOCKS.labels(reason=block.reason).inc()
        if block.source != "manual":
            log.warning(
                "IP %s blocked for %s after %s (offence %d)",
                block.ip,
                "ever"
                if block.expires_at is None
                else f"{block.expires_at - block.created_at:g} s",
                block.reason,
                block.offences,
            )
        args = {
            "ip": block.ip,
            "reason": block.reason,
            "source": block.source,
            "created_at": block.created_at,
            "expires_at": block.expires_at,
            "offences": block.offences,
        }
        return self._queue(_Write("security_block", args))

    def _queue_alert(self, draft: AlertDraft) -> _Write:
        SECURITY_ALERTS.labels(severity=draft.severity).inc()
        if draft.type == HIGH_RISK_ALERT:
            # A high-risk score blocks without a block record, so it is
            # counted here, from its alert (and the alert's grouped repeats).
            SECURITY_BLOCKS.labels(reason=HIGH_RISK_ALERT).inc(draft.count)
        now = self.policy.clock()
        external = severity_rank(draft.severity) >= severity_rank(
            self.alert_config.min_severity
        )
        channels = [
            channel
            for channel in self.alert_config.channels
            if channel == LOG or external
        ]
        args = {
            "type": draft.type,
            "severity": draft.severity,
            "ip": draft.ip,
            "user_id": draft.user_id,
            "details": draft.details,
            "count": draft.count,
            "channels": channels,
            "now": now,
            "deadline": now + self.alert_config.delivery_deadline,
        }
        return self._queue(_Write("security_record_alert", args, alert=True))

    def _queue(self, write: _Write) -> _Write:
        try:
            self._writes_send.send_nowait(write)
        except trio.WouldBlock:
            log.error(
                "dropping %s for %s: %d writes are waiting for the DB writer",
                write.op,
                write.args.get("ip"),
                WRITE_QUEUE_SIZE,
            )
            write.done.set()
        return write

    async def _wait_stored(self, writes: list[_Write]) -> bool:
        with trio.move_on_after(COMMAND_TIMEOUT):
            for write in writes:
                await write.done.wait()
            return all(write.stored for write in writes)
        return False

    def update_gauges(self) -> None:
        SECURITY_BLOCKS_ACTIVE.set(self.policy.blocked_count())
        for bucket, count in self.policy.risk_buckets().items():
            SECURITY_REPUTATION_IPS.labels(bucket=bucket).set(count)

    # Background tasks.

    async def run_writes(self) -> None:
        """Send queued writes to the DB writer in order, retrying each until stored."""
        async for write in self._writes:
            await self._store(write)

    async def _store(self, write: _Write) -> None:
        failures = 0
        while True:
            try:
                result = await self.db.call(
                    write.op, timeout=WRITE_TIMEOUT, **write.args
                )
            except RemoteError as exc:
                # The DB writer rejected the arguments: retrying cannot help.
                log.error("DB writer rejected %s: %s", write.op, exc)
                break
            except (LinkDown, trio.TooSlowError) as exc:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.warning(
                        "cannot store %s (attempt %d): %s; retrying",
                        write.op,
                        failures,
                        exc or "timed out",
                    )
                await trio.sleep(WRITE_RETRY_DELAY)
                continue
            write.stored = True
            if write.alert:
                await self._after_alert_stored(result)
            break
        write.done.set()

    async def _after_alert_stored(self, result: Any) -> None:
        event = result.get("event", {}) if isinstance(result, dict) else {}
        log.info(
            "recorded security alert %s: %s (%s) ip=%s count=%s",
            event.get("id"),
            event.get("type"),
            event.get("severity"),
            event.get("ip"),
            event.get("count"),
        )
        # The dispatcher also scans its outbox on its own, so a lost wake-up
        # only delays the delivery.
        await self.alerts.notify({"event": "outbox", "alert_id": event.get("id")})

    async def run_checks(self) -> None:
        """Recompute decisions every check interval and save changed scores."""
        next_check = trio.current_time() + self.config.check_interval
        next_prune = trio.current_time()
        while True:
            await trio.sleep(min(SCORE_SAVE_INTERVAL, self.config.check_interval))
            now = trio.current_time()
            if now >= next_check:
                next_check = now + self.config.check_interval
                self.apply(self.policy.tick())
                self.update_gauges()
            if now >= next_prune:
                next_prune = now + PRUNE_INTERVAL
                self._queue_prune()
            self.save_scores()

    def save_scores(self) -> None:
        """Queue the scores changed since the last save."""
        scores, removed = self.policy.take_scores()
        for start in range(0, max(len(scores), len(removed)), SCORE_BATCH):
            args = {
                "scores": scores[start : start + SCORE_BATCH],
                "removed": removed[start : start + SCORE_BATCH],
            }
            self._queue(_Write("security_save_scores", args))

    def _queue_prune(self) -> None:
        now = self.policy.clock()
        cutoff = now - self.config.retention_days * 86400
        events_before = datetime.fromtimestamp(cutoff, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
        blocks_before = now - self.config.escalation.reset_after
        self._queue(
            _Write(
                "security_prune",
                {"events_before": events_before, "blocks_before": blocks_before},
            )
        )

    async def drain(self, timeout: float) -> None:
        """Save scores and wait up to `timeout` seconds for queued writes."""
        self.save_scores()
        marker = self._queue(_Write("ping", {}))
        with trio.move_on_after(timeout):
            await marker.done.wait()
        pending = self._writes.statistics().current_buffer_used
        if pending:
            log.warning("stopping with %d security writes not stored", pending)


def _ip_arg(args: dict[str, Any]) -> str:
    ip = args.get("ip")
    if not isinstance(ip, str) or not ip:
        raise RemoteError("invalid", "missing ip: expected an IPv4 or IPv6 address")
    return ip
