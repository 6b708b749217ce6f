"""Settings: precedence, validation messages, dev key, generated reference."""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

import pytest

from deeperhub.config import load_settings
from deeperhub.configdoc import render_configuration_reference
from deeperhub.errors import ConfigError

from .daemon import ROOT

if TYPE_CHECKING:
    from pathlib import Path


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"DEEPERHUB_VAR_DIR": str(tmp_path / "var"), **extra}


def test_defaults_and_paths(tmp_path: Path) -> None:
    settings = load_settings(env_for(tmp_path, GUARDIAN_SECRET_KEY="k" * 40), None)
    assert settings["server.port"] == 8080
    assert settings["server.host"] == "127.0.0.1"
    assert settings.db_path == tmp_path / "var" / "db" / "deeper_hub.db"
    assert settings.socket_path("db") == tmp_path / "var" / "run" / "db.sock"


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "deeperhub.toml"
    config.write_text("[server]\nport = 9000\n[logging]\nlevel = 'debug'\n")
    settings = load_settings(env_for(tmp_path, PORT="9100"), config)
    assert settings["server.port"] == 9100
    assert settings["logging.level"] == "debug"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PORT", "eighty", "integer from 1 to 65535"),
        ("PORT", "70000", "integer from 1 to 65535"),
        ("PORT", "0", "integer from 1 to 65535"),
        ("DEEPERHUB_HOST", "999.1.1.1", "an IPv4 or IPv6 address, or a host name"),
        ("DEEPERHUB_HOST", "10.0.0", "an IPv4 or IPv6 address, or a host name"),
        ("DEEPERHUB_HOST", "bad host", "an IPv4 or IPv6 address, or a host name"),
        ("DEEPERHUB_HOST", "-dash.example", "an IPv4 or IPv6 address"),
        ("DEEPERHUB_HOST", "[::1]", "an IPv4 or IPv6 address, or a host name"),
        ("DEEPER_HUB_DB_POOL_SIZE", "0", "integer from 1 to 100"),
        ("DEEPER_HUB_LOG_LEVEL", "loud", "one of debug, info"),
        ("MAX_CONNECTIONS", "-5", "integer from 1"),
        ("DEEPER_HUB_SECURITY_RATE_LIMIT_API", "1.5", "integer"),
    ],
)
def test_invalid_values_name_setting(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env_for(tmp_path, **{variable: value}), None)
    message = str(caught.value)
    assert variable in message
    assert repr(value) in message
    assert expected in message


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "hub-1.example.org."]
)
def test_host_accepts_addresses_and_names(tmp_path: Path, host: str) -> None:
    settings = load_settings(env_for(tmp_path, DEEPERHUB_HOST=host), None)
    assert settings["server.host"] == host


def test_empty_host_in_file_rejected(tmp_path: Path) -> None:
    config = tmp_path / "deeperhub.toml"
    config.write_text("[server]\nhost = ''\n")
    with pytest.raises(ConfigError, match="server.host"):
        load_settings(env_for(tmp_path), config)


def test_database_path_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env_for(tmp_path, DEEPER_HUB_DB_PATH=str(tmp_path)), None)
    message = str(caught.value)
    assert "DEEPER_HUB_DB_PATH" in message
    assert repr(str(tmp_path)) in message
    assert "is a directory" in message


def test_database_path_under_file_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    wanted = blocker / "db" / "deeper_hub.db"
    with pytest.raises(ConfigError) as caught:
        load_settings(env_for(tmp_path, DEEPER_HUB_DB_PATH=str(wanted)), None)
    message = str(caught.value)
    assert "DEEPER_HUB_DB_PATH" in message
    assert f"{blocker} is not a directory" in message


def test_unknown_file_key_rejected(tmp_path: Path) -> None:
    config = tmp_path / "deeperhub.toml"
    config.write_text("[server]\nprot = 9000\n")
    with pytest.raises(ConfigError, match="unknown setting 'server.prot'"):
        load_settings(env_for(tmp_path), config)


def test_dev_key_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_settings(env_for(tmp_path), None)
    key_file = tmp_path / "var" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = load_settings(env_for(tmp_path), None)
    assert first.secret_key == second.secret_key
    assert len(first.secret_key) >= 32


@pytest.mark.parametrize("key", ["", "too-short"])
def test_prod_rejects_missing_or_short_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="GUARDIAN_SECRET_KEY"):
        load_settings(env_for(tmp_path, DEEPERHUB_ENV="prod", GUARDIAN_SECRET_KEY=key))
    assert not (tmp_path / "var" / "secret_key").exists()


def test_secret_never_in_error_message(tmp_path: Path) -> None:
    config = tmp_path / "deeperhub.toml"
    config.write_text("[auth]\nsecret_key = 12345\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(env_for(tmp_path), config)
    assert "12345" not in str(caught.value)


def test_reference_page_matches_code() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render_configuration_reference()
