"""The security monitor's decisions on an injected clock (sans-I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deeperhub.security.addresses import AddressSet
from deeperhub.security.anomaly import (
    LOGIN_FAILED,
    MALICIOUS_PAYLOAD,
    NOT_FOUND,
    Threshold,
)
from deeperhub.security.blocks import Escalation
from deeperhub.security.config import MonitorConfig
from deeperhub.security.policy import (
    RATE_LIMITED,
    WS_FLOOD,
    Observation,
    SecurityPolicy,
)

ATTACKER = "203.0.113.9"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_config(**changes: object) -> MonitorConfig:
    config = MonitorConfig(
        thresholds={
            LOGIN_FAILED: Threshold(5, 300),
            NOT_FOUND: Threshold(10, 60),
            MALICIOUS_PAYLOAD: Threshold(3, 600),
        },
        penalties={LOGIN_FAILED: 5, NOT_FOUND: 2, MALICIOUS_PAYLOAD: 10},
        block_penalty=20,
        escalation=Escalation(base=900, multiplier=2, maximum=3600, reset_after=86400),
        high_risk_threshold=30,
        medium_risk_threshold=60,
        recovery_per_hour=10,
        check_interval=60,
        allowlist=AddressSet(["192.0.2.0/24"]),
        group_window=300,
        max_tracked_ips=1000,
        retention_days=90,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy(clock: FakeClock) -> SecurityPolicy:
    return SecurityPolicy(make_config(), clock)


def observe(policy: SecurityPolicy, kind: str, times: int, ip: str = ATTACKER) -> list:
    effects = []
    for _ in range(times):
        effects.append(policy.observe(Observation(kind, ip)))
    return effects


def test_login_failures_below_threshold_no_block(policy: SecurityPolicy) -> None:
    effects = observe(policy, LOGIN_FAILED, 4)
    assert not any(e.blocks for e in effects)
    assert not policy.decision(ATTACKER)["blocked"]
    assert policy.describe(ATTACKER)["score"] == 80


def test_login_threshold_blocks_and_alerts(policy: SecurityPolicy) -> None:
    last = observe(policy, LOGIN_FAILED, 5)[-1]
    assert [block.ip for block in last.blocks] == [ATTACKER]
    assert last.blocks[0].expires_at is not None
    assert [alert.type for alert in last.alerts] == ["login_failures"]
    alert = last.alerts[0]
    assert alert.severity == "warning"
    assert alert.details["offences"] == 1
    assert alert.details["blocked_for"] == 900
    decision = last.decisions[-1]
    assert decision["blocked"] is True
    assert decision["ttl"] == pytest.approx(900)
    # 5 failures and one block: 100 - 25 - 20.
    assert policy.describe(ATTACKER)["score"] == 55
    assert decision["rate_factor"] == 0.5


def test_block_expires_on_tick(policy: SecurityPolicy, clock: FakeClock) -> None:
    observe(policy, NOT_FOUND, 10)
    assert policy.decision(ATTACKER)["blocked"]
    clock.now += 901
    effects = policy.tick()
    assert [d["blocked"] for d in effects.decisions] == [False]
    assert policy.blocked_ips() == []


def test_repeat_offence_escalates(policy: SecurityPolicy, clock: FakeClock) -> None:
    durations = []
    severities = []
    for _ in range(4):
        last = observe(policy, MALICIOUS_PAYLOAD, 3, ip="198.51.100.1")[-1]
        block = next(b for b in last.blocks)
        assert block.expires_at is not None
        durations.append(block.expires_at - block.created_at)
        severities.append(
            next(a.severity for a in last.alerts if a.type == "malicious_payload")
        )
        clock.now = block.expires_at + 1
        policy.tick()
    assert durations == [900, 1800, 3600, 3600]
    assert severities == ["warning", "critical", "critical", "critical"]


def test_offences_reset_after_quiet_period(
    policy: SecurityPolicy, clock: FakeClock
) -> None:
    first = observe(policy, NOT_FOUND, 10)[-1].blocks[0]
    assert first.expires_at is not None
    clock.now = first.expires_at + 86401
    policy.tick()
    second = observe(policy, NOT_FOUND, 10)[-1].blocks[0]
    assert second.offences == 1


def test_allowlisted_never_blocked(policy: SecurityPolicy) -> None:
    effects = observe(policy, LOGIN_FAILED, 5, ip="192.0.2.7")
    assert not any(e.blocks for e in effects)
    alerts = [a for e in effects for a in e.alerts]
    assert [a.type for a in alerts] == ["login_failures"]
    assert alerts[0].severity == "info"
    assert alerts[0].details["allowlisted"] is True
    assert policy.describe("192.0.2.7")["score"] == 75
    assert not policy.decision("192.0.2.7")["blocked"]
    with pytest.raises(ValueError, match="allowlist"):
        policy.block("192.0.2.7", None)


def test_high_risk_score_blocks_until_recovered(
    clock: FakeClock,
) -> None:
    # No thresholds reachable: only reputation can block.
    config = make_config(
        thresholds={NOT_FOUND: Threshold(1000, 60)},
        penalties={NOT_FOUND: 10},
    )
    policy = SecurityPolicy(config, clock)
    effects = observe(policy, NOT_FOUND, 8)
    alerts = [a for e in effects for a in e.alerts]
    assert [a.type for a in alerts] == ["ip_high_risk"]
    assert alerts[0].severity == "critical"
    decision = policy.decision(ATTACKER)
    assert decision["blocked"] is True
    assert decision["reason"] == "ip_high_risk"
    # Score 20 recovers 10 points per hour: one hour to reach 30.
    assert decision["ttl"] == pytest.approx(3600)
    clock.now += 3601
    effects_after = policy.tick()
    assert [d["blocked"] for d in effects_after.decisions] == [False]
    assert effects_after.decisions[0]["rate_factor"] == 0.5


def test_medium_risk_halves_limits(clock: FakeClock) -> None:
    config = make_config(
        thresholds={NOT_FOUND: Threshold(1000, 60)},
        penalties={NOT_FOUND: 10},
    )
    policy = SecurityPolicy(config, clock)
    effects = observe(policy, NOT_FOUND, 4)
    # 100 - 40 = 60 is still low risk, so nothing is pushed.
    assert [d for e in effects for d in e.decisions] == []
    effects = observe(policy, NOT_FOUND, 1)
    assert effects[0].decisions == [
        {
            "ip": ATTACKER,
            "blocked": False,
            "ttl": None,
            "reason": None,
            "rate_factor": 0.5,
        }
    ]
    assert effects[0].alerts == []


def test_manual_block_and_unblock(policy: SecurityPolicy) -> None:
    effects = policy.block("2001:DB8::5", None, reason="abuse report")
    assert effects.blocks[0].ip == "2001:db8::5"
    assert effects.blocks[0].expires_at is None
    assert effects.alerts[0].type == "manual_block"
    assert effects.alerts[0].severity == "info"
    assert effects.decisions[0]["blocked"] is True
    assert effects.decisions[0]["ttl"] is None
    assert [b["ip"] for b in policy.blocked_ips()] == ["2001:db8::5"]

    effects, was_blocked = policy.unblock("2001:db8::5")
    assert was_blocked
    assert effects.unblocked == ["2001:db8::5"]
    assert effects.decisions[0]["blocked"] is False
    assert policy.describe("2001:db8::5")["score"] == 100
    assert policy.describe("2001:db8::5")["offences"] == 0


def test_invalid_ip_rejected(policy: SecurityPolicy) -> None:
    with pytest.raises(ValueError, match="invalid IP"):
        policy.block("not-an-ip", 10)
    assert not policy.observe(Observation(LOGIN_FAILED, "not-an-ip"))


def test_load_restores_blocks_and_scores(clock: FakeClock) -> None:
    policy = SecurityPolicy(make_config(), clock)
    blocks = [
        {
            "ip": ATTACKER,
            "reason": "login_failures",
            "source": "anomaly",
            "created_at": clock.now - 100,
            "expires_at": clock.now + 500,
            "offences": 2,
        }
    ]
    scores = [{"ip": ATTACKER, "score": 40.0, "updated_at": clock.now - 360}]
    policy.load(blocks, scores)
    decision = policy.decision(ATTACKER)
    assert decision["blocked"]
    assert decision["ttl"] == pytest.approx(500)
    assert policy.describe(ATTACKER)["score"] == pytest.approx(41)
    assert policy.snapshot() == [decision]
    # The next offence continues the escalation.
    last = observe(policy, LOGIN_FAILED, 5)[-1]
    assert last.blocks[0].offences == 3


def test_scores_taken_once(policy: SecurityPolicy, clock: FakeClock) -> None:
    observe(policy, NOT_FOUND, 1)
    scores, removed = policy.take_scores()
    assert [s["ip"] for s in scores] == [ATTACKER]
    assert scores[0]["score"] == 98
    assert removed == []
    assert policy.take_scores() == ([], [])
    clock.now += 3600
    policy.tick()
    assert policy.take_scores() == ([], [ATTACKER])


def test_rate_limited_and_flood_alerts(policy: SecurityPolicy) -> None:
    effects = policy.observe(
        Observation(RATE_LIMITED, ATTACKER, details={"transport": "http"})
    )
    assert [(a.type, a.severity) for a in effects.alerts] == [("rate_limited", "info")]
    effects = policy.observe(Observation(WS_FLOOD, ATTACKER, user_id=7))
    assert [(a.type, a.severity, a.user_id) for a in effects.alerts] == [
        ("ws_flood", "warning", 7)
    ]


def test_alert_details_cleaned(policy: SecurityPolicy) -> None:
    details = {"path": "x" * 1000, "nested": {"a": 1}, "rule": "sql_injection"}
    effects = policy.observe(Observation(RATE_LIMITED, ATTACKER, details=details))
    alert = effects.alerts[0]
    assert len(alert.details["path"]) == 256
    assert "nested" not in alert.details


def test_steady_clock_ignores_wall_jumps() -> None:
    from deeperhub.security.clock import SteadyClock

    wall = [1_700_000_000.0]
    monotonic = [50.0]
    steady = SteadyClock(wall=lambda: wall[0], monotonic=lambda: monotonic[0])
    assert steady() == 1_700_000_000.0
    wall[0] += 86400
    monotonic[0] += 5
    assert steady() == 1_700_000_005.0
