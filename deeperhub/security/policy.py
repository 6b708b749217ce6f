"""The security monitor's decisions, without I/O.

`SecurityPolicy` takes observations from acceptors (a failed login, a 404, a
malicious payload, a rate limit hit, a WebSocket flood) and operator commands,
and returns `Effects`: alerts to record, block records to store or delete,
and decisions to push to acceptors. The caller owns the clock (Unix seconds
that do not jump, see `workers.security_monitor.clock`).

A decision for one IP is `{"ip", "blocked", "ttl", "reason", "rate_factor"}`:
`ttl` is the seconds left (None while `blocked` means until unblocked) and
`rate_factor` is 0.5 for medium and high risk, else 1.0. An IP is blocked
while it has an active block or its score is below the high-risk threshold.
Allowlisted IPs are never blocked, but their events are scored and alerted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .addresses import canonical_ip
from .alerts import AlertDraft, AlertGrouper
from .anomaly import LOGIN_FAILED, MALICIOUS_PAYLOAD, NOT_FOUND, AnomalyDetector
from .blocks import ANOMALY, MANUAL, Block, BlockList
from .reputation import HIGH_RISK, LOW_RISK, ReputationBook

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from .config import MonitorConfig

__all__ = [
    "ALERT_TYPES",
    "HIGH_RISK_ALERT",
    "MANUAL_BLOCK_ALERT",
    "MANUAL_UNBLOCK_ALERT",
    "OBSERVATION_KINDS",
    "RATE_LIMITED",
    "REFRESH_TOKEN_REUSE",
    "WS_FLOOD",
    "Effects",
    "Observation",
    "SecurityPolicy",
]

RATE_LIMITED = "rate_limited"
WS_FLOOD = "ws_flood"
# Sent by the token code of the acceptor when a used refresh token comes back.
REFRESH_TOKEN_REUSE = "refresh_token_reuse"
OBSERVATION_KINDS = (
    LOGIN_FAILED,
    NOT_FOUND,
    MALICIOUS_PAYLOAD,
    RATE_LIMITED,
    WS_FLOOD,
    REFRESH_TOKEN_REUSE,
)

# Alert type raised when a kind crosses its threshold.
ALERT_TYPES = {
    LOGIN_FAILED: "login_failures",
    NOT_FOUND: "not_found_scan",
    MALICIOUS_PAYLOAD: "malicious_payload",
}
HIGH_RISK_ALERT = "ip_high_risk"
MANUAL_BLOCK_ALERT = "manual_block"
MANUAL_UNBLOCK_ALERT = "manual_unblock"

# Observation details kept in alerts: at most this many keys, strings cut.
_MAX_DETAIL_KEYS = 10
_MAX_DETAIL_CHARS = 256


@dataclass(frozen=True)
class Observation:
    """One event an acceptor reported."""

    kind: str
    ip: str
    user_id: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Effects:
    """What the caller must do after a policy call."""

    alerts: list[AlertDraft] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)  # to store
    unblocked: list[str] = field(default_factory=list)  # records to delete
    decisions: list[dict[str, Any]] = field(default_factory=list)  # to push

    def __bool__(self) -> bool:
        return bool(self.alerts or self.blocks or self.unblocked or self.decisions)


@dataclass(frozen=True)
class _State:
    blocked: bool
    expires_at: float | None
    reason: str | None
    rate_factor: float


_DEFAULT_STATE = _State(False, None, None, 1.0)


class SecurityPolicy:
    """Counters, scores and blocks of every IP, and the decisions they produce."""

    def __init__(self, config: MonitorConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.detector = AnomalyDetector(
            config.thresholds, clock, max_keys=config.max_tracked_ips
        )
        self.reputation = ReputationBook(
            recovery_per_hour=config.recovery_per_hour,
            high_risk_threshold=config.high_risk_threshold,
            medium_risk_threshold=config.medium_risk_threshold,
            max_entries=config.max_tracked_ips,
        )
        self.blocks = BlockList()
        self.grouper = AlertGrouper(config.group_window)
        # Last state pushed per IP, without the IPs in the default state.
        self._published: dict[str, _State] = {}
        self._dirty_scores: set[str] = set()
        self._removed_scores: set[str] = set()

    # State from storage.

    def load(
        self, blocks: Iterable[Mapping[str, Any]], scores: Iterable[Mapping[str, Any]]
    ) -> None:
        """Restore block records and scores read from the database."""
        for row in blocks:
            self.blocks.put(
                Block(
                    ip=str(row["ip"]),
                    reason=str(row["reason"]),
                    source=str(row["source"]),
                    created_at=float(row["created_at"]),
                    expires_at=_optional_float(row["expires_at"]),
                    offences=int(row["offences"]),
                )
            )
        for row in scores:
            self.reputation.load(
                str(row["ip"]), float(row["score"]), float(row["updated_at"])
            )
        now = self.clock()
        for ip in self._tracked_ips():
            state = self._state(ip, now)
            if state != _DEFAULT_STATE:
                self._published[ip] = state

    # Inputs.

    def observe(self, observation: Observation) -> Effects:
        """Score and count one observation, then block, alert and push as needed."""
        effects = Effects()
        ip = canonical_ip(observation.ip)
        if ip is None or observation.kind not in OBSERVATION_KINDS:
            return effects
        now = self.clock()
        level_before = self._level(ip, now)
        details = _clean_details(observation.details)
        user_id = observation.user_id

        penalty = self.config.penalties.get(observation.kind, 0.0)
        if penalty:
            self.reputation.penalize(ip, penalty, now)
            self._score_changed(ip)

        count = self.detector.record(observation.kind, ip)
        if count is not None:
            self._threshold_crossed(
                observation.kind, ip, count, details, user_id, effects
            )
        elif observation.kind == RATE_LIMITED:
            self._alert(effects, RATE_LIMITED, "info", ip, details, user_id)
        elif observation.kind in (WS_FLOOD, REFRESH_TOKEN_REUSE):
            self._alert(effects, observation.kind, "warning", ip, details, user_id)

        self._check_high_risk(ip, level_before, effects)
        self._sync(ip, effects)
        return effects

    def block(self, ip: str, duration: float | None, reason: str = "") -> Effects:
        """Block `ip` for `duration` seconds (None: until unblocked), by an operator.

        Raises ValueError for an invalid or allowlisted address.
        """
        address = self._require_ip(ip)
        if address in self.config.allowlist:
            raise ValueError(
                f"{address} is on the allowlist (security.allowlist), so it is never "
                "blocked: remove it from the allowlist first"
            )
        effects = Effects()
        now = self.clock()
        level_before = self._level(address, now)
        details = {"note": reason[:_MAX_DETAIL_CHARS]} if reason else {}
        self._add_block(
            address, MANUAL_BLOCK_ALERT, MANUAL, duration, details, None, effects
        )
        self._check_high_risk(address, level_before, effects)
        self._sync(address, effects)
        return effects

    def unblock(self, ip: str) -> tuple[Effects, bool]:
        """Lift every block of `ip` and reset its score and offences.

        Returns the effects and whether the IP was blocked. Raises ValueError
        for an invalid address.
        """
        address = self._require_ip(ip)
        now = self.clock()
        was_blocked = self._state(address, now).blocked
        effects = Effects()
        self.blocks.remove(address)
        self.reputation.reset(address)
        self.detector.forget(address)
        self._dirty_scores.discard(address)
        self._removed_scores.discard(address)
        effects.unblocked.append(address)
        self._alert(
            effects,
            MANUAL_UNBLOCK_ALERT,
            "info",
            address,
            {"was_blocked": was_blocked},
            None,
        )
        self._sync(address, effects)
        return effects, was_blocked

    def tick(self) -> Effects:
        """Recompute every decision (expiry, recovery) and flush alert groups."""
        effects = Effects()
        now = self.clock()
        for ip in self._tracked_ips():
            self._sync(ip, effects)
        for ip in self.reputation.forget_recovered(now):
            self._dirty_scores.discard(ip)
            self._removed_scores.add(ip)
        self.blocks.forget_old(now, self.config.escalation.reset_after)
        self.detector.sweep()
        effects.alerts.extend(self.grouper.flush(now))
        return effects

    # Outputs and queries.

    def take_scores(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Return the scores changed since the last call, and the IPs to delete."""
        scores = []
        for ip in sorted(self._dirty_scores):
            stored = self.reputation.stored(ip)
            if stored is not None:
                scores.append(
                    {"ip": ip, "score": stored.value, "updated_at": stored.updated_at}
                )
        removed = sorted(self._removed_scores)
        self._dirty_scores.clear()
        self._removed_scores.clear()
        return scores, removed

    def decision(self, ip: str) -> dict[str, Any]:
        """Return the current decision for `ip`."""
        now = self.clock()
        return _decision(ip, self._state(ip, now), now)

    def snapshot(self) -> list[dict[str, Any]]:
        """Return the decisions of every IP that is blocked or rate limited."""
        now = self.clock()
        return [_decision(ip, state, now) for ip, state in self._published.items()]

    def blocked_ips(self) -> list[dict[str, Any]]:
        """Return the blocked IPs with reason, expiry and offences, by IP."""
        now = self.clock()
        result = []
        for ip in sorted(self._published):
            state = self._state(ip, now)
            if not state.blocked:
                continue
            record = self.blocks.active(ip, now)
            result.append(
                {
                    "ip": ip,
                    "reason": state.reason,
                    "source": record.source if record else "reputation",
                    "expires_at": state.expires_at,
                    "ttl": _ttl(state, now),
                    "offences": record.offences if record else None,
                    "score": round(self.reputation.score(ip, now), 2),
                }
            )
        return result

    def describe(self, ip: str) -> dict[str, Any]:
        """Return the score, level, block and offences of `ip` for operators."""
        address = self._require_ip(ip)
        now = self.clock()
        score = self.reputation.score(address, now)
        state = self._state(address, now)
        record = self.blocks.record(address)
        return {
            "ip": address,
            "score": round(score, 2),
            "level": self.reputation.level(score),
            "allowlisted": address in self.config.allowlist,
            "blocked": state.blocked,
            "reason": state.reason,
            "expires_at": state.expires_at,
            "ttl": _ttl(state, now),
            "rate_factor": state.rate_factor,
            "offences": record.offences if record else 0,
            "last_block": _block_dict(record) if record else None,
        }

    def blocked_count(self) -> int:
        return sum(1 for state in self._published.values() if state.blocked)

    def risk_buckets(self) -> dict[str, int]:
        return self.reputation.buckets(self.clock())

    # Internals.

    def _require_ip(self, ip: str) -> str:
        address = canonical_ip(ip)
        if address is None:
            raise ValueError(f"invalid IP address {ip!r}: expected IPv4 or IPv6")
        return address

    def _tracked_ips(self) -> set[str]:
        return (
            set(self._published)
            | set(self.reputation)
            | {block.ip for block in self.blocks.active_blocks(self.clock())}
        )

    def _level(self, ip: str, now: float) -> str:
        return self.reputation.level(self.reputation.score(ip, now))

    def _score_changed(self, ip: str) -> None:
        self._dirty_scores.add(ip)
        self._removed_scores.discard(ip)

    def _threshold_crossed(
        self,
        kind: str,
        ip: str,
        count: int,
        details: dict[str, Any],
        user_id: int | None,
        effects: Effects,
    ) -> None:
        threshold = self.config.thresholds[kind]
        details = {**details, "count": count, "window": threshold.window}
        alert_type = ALERT_TYPES[kind]
        if ip in self.config.allowlist:
            details.update(allowlisted=True, blocked=False)
            self._alert(effects, alert_type, "info", ip, details, user_id)
            return
        self._add_block(ip, alert_type, ANOMALY, None, details, user_id, effects)

    def _add_block(
        self,
        ip: str,
        reason: str,
        source: str,
        duration: float | None,
        details: dict[str, Any],
        user_id: int | None,
        effects: Effects,
    ) -> None:
        """Store a block (escalated when `source` is ANOMALY) and alert it."""
        now = self.clock()
        escalation = self.config.escalation
        offences = escalation.offences_after(self.blocks.record(ip), now)
        if source == ANOMALY:
            duration = escalation.duration(offences)
        expires_at = None if duration is None else now + duration
        block = Block(ip, reason, source, now, expires_at, offences)
        self.blocks.put(block)
        effects.blocks.append(block)
        if self.config.block_penalty:
            self.reputation.penalize(ip, self.config.block_penalty, now)
            self._score_changed(ip)

        if source == MANUAL:
            severity = "info"
        else:
            severity = "critical" if offences > 1 else "warning"
        details = {**details, "blocked_for": duration, "offences": offences}
        self._alert(effects, reason, severity, ip, details, user_id)

    def _check_high_risk(self, ip: str, level_before: str, effects: Effects) -> None:
        now = self.clock()
        score = self.reputation.score(ip, now)
        if self.reputation.level(score) != HIGH_RISK or level_before == HIGH_RISK:
            return
        if ip in self.config.allowlist:
            return
        recovery = self.reputation.seconds_until(
            ip, self.config.high_risk_threshold, now
        )
        details = {
            "score": round(score, 2),
            "threshold": self.config.high_risk_threshold,
            "blocked_for": recovery,
        }
        self._alert(effects, HIGH_RISK_ALERT, "critical", ip, details, None)

    def _alert(
        self,
        effects: Effects,
        alert_type: str,
        severity: str,
        ip: str,
        details: dict[str, Any],
        user_id: int | None,
    ) -> None:
        draft = AlertDraft(alert_type, severity, ip, details, user_id)
        offered = self.grouper.offer(draft, self.clock())
        if offered is not None:
            effects.alerts.append(offered)

    def _state(self, ip: str, now: float) -> _State:
        if ip in self.config.allowlist:
            return _DEFAULT_STATE
        score = self.reputation.score(ip, now)
        level = self.reputation.level(score)
        factor = 1.0 if level == LOW_RISK else 0.5
        block = self.blocks.active(ip, now)

        blocked = block is not None
        expires_at = block.expires_at if block is not None else None
        reason = block.reason if block is not None else None
        if level == HIGH_RISK:
            wait = self.reputation.seconds_until(
                ip, self.config.high_risk_threshold, now
            )
            recovers_at = None if wait is None else round(now + wait, 3)
            if not blocked:
                blocked, expires_at, reason = True, recovers_at, HIGH_RISK_ALERT
            elif expires_at is not None:
                expires_at = (
                    None if recovers_at is None else max(expires_at, recovers_at)
                )
        return _State(blocked, expires_at, reason, factor)

    def _sync(self, ip: str, effects: Effects) -> None:
        """Push the decision for `ip` if it differs from the one last pushed."""
        now = self.clock()
        state = self._state(ip, now)
        if state == self._published.get(ip, _DEFAULT_STATE):
            return
        if state == _DEFAULT_STATE:
            self._published.pop(ip, None)
        else:
            self._published[ip] = state
        effects.decisions.append(_decision(ip, state, now))


def _ttl(state: _State, now: float) -> float | None:
    if not state.blocked or state.expires_at is None:
        return None
    return max(0.0, state.expires_at - now)


def _decision(ip: str, state: _State, now: float) -> dict[str, Any]:
    return {
        "ip": ip,
        "blocked": state.blocked,
        "ttl": _ttl(state, now),
        "reason": state.reason,
        "rate_factor": state.rate_factor,
    }


def _block_dict(block: Block) -> dict[str, Any]:
    return {
        "reason": block.reason,
        "source": block.source,
        "created_at": block.created_at,
        "expires_at": block.expires_at,
        "offences": block.offences,
    }


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _clean_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Keep a few scalar details of an observation, with strings cut short."""
    cleaned: dict[str, Any] = {}
    for key, value in list(details.items())[:_MAX_DETAIL_KEYS]:
        if not isinstance(key, str):
            continue
        if isinstance(value, str):
            cleaned[key[:64]] = value[:_MAX_DETAIL_CHARS]
        elif isinstance(value, bool | int | float) or value is None:
            cleaned[key[:64]] = value
    return cleaned
