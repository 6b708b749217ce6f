"""Signing key rotation: previous keys, their grace period, `kid` lookups."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest

from deeperhub.auth.keys import KeyRing, key_id, parse_previous_keys, parse_until
from deeperhub.auth.tokens import TokenError, TokenService
from deeperhub.config import Settings, load_settings
from deeperhub.errors import ConfigError

from .daemon import ROOT, Daemon
from .data_safety_support import login, register

if TYPE_CHECKING:
    from pathlib import Path

OLD_KEY = "old-signing-key-" + "o" * 40
NEW_KEY = "new-signing-key-" + "n" * 40


def make_service(tmp_path: Path, key: str, **values: Any) -> TokenService:
    environ = {"DEEPERHUB_VAR_DIR": str(tmp_path), "GUARDIAN_SECRET_KEY": key}
    settings = load_settings(environ, create_dev_key=False)
    merged = dict(settings.values)
    merged.update(values)
    return TokenService(Settings(values=merged, config_file=None))


def test_previous_key_verifies_old_tokens(tmp_path: Path) -> None:
    old = make_service(tmp_path, OLD_KEY)
    token, _ = old.issue_access(5, "family")
    rotated = make_service(tmp_path, NEW_KEY, **{"auth.previous_keys": OLD_KEY})

    claims = rotated.verify(token, "access")
    assert claims["sub"] == "5"
    new_token, _ = rotated.issue_access(5)
    assert jwt.get_unverified_header(new_token)["kid"] == key_id(NEW_KEY)


def test_rotation_without_previous_key_rejects(tmp_path: Path) -> None:
    token, _ = make_service(tmp_path, OLD_KEY).issue_access(5)
    rotated = make_service(tmp_path, NEW_KEY)
    with pytest.raises(TokenError) as caught:
        rotated.verify(token, "access")
    assert caught.value.reason == "unknown_key"


def test_previous_key_retired_after_until(tmp_path: Path) -> None:
    token, _ = make_service(tmp_path, OLD_KEY).issue_access(5)
    retired = make_service(
        tmp_path,
        NEW_KEY,
        **{
            "auth.previous_keys": OLD_KEY,
            "auth.previous_keys_until": "2000-01-01T00:00:00Z",
        },
    )
    with pytest.raises(TokenError) as caught:
        retired.verify(token, "access")
    assert caught.value.reason == "unknown_key"


def test_forged_kid_of_previous_key_fails_signature(tmp_path: Path) -> None:
    rotated = make_service(tmp_path, NEW_KEY, **{"auth.previous_keys": OLD_KEY})
    now = int(time.time())
    claims = {
        "sub": "5",
        "jti": "j",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "iss": "deeperhub",
        "aud": "deeperhub",
        "typ": "access",
    }
    forged = jwt.encode(
        claims, "attacker-key-" + "a" * 40, headers={"kid": key_id(OLD_KEY)}
    )
    with pytest.raises(TokenError) as caught:
        rotated.verify(forged, "access")
    assert caught.value.reason == "bad_signature"


@pytest.mark.parametrize(
    "kid", ["../../var/secret_key", "http://example.com/key", "' OR 1=1 --", 7, None]
)
def test_kid_is_only_a_lookup_key(kid: object) -> None:
    ring = KeyRing(NEW_KEY, [OLD_KEY])
    assert ring.verification_key(kid, time.time()) is None


def test_keyring_ignores_current_key_as_previous() -> None:
    ring = KeyRing(NEW_KEY, [NEW_KEY, OLD_KEY])
    assert ring.previous_count == 1
    assert ring.verification_key(key_id(OLD_KEY), time.time()) == OLD_KEY


def test_parse_previous_keys() -> None:
    assert parse_previous_keys(f" {OLD_KEY} ,, {NEW_KEY} ") == [OLD_KEY, NEW_KEY]
    assert parse_previous_keys("") == []
    with pytest.raises(ConfigError, match="key 2 has 5 bytes"):
        parse_previous_keys(f"{OLD_KEY},short", env_name="prod")


def test_parse_until() -> None:
    assert parse_until("") is None
    assert parse_until("1970-01-01T00:01:00Z") == 60
    assert parse_until("1970-01-01T00:01:00") == 60
    assert parse_until("1970-01-01T01:01:00+01:00") == 60
    with pytest.raises(ConfigError, match="GUARDIAN_PREVIOUS_KEYS_UNTIL"):
        parse_until("next tuesday")


def test_invalid_until_stops_loading(tmp_path: Path) -> None:
    environ = {
        "DEEPERHUB_VAR_DIR": str(tmp_path),
        "GUARDIAN_SECRET_KEY": NEW_KEY,
        "GUARDIAN_PREVIOUS_KEYS_UNTIL": "soon",
    }
    with pytest.raises(ConfigError):
        load_settings(environ, create_dev_key=False)


def test_gen_secret_is_strong() -> None:
    outputs = set()
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "deeperhub.cli", "gen-secret"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        secret = result.stdout.strip()
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        assert len(raw) >= 64
        assert "," not in secret  # usable in GUARDIAN_PREVIOUS_KEYS
        outputs.add(secret)
    assert len(outputs) == 2
    weak = subprocess.run(
        [sys.executable, "-m", "deeperhub.cli", "gen-secret", "--bytes", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert weak.returncode != 0


def _me(daemon: Daemon, token: str) -> int:
    reply = httpx.get(
        daemon.base_url + "/api/users/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    return reply.status_code


@pytest.mark.timeout(120)
def test_daemon_key_rotation_with_grace(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    daemon = Daemon(var_dir, {"GUARDIAN_SECRET_KEY": OLD_KEY})
    daemon.start()
    try:
        register(daemon, "zoe")
        before = login(daemon, "zoe")
    finally:
        daemon.stop()

    # Rotated with the old key kept for verification: nobody is logged out.
    daemon.env.update(
        {"GUARDIAN_SECRET_KEY": NEW_KEY, "GUARDIAN_PREVIOUS_KEYS": OLD_KEY}
    )
    daemon.start()
    try:
        assert _me(daemon, before["access_token"]) == 200
        reply = httpx.post(
            daemon.base_url + "/api/auth/refresh",
            json={"refresh_token": before["refresh_token"]},
            timeout=10,
        )
        assert reply.status_code == 200
        after = reply.json()
        assert jwt.get_unverified_header(after["access_token"])["kid"] == key_id(
            NEW_KEY
        )
    finally:
        daemon.stop()

    # Grace period over: old tokens fail, tokens of the new key still work.
    daemon.env["GUARDIAN_PREVIOUS_KEYS_UNTIL"] = "2000-01-01T00:00:00Z"
    daemon.start()
    try:
        assert _me(daemon, before["access_token"]) == 401
        assert _me(daemon, after["access_token"]) == 200
    finally:
        daemon.stop()
