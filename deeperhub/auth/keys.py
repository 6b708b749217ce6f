"""Signing keys: the current key and the previous keys kept for verification.

After a key rotation the old value of `GUARDIAN_SECRET_KEY` goes into
`GUARDIAN_PREVIOUS_KEYS`. Tokens signed with it keep working until they expire,
or until `GUARDIAN_PREVIOUS_KEYS_UNTIL` if that is set, while every new token
is signed with the current key. A token's `kid` header selects the key: it is
only ever looked up in the `KeyRing`, never used as a path, URL or query.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from ..errors import ConfigError

__all__ = ["KeyRing", "key_id", "parse_previous_keys", "parse_until"]

_MIN_PROD_KEY_BYTES = 32


def key_id(secret_key: str) -> str:
    """Return the `kid` header for `secret_key`: 16 hex digits of its SHA-256.

    The id lets a verifier tell which key signed a token without revealing the key.
    """
    return hashlib.sha256(secret_key.encode()).hexdigest()[:16]


def parse_previous_keys(raw: str, *, env_name: str = "dev") -> list[str]:
    """Split the comma-separated `auth.previous_keys` value into keys.

    Blank entries are skipped. With `env_name` `prod` each key must have at
    least 32 bytes, as the current key must. Raises ConfigError naming the
    entry by position, never by value.
    """
    keys = [part.strip() for part in raw.split(",") if part.strip()]
    if env_name == "prod":
        for position, key in enumerate(keys, 1):
            if len(key.encode()) < _MIN_PROD_KEY_BYTES:
                raise ConfigError(
                    f"invalid GUARDIAN_PREVIOUS_KEYS: key {position} has "
                    f"{len(key.encode())} bytes, DEEPERHUB_ENV=prod requires at "
                    f"least {_MIN_PROD_KEY_BYTES}"
                )
    return keys


def parse_until(raw: str) -> float | None:
    """Parse `auth.previous_keys_until` (ISO 8601; UTC unless it names an offset).

    Returns Unix seconds, or None for an empty value. Raises ConfigError.
    """
    text = raw.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"invalid GUARDIAN_PREVIOUS_KEYS_UNTIL {text!r}: expected an ISO 8601 "
            "time such as 2026-12-31T00:00:00Z, or empty"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class KeyRing:
    """The signing key and the previous keys still accepted for verification.

    `previous_until` is the Unix time after which previous keys are rejected,
    or None to accept them for as long as they are configured.
    """

    def __init__(
        self,
        current: str,
        previous: list[str] | tuple[str, ...] = (),
        previous_until: float | None = None,
    ) -> None:
        self.current = current
        self.current_kid = key_id(current)
        self.previous_until = previous_until
        self._previous = {
            key_id(key): key for key in previous if key_id(key) != self.current_kid
        }

    @property
    def previous_count(self) -> int:
        return len(self._previous)

    def verification_key(self, kid: object, now: float) -> str | None:
        """Return the key whose id is `kid`, or None if no accepted key has it."""
        if not isinstance(kid, str):
            return None
        if kid == self.current_kid:
            return self.current
        if self.previous_until is not None and now > self.previous_until:
            return None
        return self._previous.get(kid)
