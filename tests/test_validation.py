"""Input checks of deeperhub.validation, with the field each failure names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from deeperhub.config import Settings, load_settings
from deeperhub.errors import DeeperHubError
from deeperhub.validation import (
    ValidationError,
    validate_body,
    validate_channel_name,
    validate_email,
    validate_password,
    validate_username,
)

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    environ = {"DEEPERHUB_VAR_DIR": str(tmp_path), "GUARDIAN_SECRET_KEY": "k" * 48}
    loaded = load_settings(environ, create_dev_key=False)
    values = dict(loaded.values)
    values["auth.password_min"] = 8
    values["auth.password_max"] = 64
    values["websocket.max_body_bytes"] = 16
    return Settings(values=values, config_file=None)


def field_of(check: Any, *args: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        check(*args)
    assert isinstance(caught.value, DeeperHubError)
    assert caught.value.field in caught.value.message
    return caught.value.field


@pytest.mark.parametrize(
    "username", ["abc", "a" * 32, "user_name", "user-name", "user.name", "User123"]
)
def test_username_valid(username: str) -> None:
    assert validate_username(username) == username


@pytest.mark.parametrize(
    "username",
    [
        "ab",
        "a" * 33,
        "",
        "has space",
        "tab\tname",
        "name\n",
        "ünïcode",
        "аdmin",  # first letter is Cyrillic
        "semi;colon",
        "at@sign",
        "slash/name",
        None,
        42,
        ["abc"],
    ],
)
def test_username_invalid(username: object) -> None:
    assert field_of(validate_username, username) == "username"


@pytest.mark.parametrize(
    "email",
    [
        "a@b.co",
        "first.last+tag@example.com",
        "user@sub.domain.example",
        "ü@exämple.de",
        "x" * 64 + "@" + "d" * 185 + ".com",
    ],
)
def test_email_valid(email: str) -> None:
    assert validate_email(email) == email


@pytest.mark.parametrize(
    "email",
    [
        "",
        "plain",
        "@example.com",
        "user@",
        "user@localhost",
        "user@@example.com",
        "user@exa mple.com",
        "us er@example.com",
        "user@example..com",
        "user@.example.com",
        "user@example.com.",
        "user@-example.com",
        "user@example-.com",
        "user\n@example.com",
        "user@example.com\n",
        "x" * 65 + "@example.com",
        "x" * 64 + "@" + "d" * 186 + ".com",
        "user\ud800@example.com",
        None,
        7,
    ],
)
def test_email_invalid(email: object) -> None:
    assert field_of(validate_email, email) == "email"


def test_email_length_limit_is_254() -> None:
    local = "x" * 64
    domain = "d" * (254 - 64 - 1 - 4) + ".com"
    assert len(f"{local}@{domain}") == 254
    assert validate_email(f"{local}@{domain}")
    assert field_of(validate_email, f"{local}@d{domain}") == "email"


def test_password_length_bounds(settings: Settings) -> None:
    assert validate_password("x" * 8, settings) == "x" * 8
    assert validate_password("x" * 64, settings) == "x" * 64
    assert field_of(validate_password, "x" * 7, settings) == "password"
    assert field_of(validate_password, "x" * 65, settings) == "password"


def test_password_counts_characters(settings: Settings) -> None:
    # 8 characters, 24 bytes in UTF-8.
    assert validate_password("密" * 8, settings) == "密" * 8


@pytest.mark.parametrize("password", [None, 12345678, b"bytes-password", ""])
def test_password_invalid_type(settings: Settings, password: object) -> None:
    assert field_of(validate_password, password, settings) == "password"


def test_password_lone_surrogate(settings: Settings) -> None:
    assert field_of(validate_password, "abcdefg\ud800", settings) == "password"


@pytest.mark.parametrize("name", ["a", "x" * 64, "general", "dev.ops-2_b", "A.B"])
def test_channel_name_valid(name: str) -> None:
    assert validate_channel_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "has space", "colon:name", "slash/x", "naïve", "new\nline", None, 1],
)
def test_channel_name_invalid(name: object) -> None:
    assert field_of(validate_channel_name, name) == "name"


def test_body_byte_limit(settings: Settings) -> None:
    assert validate_body("x" * 16, settings) == "x" * 16
    assert field_of(validate_body, "x" * 17, settings) == "body"
    # 5 characters of 3 bytes each: 15 bytes is within 16, 6 of them is not.
    assert validate_body("密" * 5, settings) == "密" * 5
    assert field_of(validate_body, "密" * 6, settings) == "body"


@pytest.mark.parametrize("body", ["", None, 5, {"text": "x"}, "a\ud800"])
def test_body_invalid(settings: Settings, body: object) -> None:
    assert field_of(validate_body, body, settings) == "body"


def test_body_whitespace_is_kept(settings: Settings) -> None:
    assert validate_body(" hi\n", settings) == " hi\n"
