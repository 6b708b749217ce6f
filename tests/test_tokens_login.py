"""Login: rehash of weak password hashes, length limits, identical failures.

Runs the HTTP app in-process against a real DB writer (see test_http_api).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from argon2 import extract_parameters

from deeperhub.auth.passwords import PasswordService
from deeperhub.storage import reads

from .test_http_api import open_env

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .test_http_api import Env


@pytest.fixture
def var_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: stay out of pytest's folders.
    path = Path(tempfile.mkdtemp(prefix="dh-login-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _stored_hash(env: Env, username: str) -> str:
    row = await env.services.reads.run(reads.user_for_login, username)
    assert row is not None
    return str(row["password_hash"])


async def test_login_rehashes_weaker_hash(var_dir: Path) -> None:
    async with open_env(var_dir) as env:
        await env.register("amy")
        weak = await _stored_hash(env, "amy")
        assert extract_parameters(weak).memory_cost == 1024

        # The server now hashes with stronger parameters than the stored hash.
        env.services.passwords = PasswordService(memory_cost=2048, time_cost=2)
        tokens = await env.login("amy")
        assert tokens["access_token"]
        stronger = await _stored_hash(env, "amy")
        parameters = extract_parameters(stronger)
        assert parameters.memory_cost == 2048
        assert parameters.time_cost == 2

        # The new hash still verifies, and is not rehashed again.
        await env.login("amy")
        assert await _stored_hash(env, "amy") == stronger


async def test_login_keeps_stronger_hash(var_dir: Path) -> None:
    async with open_env(var_dir) as env:
        env.services.passwords = PasswordService(memory_cost=2048, time_cost=2)
        await env.register("ben")
        strong = await _stored_hash(env, "ben")
        env.services.passwords = PasswordService(memory_cost=1024, time_cost=1)
        await env.login("ben")
        assert await _stored_hash(env, "ben") == strong


async def test_overlong_password_is_plain_401(var_dir: Path) -> None:
    async with open_env(var_dir) as env:
        await env.register("cat")
        maximum = env.settings["auth.password_max"]
        bodies = {
            "overlong_known_user": {"login": "cat", "password": "x" * (maximum + 1)},
            "overlong_unknown_user": {
                "login": "nobody",
                "password": "x" * (maximum + 1000),
            },
            "wrong_password": {"login": "cat", "password": "wrong password"},
        }
        replies = {}
        for name, body in bodies.items():
            reply = await env.client.call("POST", "/api/auth/login", body)
            replies[name] = reply
        for name, reply in replies.items():
            assert reply.status == 401, name
            assert reply.body == replies["wrong_password"].body, name

        # A 1 MB password never reaches the hasher: the body limit stops it.
        huge = await env.client.call(
            "POST", "/api/auth/login", {"login": "cat", "password": "x" * 1_000_000}
        )
        assert huge.status == 413


async def test_register_rejects_overlong_password(var_dir: Path) -> None:
    async with open_env(var_dir) as env:
        maximum = env.settings["auth.password_max"]
        reply = await env.client.call(
            "POST",
            "/api/auth/register",
            {
                "username": "dan",
                "email": "dan@example.com",
                "password": "p" * (maximum + 1),
            },
        )
        assert reply.status == 422
        assert reply.body["error"]["field"] == "password"
