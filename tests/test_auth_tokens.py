"""TokenService: issuing HS256 JWTs and rejecting every kind of bad token."""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

import jwt
import pytest

from deeperhub.auth.tokens import (
    MAX_TOKEN_BYTES,
    TokenError,
    TokenService,
    key_id,
)
from deeperhub.config import Settings, load_settings
from deeperhub.errors import AuthError

if TYPE_CHECKING:
    from pathlib import Path

# 64 bytes or more, so that PyJWT does not warn when a test signs with HS512.
KEY = "test-signing-key-" + "k" * 50
LEEWAY = 30


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    environ = {"DEEPERHUB_VAR_DIR": str(tmp_path), "GUARDIAN_SECRET_KEY": KEY}
    settings = load_settings(environ, create_dev_key=False)
    values = dict(settings.values)
    values["auth.leeway"] = LEEWAY
    values.update(overrides)
    return Settings(values=values, config_file=None)


@pytest.fixture
def service(tmp_path: Path) -> TokenService:
    return TokenService(make_settings(tmp_path))


def claims_for(service: TokenService, **changes: Any) -> dict[str, Any]:
    """Return valid access claims for user 7, with `changes` applied.

    A value of None removes the claim.
    """
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "7",
        "jti": "jti-1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "iss": service.issuer,
        "aud": service.audience,
        "typ": "access",
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def sign(claims: dict[str, Any], *, key: str = KEY, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": key_id(key)})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reason_of(service: TokenService, token: object, typ: str = "access") -> str:
    with pytest.raises(TokenError) as caught:
        service.verify(token, typ)
    assert isinstance(caught.value, AuthError)
    return caught.value.reason


def test_issue_access_round_trip(service: TokenService) -> None:
    token, claims = service.issue_access(42)
    verified = service.verify(token, "access")
    assert verified == claims
    assert claims["sub"] == "42"
    assert claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == service.access_ttl
    assert claims["nbf"] == claims["iat"]


def test_issue_refresh_carries_family(service: TokenService) -> None:
    token, claims = service.issue_refresh(42, "family-a")
    verified = service.verify(token, "refresh")
    assert verified["fam"] == "family-a"
    assert verified["typ"] == "refresh"
    assert claims["exp"] - claims["iat"] == service.refresh_ttl


def test_jti_is_unique_per_token(service: TokenService) -> None:
    jtis = {service.issue_access(1)[1]["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_header_kid_is_derived_not_key(service: TokenService) -> None:
    token, _ = service.issue_access(1)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == key_id(KEY)
    assert len(header["kid"]) == 16
    assert KEY not in token
    assert KEY not in header["kid"]


def test_refresh_rejected_as_access(service: TokenService) -> None:
    token, _ = service.issue_refresh(1, "family")
    assert reason_of(service, token, "access") == "wrong_type"


def test_access_rejected_as_refresh(service: TokenService) -> None:
    token, _ = service.issue_access(1)
    assert reason_of(service, token, "refresh") == "wrong_type"


def test_wrong_type_message_uses_article(service: TokenService) -> None:
    refresh, _ = service.issue_refresh(1, "family")
    access, _ = service.issue_access(1)
    with pytest.raises(TokenError) as as_access:
        service.verify(refresh, "access")
    assert str(as_access.value.message).startswith("expected an access token")
    with pytest.raises(TokenError) as as_refresh:
        service.verify(access, "refresh")
    assert str(as_refresh.value.message).startswith("expected a refresh token")


def test_alg_none_rejected(service: TokenService) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": key_id(KEY)}).encode())
    payload = b64(json.dumps(claims_for(service)).encode())
    assert reason_of(service, f"{header}.{payload}.") == "bad_algorithm"


def test_hs512_signed_token_rejected(service: TokenService) -> None:
    token = sign(claims_for(service), algorithm="HS512")
    assert reason_of(service, token) == "bad_algorithm"


def test_other_key_rejected(service: TokenService) -> None:
    other = "another-signing-key-" + "x" * 40
    token = jwt.encode(
        claims_for(service), other, algorithm="HS256", headers={"kid": key_id(KEY)}
    )
    assert reason_of(service, token) == "bad_signature"


def test_unknown_kid_rejected(service: TokenService) -> None:
    token = jwt.encode(
        claims_for(service), KEY, algorithm="HS256", headers={"kid": "0" * 16}
    )
    assert reason_of(service, token) == "unknown_key"


def test_tampered_payload_rejected(service: TokenService) -> None:
    token, _ = service.issue_access(7)
    header, _, signature = token.split(".")
    forged = b64(json.dumps(claims_for(service, sub="1")).encode())
    assert reason_of(service, f"{header}.{forged}.{signature}") == "bad_signature"


def test_tampered_signature_rejected(service: TokenService) -> None:
    token, _ = service.issue_access(7)
    flipped = "A" if token[-2] != "A" else "B"
    assert reason_of(service, token[:-2] + flipped + token[-1]) == "bad_signature"


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "jti", "sub", "typ"])
def test_missing_claim_rejected(service: TokenService, claim: str) -> None:
    token = sign(claims_for(service, **{claim: None}))
    assert reason_of(service, token) == "missing_claim"


def test_missing_iss_and_aud_rejected(service: TokenService) -> None:
    assert reason_of(service, sign(claims_for(service, iss=None))) == "missing_claim"
    assert reason_of(service, sign(claims_for(service, aud=None))) == "missing_claim"


def test_exp_just_inside_leeway_accepted(service: TokenService) -> None:
    now = int(time.time())
    token = sign(
        claims_for(service, iat=now - 600, nbf=now - 600, exp=now - LEEWAY + 5)
    )
    assert service.verify(token, "access")["sub"] == "7"


def test_exp_just_outside_leeway_rejected(service: TokenService) -> None:
    now = int(time.time())
    token = sign(
        claims_for(service, iat=now - 600, nbf=now - 600, exp=now - LEEWAY - 5)
    )
    assert reason_of(service, token) == "expired"


def test_nbf_just_inside_leeway_accepted(service: TokenService) -> None:
    now = int(time.time())
    token = sign(claims_for(service, iat=now, nbf=now + LEEWAY - 5))
    assert service.verify(token, "access")["sub"] == "7"


def test_nbf_just_outside_leeway_rejected(service: TokenService) -> None:
    now = int(time.time())
    token = sign(claims_for(service, iat=now, nbf=now + LEEWAY + 5))
    assert reason_of(service, token) == "not_yet_valid"


def test_iat_in_future_rejected(service: TokenService) -> None:
    now = int(time.time())
    token = sign(claims_for(service, iat=now + LEEWAY + 5, nbf=now))
    assert reason_of(service, token) == "not_yet_valid"


def test_issued_with_past_clock_expires(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ttl = settings["auth.access_ttl"]
    now = time.time()
    inside = TokenService(settings, clock=lambda: now - ttl - LEEWAY + 5)
    outside = TokenService(settings, clock=lambda: now - ttl - LEEWAY - 5)
    verifier = TokenService(settings)

    assert verifier.verify(inside.issue_access(3)[0], "access")["sub"] == "3"
    assert reason_of(verifier, outside.issue_access(3)[0]) == "expired"


@pytest.mark.parametrize(
    "issuer", ["deeperhu", "deeperhubx", "xdeeperhub", "DEEPERHUB", "deeperhub "]
)
def test_issuer_prefix_or_suffix_rejected(service: TokenService, issuer: str) -> None:
    assert service.issuer == "deeperhub"
    token = sign(claims_for(service, iss=issuer))
    assert reason_of(service, token) == "bad_issuer"


@pytest.mark.parametrize(
    "audience", ["deeperhu", "deeperhub-admin", ["deeperhub", "other"], ["deeperhub"]]
)
def test_audience_must_match_exactly(service: TokenService, audience: Any) -> None:
    token = sign(claims_for(service, aud=audience))
    assert reason_of(service, token) == "bad_audience"


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", "9999999999"),
        ("exp", 9999999999.5),
        ("iat", True),
        ("sub", 7),
        ("jti", ""),
        ("typ", ["access"]),
    ],
)
def test_claim_of_wrong_type_rejected(
    service: TokenService, claim: str, value: Any
) -> None:
    token = sign(claims_for(service, **{claim: value}))
    assert reason_of(service, token) == "malformed"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "....",
        "eyJ.eyJ.sig",
        b64(b"[]") + "." + b64(b"{}") + ".",
        b64(b'{"alg":"HS256"}') + "." + b64(b"[1,2]") + ".c2ln",
        b64(b"{" * 5000) + ".e30.c2ln",
        "é.é.é",
        "\x00.\x00.\x00",
    ],
)
def test_malformed_token_rejected(service: TokenService, token: str) -> None:
    reason = reason_of(service, token)
    # A header without a known `kid` is rejected before the payload is read.
    assert reason in {"malformed", "bad_algorithm", "bad_signature", "unknown_key"}


@pytest.mark.parametrize("token", [None, 123, b"bytes.token.here", ["a"]])
def test_non_string_token_rejected(service: TokenService, token: object) -> None:
    assert reason_of(service, token) == "malformed"


def test_one_megabyte_token_rejected(service: TokenService) -> None:
    token = "a" * (1024 * 1024)
    assert reason_of(service, token) == "too_large"


def test_token_just_over_limit_rejected(service: TokenService) -> None:
    padding = "x" * MAX_TOKEN_BYTES
    token = sign(claims_for(service, pad=padding))
    assert len(token) > MAX_TOKEN_BYTES
    assert reason_of(service, token) == "too_large"


def test_garbage_never_escapes_as_other_error(service: TokenService) -> None:
    good, _ = service.issue_access(1)
    # Every truncation and every single-character substitution of a valid token.
    candidates = [good[:i] for i in range(len(good))]
    for index in range(0, len(good), 7):
        for char in ("=", ".", "%", "A", "_"):
            candidates.append(good[:index] + char + good[index + 1 :])
    # A change in the unused low bits of the last base64 character can leave a
    # token valid, so only the kind of exception is checked, not that one is raised.
    for candidate in candidates:
        if candidate == good:
            continue
        try:
            service.verify(candidate, "access")
        except TokenError:
            pass


def test_empty_secret_key_rejected(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **{"auth.secret_key": ""})
    with pytest.raises(AuthError):
        TokenService(settings)
