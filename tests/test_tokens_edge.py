"""Bad access tokens against a real daemon: 401 over HTTP, 403 before the upgrade.

Every case is sent twice: as a Bearer token to `GET /api/users/me`, and as the
`token` of a WebSocket upgrade. A 500 or a 101 would be a failure. The daemon
runs with the default leeway of 30 seconds.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from .daemon import Daemon
from .data_safety_support import (
    craft_token,
    login,
    register,
    upgrade_status,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


LEEWAY = 30

# The HS384 case signs with the daemon's 38-byte key on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    instance = Daemon(tmp_path_factory.mktemp("edge") / "var")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def user(running: Daemon) -> dict[str, Any]:
    user = register(running, "edgar")
    user["tokens"] = login(running, "edgar")
    return user


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _bad_tokens(user_id: int, refresh_token: str) -> dict[str, str]:
    now = int(time.time())
    good = craft_token(user_id)
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "1" if user_id != 1 else "2"
    tampered = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    unsigned_header = _b64(json.dumps({"alg": "none", "kid": "x"}).encode())
    return {
        "alg_none": f"{unsigned_header}.{payload}.",
        "hs512": craft_token(user_id, key="k" * 64, algorithm="HS512"),
        "hs384_same_key": craft_token(user_id, algorithm="HS384"),
        "tampered_payload": tampered,
        "missing_exp": craft_token(user_id, exp=None),
        "missing_iat": craft_token(user_id, iat=None),
        "missing_jti": craft_token(user_id, jti=None),
        "exp_outside_leeway": craft_token(user_id, exp=now - LEEWAY - 5),
        "nbf_outside_leeway": craft_token(user_id, nbf=now + LEEWAY + 5),
        "iat_outside_leeway": craft_token(user_id, iat=now + LEEWAY + 5),
        "issuer_prefix": craft_token(user_id, iss="deeper"),
        "issuer_suffix": craft_token(user_id, iss="deeperhub.evil"),
        "audience_list": craft_token(user_id, aud=["deeperhub", "other"]),
        "refresh_as_access": refresh_token,
        "unknown_kid": craft_token(user_id, kid="0123456789abcdef"),
        "path_kid": craft_token(user_id, kid="../../secret_key"),
        "no_kid": craft_token(user_id, kid=None),
        "malformed": "not.a.token",
        "garbage": "%%%%",
        "over_8k": craft_token(user_id, pad="x" * 9000),
    }


def _me_status(daemon: Daemon, token: str) -> int:
    reply = httpx.get(
        daemon.base_url + "/api/users/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    return reply.status_code


def test_edge_cases_are_401_over_http(running: Daemon, user: dict[str, Any]) -> None:
    cases = _bad_tokens(user["id"], user["tokens"]["refresh_token"])
    statuses = {name: _me_status(running, token) for name, token in cases.items()}
    assert statuses == dict.fromkeys(cases, 401)


def test_edge_cases_are_403_on_upgrade(running: Daemon, user: dict[str, Any]) -> None:
    cases = _bad_tokens(user["id"], user["tokens"]["refresh_token"])
    statuses = {name: upgrade_status(running, token) for name, token in cases.items()}
    assert statuses == dict.fromkeys(cases, 403)


def test_leeway_inside_is_accepted(running: Daemon, user: dict[str, Any]) -> None:
    now = int(time.time())
    inside = {
        "exp": craft_token(user["id"], exp=now - LEEWAY + 5),
        "nbf": craft_token(user["id"], nbf=now + LEEWAY - 5),
        "iat": craft_token(user["id"], iat=now + LEEWAY - 5),
    }
    for name, token in inside.items():
        assert _me_status(running, token) == 200, name
        assert upgrade_status(running, token) == 101, name


def test_one_megabyte_token_never_500(running: Daemon, user: dict[str, Any]) -> None:
    huge = "a" * 1_000_000
    # A request head over server.max_header_bytes is cut off before routing.
    assert _me_status(running, huge) == 431
    assert upgrade_status(running, huge) == 431
    # In a body under server.max_request_body the token itself is rejected.
    reply = httpx.post(
        running.base_url + "/api/auth/refresh",
        json={"refresh_token": huge},
        timeout=10,
    )
    assert reply.status_code == 401


def test_access_token_refused_for_refresh(
    running: Daemon, user: dict[str, Any]
) -> None:
    reply = httpx.post(
        running.base_url + "/api/auth/refresh",
        json={"refresh_token": user["tokens"]["access_token"]},
        timeout=10,
    )
    assert reply.status_code == 401


def test_daemon_token_claims_are_complete(
    running: Daemon, user: dict[str, Any]
) -> None:
    import jwt

    for name in ("access_token", "refresh_token"):
        token = user["tokens"][name]
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        assert header["alg"] == "HS256"
        assert isinstance(header["kid"], str)
        assert {"sub", "jti", "iat", "nbf", "exp", "iss", "aud", "typ", "fam"} <= set(
            claims
        )
    access = jwt.decode(
        user["tokens"]["access_token"], options={"verify_signature": False}
    )
    assert access["exp"] - access["iat"] == 3600
    refresh = jwt.decode(
        user["tokens"]["refresh_token"], options={"verify_signature": False}
    )
    assert refresh["exp"] - refresh["iat"] == 30 * 86400
    assert refresh["fam"] == access["fam"]
