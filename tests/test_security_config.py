"""Security settings: list values, cross-checks, and the typed configurations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from deeperhub.config import load_settings
from deeperhub.errors import ConfigError
from deeperhub.security.config import alert_config, monitor_config

if TYPE_CHECKING:
    from pathlib import Path

    from deeperhub.config import Settings


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DEEPERHUB_VAR_DIR": str(tmp_path / "var"),
        "GUARDIAN_SECRET_KEY": "k" * 40,
        **extra,
    }


def load(tmp_path: Path, toml: str = "", **env: str) -> Settings:
    config = tmp_path / "deeperhub.toml"
    config.write_text(toml)
    return load_settings(env_for(tmp_path, **env), config)


def test_lists_from_toml_and_env(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[security]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n',
        DEEPER_HUB_SECURITY_ALLOWLIST=" 192.0.2.0/24 , 198.51.100.4 ,",
    )
    assert settings["security.trusted_proxies"] == ("10.0.0.0/8", "::1")
    assert settings["security.allowlist"] == ("192.0.2.0/24", "198.51.100.4")
    assert settings.to_env()["DEEPER_HUB_SECURITY_ALLOWLIST"] == (
        "192.0.2.0/24,198.51.100.4"
    )


def test_monitor_config_defaults(tmp_path: Path) -> None:
    config = monitor_config(load(tmp_path))
    assert config.thresholds["login_failed"].count == 5
    assert config.thresholds["login_failed"].window == 300
    assert config.thresholds["not_found"].count == 10
    assert config.thresholds["malicious_payload"].window == 600
    assert config.penalties == {
        "login_failed": 5,
        "not_found": 2,
        "malicious_payload": 10,
    }
    assert config.block_penalty == 20
    assert config.check_interval == 60
    assert config.escalation.duration(1) == 900


def test_webhook_url_enables_channel(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        DEEPER_HUB_SECURITY_ALERT_WEBHOOK="https://hooks.example.test/x",
        DEEPER_HUB_SECURITY_ALERT_WEBHOOK_SECRET="s" * 32,
    )
    assert alert_config(settings).channels == ("log", "webhook")


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("", {"DEEPER_HUB_SECURITY_ALERT_WEBHOOK": "https://h.example.test/x"},
         "missing DEEPER_HUB_SECURITY_ALERT_WEBHOOK_SECRET"),
        ('[security_alerts]\nnotification_channels = ["webhook"]\n', {},
         "missing security_alerts.webhook_url"),
        ("", {"DEEPER_HUB_SECURITY_ALERT_WEBHOOK": "ftp://h.example.test/x",
              "DEEPER_HUB_SECURITY_ALERT_WEBHOOK_SECRET": "s"},
         "invalid security_alerts.webhook_url 'ftp://h.example.test/x'"),
        ('[security_alerts]\nnotification_channels = ["email"]\n', {},
         "missing security_alerts.smtp_host"),
        ('[security_alerts]\nnotification_channels = ["pager"]\n', {},
         "a list of log, webhook, email"),
        ("", {"DEEPER_HUB_SECURITY_ALLOWLIST": "10.0.0.1/8"},
         "invalid security.allowlist: invalid network '10.0.0.1/8'"),
        ("", {"DEEPER_HUB_SECURITY_TRUSTED_PROXIES": "proxy.local"},
         "invalid security.trusted_proxies: invalid address 'proxy.local'"),
        ("[ip_reputation]\nhigh_risk_threshold = 70\n", {},
         "must not exceed ip_reputation.medium_risk_threshold 60"),
        ("[anomaly_detection]\nblock_duration = 100000\n", {},
         "must not exceed anomaly_detection.max_block_duration"),
        ("[anomaly_detection]\nlogin_failure_treshold = 3\n", {},
         "unknown setting 'anomaly_detection.login_failure_treshold'"),
        ("[security]\nallowlist = 5\n", {}, "a list of strings"),
    ],
)  # fmt: skip
def test_invalid_settings_rejected(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, toml, **env)
    assert message in str(caught.value)


def test_secret_hidden_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "[security_alerts]\nsmtp_password = 12345\n")
    assert "12345" not in str(caught.value)
