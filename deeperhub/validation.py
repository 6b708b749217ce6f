"""Checks for values that clients send: user fields, channel names, message bodies.

Each function takes the raw decoded JSON value, returns it as a `str` when it is
valid, and otherwise raises `ValidationError` naming the field. None of them
alters the value (no trimming, no case folding).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import DeeperHubError

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "CHANNEL_NAME_MAX",
    "EMAIL_MAX",
    "USERNAME_MAX",
    "USERNAME_MIN",
    "ValidationError",
    "validate_body",
    "validate_channel_name",
    "validate_email",
    "validate_password",
    "validate_username",
]

USERNAME_MIN = 3
USERNAME_MAX = 32
CHANNEL_NAME_MAX = 64
# RFC 5321 limits a forward path to 256 octets including the angle brackets,
# which leaves 254 for the address itself, and the local part to 64.
EMAIL_MAX = 254
EMAIL_LOCAL_MAX = 64

# ASCII only, so that names cannot imitate each other with look-alike letters.
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]+", re.ASCII)
# A deliberately loose address check: one "@", no whitespace or control
# characters, and a domain of dot-separated labels. Deliverability is not tested.
_EMAIL_LOCAL = re.compile(r"[^\s@\x00-\x1f\x7f\"(),:;<>\[\\\]]+")
_EMAIL_DOMAIN_LABEL = re.compile(r"[^\s@\x00-\x1f\x7f\"(),:;<>\[\\\].]+")


class ValidationError(DeeperHubError):
    """A client value is invalid: `field` is its name, `message` the reason."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _require_text(field: str, value: object) -> str:
    if value is None:
        raise ValidationError(field, f"{field} is required")
    if not isinstance(value, str):
        raise ValidationError(field, f"{field} must be a string")
    return value


def _check_utf8(field: str, value: str) -> bytes:
    # JSON can carry lone surrogates ("\ud800"), which have no UTF-8 encoding.
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, f"{field} is not valid Unicode text") from None


def validate_username(value: object) -> str:
    """Return `value` if it is 3 to 32 ASCII letters, digits, `_`, `-` or `.`."""
    username = _require_text("username", value)
    if not USERNAME_MIN <= len(username) <= USERNAME_MAX:
        raise ValidationError(
            "username",
            f"username must be {USERNAME_MIN} to {USERNAME_MAX} characters long",
        )
    if not _NAME_CHARS.fullmatch(username):
        raise ValidationError(
            "username",
            "username may contain only ASCII letters, digits, '_', '-' and '.'",
        )
    return username


def validate_email(value: object) -> str:
    """Return `value` if it looks like `local@domain.tld`, at most 254 characters."""
    email = _require_text("email", value)
    if len(email) > EMAIL_MAX:
        raise ValidationError("email", f"email must be at most {EMAIL_MAX} characters")
    _check_utf8("email", email)

    local, at, domain = email.rpartition("@")
    invalid = ValidationError("email", "email is not a valid address")
    if not at or not local or len(local) > EMAIL_LOCAL_MAX:
        raise invalid
    if not _EMAIL_LOCAL.fullmatch(local):
        raise invalid
    labels = domain.split(".")
    if len(labels) < 2:
        raise invalid
    for label in labels:
        if not _EMAIL_DOMAIN_LABEL.fullmatch(label):
            raise invalid
        if label.startswith("-") or label.endswith("-"):
            raise invalid
    return email


def validate_password(value: object, settings: Settings) -> str:
    """Return `value` if its length is within `auth.password_min`..`password_max`.

    Lengths count characters (code points), not bytes.
    """
    password = _require_text("password", value)
    minimum = settings["auth.password_min"]
    maximum = settings["auth.password_max"]
    if not minimum <= len(password) <= maximum:
        raise ValidationError(
            "password", f"password must be {minimum} to {maximum} characters long"
        )
    _check_utf8("password", password)
    return password


def validate_channel_name(value: object) -> str:
    """Return `value` if it is 1 to 64 ASCII letters, digits, `_`, `-` or `.`."""
    name = _require_text("name", value)
    if not 1 <= len(name) <= CHANNEL_NAME_MAX:
        raise ValidationError(
            "name", f"name must be 1 to {CHANNEL_NAME_MAX} characters long"
        )
    if not _NAME_CHARS.fullmatch(name):
        raise ValidationError(
            "name", "name may contain only ASCII letters, digits, '_', '-' and '.'"
        )
    return name


def validate_body(value: object, settings: Settings) -> str:
    """Return `value` if non-empty and within `websocket.max_body_bytes` in UTF-8."""
    body = _require_text("body", value)
    if not body:
        raise ValidationError("body", "body must not be empty")
    maximum = settings["websocket.max_body_bytes"]
    size = len(_check_utf8("body", body))
    if size > maximum:
        raise ValidationError(
            "body", f"body is {size} bytes in UTF-8, the maximum is {maximum}"
        )
    return body
