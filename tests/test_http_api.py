"""HTTP JSON API of the acceptor against a real DB writer and read pool.

The DB writer's `serve` runs in this process on a temporary var dir. Requests
go through Quart's test client, and a few through hypercorn on a loopback port.
Passwords are hashed with cheap Argon2 parameters to keep the tests fast.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import REGISTRY

from deeperhub.auth.passwords import PasswordService
from deeperhub.auth.tokens import TokenService
from deeperhub.config import Settings, load_settings
from deeperhub.ipc import open_rpc_client, serve_unix
from deeperhub.storage.reads import open_read_pool
from workers.acceptor.http_app import create_app
from workers.acceptor.hub import Hub
from workers.acceptor.services import Services
from workers.common import WorkerContext
from workers.db_writer.server import serve as serve_db_writer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from quart_trio import QuartTrio
    from werkzeug.datastructures import Headers

    from deeperhub.ipc import MessageStream, RpcClient

PASSWORD = "correct horse battery"
MAX_REQUEST_BODY = 4096
MAX_BODY_BYTES = 64


def make_settings(var_dir: Path) -> Settings:
    config_file = var_dir / "empty.toml"
    config_file.write_text("")
    environ = {
        "DEEPERHUB_VAR_DIR": str(var_dir),
        "GUARDIAN_SECRET_KEY": "http-test-signing-key-" + "s" * 48,
    }
    loaded = load_settings(environ, config_file, create_dev_key=False)
    values = dict(loaded.values)
    values["server.max_request_body"] = MAX_REQUEST_BODY
    values["websocket.max_body_bytes"] = MAX_BODY_BYTES
    values["database.pool_size"] = 2
    # Reuse tests present a used refresh token at once, which must count as reuse.
    values["auth.refresh_reuse_grace"] = 0
    return Settings(values=values, config_file=config_file)


@dataclass
class Reply:
    status: int
    body: Any
    headers: Headers  # case-insensitive


class Client:
    """Quart test client that returns status, decoded JSON body and headers."""

    def __init__(self, app: QuartTrio) -> None:
        self.http = app.test_client()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body)
            all_headers.setdefault("Content-Type", "application/json")
        response = await self.http.open(
            path, method=method, data=data, headers=all_headers
        )
        raw = await response.get_data()
        decoded = (
            json.loads(raw) if raw and response.mimetype == "application/json" else raw
        )
        return Reply(response.status_code, decoded, response.headers)


@dataclass
class Env:
    app: QuartTrio
    client: Client
    services: Services
    settings: Settings
    db_ctx: WorkerContext
    db_stopped: trio.Event

    async def register(self, name: str, password: str = PASSWORD) -> dict[str, Any]:
        reply = await self.client.call(
            "POST",
            "/api/auth/register",
            {"username": name, "email": f"{name}@example.com", "password": password},
        )
        assert reply.status == 201, reply.body
        return reply.body["user"]

    async def login(self, login: str, password: str = PASSWORD) -> dict[str, Any]:
        reply = await self.client.call(
            "POST", "/api/auth/login", {"login": login, "password": password}
        )
        assert reply.status == 200, reply.body
        return reply.body

    async def user(self, name: str) -> tuple[dict[str, Any], str]:
        """Register `name` and return the user and an access token."""
        user = await self.register(name)
        tokens = await self.login(name)
        return user, tokens["access_token"]

    async def channel(self, token: str, name: str, private: bool = False) -> int:
        reply = await self.client.call(
            "POST", "/api/channels", {"name": name, "private": private}, token=token
        )
        assert reply.status == 201, reply.body
        return int(reply.body["channel"]["id"])


@pytest.fixture
def var_dir() -> Any:
    # Unix socket paths are limited to 107 bytes, so stay out of pytest's long
    # per-test folders.
    path = Path(tempfile.mkdtemp(prefix="dh-http-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def open_env(
    var_dir: Path, supervisor: RpcClient | None = None
) -> AsyncIterator[Env]:
    """Run a DB writer and yield the app wired to it; stop the writer after."""
    settings = make_settings(var_dir)
    db_ctx = WorkerContext(settings=settings, worker_id="db_writer")
    db_stopped = trio.Event()

    async def run_db_writer() -> None:
        try:
            await serve_db_writer(db_ctx)
        finally:
            db_stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_db_writer)
        await db_ctx.is_ready.wait()
        async with (
            open_rpc_client(settings.socket_path("db")) as db,
            open_read_pool(settings.db_path, 2) as reads,
        ):
            services = Services(
                settings=settings,
                db=db,
                reads=reads,
                tokens=TokenService(settings),
                passwords=PasswordService(memory_cost=1024, time_cost=1),
                hub=Hub(settings),
                worker_id="acceptor-1",
                supervisor=supervisor,
            )
            app = create_app(services)
            yield Env(app, Client(app), services, settings, db_ctx, db_stopped)
        db_ctx.request_stop("shutdown")


@pytest.fixture
async def env(var_dir: Path) -> AsyncIterator[Env]:
    async with open_env(var_dir) as value:
        yield value


def error_code(reply: Reply) -> str:
    assert set(reply.body) == {"error"}, reply.body
    assert isinstance(reply.body["error"]["message"], str)
    return str(reply.body["error"]["code"])


# Registration.


async def test_register_returns_public_user(env: Env) -> None:
    reply = await env.client.call(
        "POST",
        "/api/auth/register",
        {"username": "alice", "email": "alice@example.com", "password": PASSWORD},
    )
    assert reply.status == 201
    user = reply.body["user"]
    assert set(user) == {"id", "username", "email"}
    assert user["username"] == "alice"
    assert user["email"] == "alice@example.com"
    assert isinstance(user["id"], int)
    assert reply.headers["Content-Type"] == "application/json"


async def test_register_conflict_names_field(env: Env) -> None:
    await env.register("alice")
    taken_name = await env.client.call(
        "POST",
        "/api/auth/register",
        {"username": "alice", "email": "other@example.com", "password": PASSWORD},
    )
    assert taken_name.status == 409
    assert error_code(taken_name) == "conflict"
    assert taken_name.body["error"]["field"] == "username"
    assert "username" in taken_name.body["error"]["message"]

    taken_email = await env.client.call(
        "POST",
        "/api/auth/register",
        {"username": "alice2", "email": "alice@example.com", "password": PASSWORD},
    )
    assert taken_email.status == 409
    assert taken_email.body["error"]["field"] == "email"
    assert "email" in taken_email.body["error"]["message"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": None}, "username"),
        ({"email": "not-an-email"}, "email"),
        ({"email": 5}, "email"),
        ({"password": "short"}, "password"),
        ({"password": None}, "password"),
    ],
)
async def test_register_invalid_field(
    env: Env, changes: dict[str, Any], field: str
) -> None:
    body = {"username": "bob", "email": "bob@example.com", "password": PASSWORD}
    body.update(changes)
    body = {key: value for key, value in body.items() if value is not None}
    reply = await env.client.call("POST", "/api/auth/register", body)
    assert reply.status == 422
    assert error_code(reply) == "validation_failed"
    assert reply.body["error"]["field"] == field
    assert field in reply.body["error"]["message"]


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"username": NaN}', 400, "invalid_json"),
        (b"\xff\xfe{}", 400, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, 413, "payload_too_large"),
        (b"[" * 2000 + b"]" * 2000, 400, "invalid_json"),
        (b"[1, 2]", 422, "validation_failed"),
        (b'"text"', 422, "validation_failed"),
        (b"null", 422, "validation_failed"),
    ],
)
async def test_bad_request_bodies(
    env: Env, data: bytes, status: int, code: str
) -> None:
    reply = await env.client.call(
        "POST",
        "/api/auth/register",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == status
    assert error_code(reply) == code


# Login, refresh and revoke.


@pytest.mark.parametrize("field", ["login", "username", "email"])
async def test_login_by_each_field(env: Env, field: str) -> None:
    await env.register("carol")
    value = "carol@example.com" if field == "email" else "carol"
    reply = await env.client.call(
        "POST", "/api/auth/login", {field: value, "password": PASSWORD}
    )
    assert reply.status == 200
    assert reply.body["token_type"] == "Bearer"
    assert reply.body["expires_in"] == env.settings["auth.access_ttl"]
    access = env.services.tokens.verify(reply.body["access_token"], "access")
    refresh = env.services.tokens.verify(reply.body["refresh_token"], "refresh")
    assert access["sub"] == refresh["sub"]


async def test_login_failures_look_identical(env: Env) -> None:
    await env.register("dave")
    wrong_password = await env.client.call(
        "POST", "/api/auth/login", {"login": "dave", "password": "wrong password"}
    )
    unknown_user = await env.client.call(
        "POST", "/api/auth/login", {"login": "nobody", "password": "wrong password"}
    )
    assert wrong_password.status == 401
    assert unknown_user.status == 401
    assert wrong_password.body == unknown_user.body
    assert error_code(wrong_password) == "unauthorized"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"password": PASSWORD}, "login"),
        ({"login": "", "password": PASSWORD}, "login"),
        ({"login": 5, "password": PASSWORD}, "login"),
        ({"login": "erin"}, "password"),
        ({"login": "erin", "password": 12345678}, "password"),
    ],
)
async def test_login_missing_fields(env: Env, body: dict[str, Any], field: str) -> None:
    reply = await env.client.call("POST", "/api/auth/login", body)
    assert reply.status == 422
    assert reply.body["error"]["field"] == field


async def test_refresh_rotates_in_same_family(env: Env) -> None:
    await env.register("frank")
    first = await env.login("frank")
    reply = await env.client.call(
        "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert reply.status == 200
    second = reply.body
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    tokens = env.services.tokens
    old_family = tokens.verify(first["refresh_token"], "refresh")["fam"]
    new_family = tokens.verify(second["refresh_token"], "refresh")["fam"]
    assert old_family == new_family

    me = await env.client.call("GET", "/api/users/me", token=second["access_token"])
    assert me.status == 200
    assert me.body["user"]["username"] == "frank"


async def test_refresh_reuse_revokes_family(env: Env) -> None:
    await env.register("grace")
    first = await env.login("grace")
    rotated = await env.client.call(
        "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert rotated.status == 200

    reused = await env.client.call(
        "POST", "/api/auth/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert reused.status == 401
    assert error_code(reused) == "unauthorized"

    # The reuse revoked the whole family, including the newest token.
    newest = await env.client.call(
        "POST", "/api/auth/refresh", {"refresh_token": rotated.body["refresh_token"]}
    )
    assert newest.status == 401


async def test_logins_get_separate_families(env: Env) -> None:
    await env.register("heidi")
    first = await env.login("heidi")
    second = await env.login("heidi")
    tokens = env.services.tokens
    assert (
        tokens.verify(first["refresh_token"], "refresh")["fam"]
        != tokens.verify(second["refresh_token"], "refresh")["fam"]
    )


@pytest.mark.parametrize("kind", ["access", "garbage", "missing", "number"])
async def test_refresh_rejects_bad_tokens(env: Env, kind: str) -> None:
    await env.register("ivan")
    tokens = await env.login("ivan")
    body: dict[str, Any] = {
        "access": {"refresh_token": tokens["access_token"]},
        "garbage": {"refresh_token": "not.a.token"},
        "missing": {},
        "number": {"refresh_token": 5},
    }[kind]
    reply = await env.client.call("POST", "/api/auth/refresh", body)
    expected = 422 if kind in ("missing", "number") else 401
    assert reply.status == expected


async def test_revoke_blocks_access_token(env: Env) -> None:
    _, token = await env.user("judy")
    assert (await env.client.call("GET", "/api/users/me", token=token)).status == 200

    reply = await env.client.call("POST", "/api/auth/revoke", token=token)
    assert reply.status == 204

    for method, path in (("GET", "/api/users/me"), ("GET", "/api/channels")):
        after = await env.client.call(method, path, token=token)
        assert after.status == 401
        assert error_code(after) == "unauthorized"
    again = await env.client.call("POST", "/api/auth/revoke", token=token)
    assert again.status == 401


async def test_revoke_with_refresh_token(env: Env) -> None:
    await env.register("ken")
    tokens = await env.login("ken")
    reply = await env.client.call(
        "POST",
        "/api/auth/revoke",
        {"refresh_token": tokens["refresh_token"]},
        token=tokens["access_token"],
    )
    assert reply.status == 204
    refreshed = await env.client.call(
        "POST", "/api/auth/refresh", {"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status == 401


async def test_revoke_rejects_other_users_refresh(env: Env) -> None:
    _, token = await env.user("leo")
    await env.register("mia")
    other = await env.login("mia")
    reply = await env.client.call(
        "POST",
        "/api/auth/revoke",
        {"refresh_token": other["refresh_token"]},
        token=token,
    )
    assert reply.status == 403
    still_valid = await env.client.call(
        "POST", "/api/auth/refresh", {"refresh_token": other["refresh_token"]}
    )
    assert still_valid.status == 200


# Bearer authentication.


async def test_users_me_returns_user(env: Env) -> None:
    user, token = await env.user("nina")
    reply = await env.client.call("GET", "/api/users/me", token=token)
    assert reply.status == 200
    assert reply.body == {"user": user}


async def test_users_me_rejects_bad_credentials(env: Env) -> None:
    await env.register("oscar")
    tokens = await env.login("oscar")
    settings = env.settings
    expired_issuer = TokenService(
        settings,
        clock=lambda: (
            time.time() - settings["auth.access_ttl"] - settings["auth.leeway"] - 5
        ),
    )
    user_id = env.services.tokens.verify(tokens["access_token"], "access")["sub"]
    expired, _ = expired_issuer.issue_access(user_id)

    cases: dict[str, dict[str, str]] = {
        "missing": {},
        "wrong scheme": {"Authorization": f"Basic {tokens['access_token']}"},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed": {"Authorization": "Bearer abc.def.ghi"},
        "refresh token": {"Authorization": f"Bearer {tokens['refresh_token']}"},
        "expired": {"Authorization": f"Bearer {expired}"},
        "oversized": {"Authorization": "Bearer " + "a" * 9000},
    }
    for name, headers in cases.items():
        reply = await env.client.call("GET", "/api/users/me", headers=headers)
        assert reply.status == 401, name
        assert error_code(reply) == "unauthorized", name
        assert reply.headers["WWW-Authenticate"].startswith("Bearer"), name


async def test_bearer_scheme_is_case_insensitive(env: Env) -> None:
    _, token = await env.user("pat")
    reply = await env.client.call(
        "GET", "/api/users/me", headers={"Authorization": f"bearer {token}"}
    )
    assert reply.status == 200


# Channels.


async def test_create_channel(env: Env) -> None:
    user, token = await env.user("quinn")
    reply = await env.client.call(
        "POST", "/api/channels", {"name": "general"}, token=token
    )
    assert reply.status == 201
    channel = reply.body["channel"]
    assert set(channel) == {"id", "name", "owner_id", "private", "inserted_at"}
    assert channel["name"] == "general"
    assert channel["owner_id"] == user["id"]
    assert channel["private"] is False
    assert channel["inserted_at"].endswith("Z")


async def test_create_channel_errors(env: Env) -> None:
    _, token = await env.user("rita")
    await env.channel(token, "general")

    duplicate = await env.client.call(
        "POST", "/api/channels", {"name": "general"}, token=token
    )
    assert duplicate.status == 409
    assert error_code(duplicate) == "conflict"

    for body, field in (
        ({"name": "bad name"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 65}, "name"),
        ({}, "name"),
        ({"name": "ok", "private": "yes"}, "private"),
    ):
        reply = await env.client.call("POST", "/api/channels", body, token=token)
        assert reply.status == 422, body
        assert reply.body["error"]["field"] == field

    anonymous = await env.client.call("POST", "/api/channels", {"name": "other"})
    assert anonymous.status == 401


async def test_list_channels_hides_others_private(env: Env) -> None:
    _, owner = await env.user("sam")
    _, other = await env.user("tina")
    public_id = await env.channel(owner, "lobby")
    private_id = await env.channel(owner, "secret", private=True)
    own_private = await env.channel(other, "tinas", private=True)

    owner_view = await env.client.call("GET", "/api/channels", token=owner)
    assert [c["id"] for c in owner_view.body["channels"]] == [public_id, private_id]

    other_view = await env.client.call("GET", "/api/channels", token=other)
    assert [c["id"] for c in other_view.body["channels"]] == [public_id, own_private]


async def test_private_channel_invisible_to_non_member(env: Env) -> None:
    _, owner = await env.user("uma")
    _, other = await env.user("vic")
    private_id = await env.channel(owner, "hidden", private=True)

    assert (
        await env.client.call("GET", f"/api/channels/{private_id}", token=owner)
    ).status == 200
    hidden = await env.client.call("GET", f"/api/channels/{private_id}", token=other)
    unknown = await env.client.call("GET", "/api/channels/999999", token=other)
    assert hidden.status == 404
    assert unknown.status == 404
    assert error_code(hidden) == error_code(unknown) == "not_found"

    history = await env.client.call(
        "GET", f"/api/channels/{private_id}/messages", token=other
    )
    assert history.status == 404

    # Writes get the same 404 for a non-member, so no route reveals the channel.
    writes = [
        ("DELETE", f"/api/channels/{private_id}", None),
        ("POST", f"/api/channels/{private_id}/messages", {"body": "hi"}),
        ("POST", f"/api/channels/{private_id}/subscribe", None),
        ("PUT", f"/api/channels/{private_id}/retention", {"max_messages": 5}),
    ]
    for method, path, body in writes:
        reply = await env.client.call(method, path, body, token=other)
        assert reply.status == 404, (method, path)
        assert error_code(reply) == "not_found", (method, path)


async def test_delete_channel_owner_only(env: Env) -> None:
    _, owner = await env.user("walt")
    _, other = await env.user("xena")
    channel_id = await env.channel(owner, "doomed")

    forbidden = await env.client.call(
        "DELETE", f"/api/channels/{channel_id}", token=other
    )
    assert forbidden.status == 403
    assert error_code(forbidden) == "forbidden"

    deleted = await env.client.call(
        "DELETE", f"/api/channels/{channel_id}", token=owner
    )
    assert deleted.status == 204
    after_delete = await env.client.call(
        "GET", f"/api/channels/{channel_id}", token=owner
    )
    assert after_delete.status == 404
    missing = await env.client.call("DELETE", "/api/channels/999999", token=owner)
    assert missing.status == 404


async def test_subscribe_public_and_private(env: Env) -> None:
    _, owner = await env.user("yara")
    guest, guest_token = await env.user("zack")
    public_id = await env.channel(owner, "open")
    private_id = await env.channel(owner, "closed", private=True)
    base = "/api/channels"

    own = await env.client.call(
        "POST", f"{base}/{public_id}/subscribe", token=guest_token
    )
    assert own.status == 204

    # A non-member cannot see the private channel, so it is not found.
    rejected = await env.client.call(
        "POST", f"{base}/{private_id}/subscribe", token=guest_token
    )
    assert rejected.status == 404

    added = await env.client.call(
        "POST", f"{base}/{private_id}/subscribe", {"user_id": guest["id"]}, token=owner
    )
    assert added.status == 204
    visible = await env.client.call("GET", f"{base}/{private_id}", token=guest_token)
    assert visible.status == 200

    removed = await env.client.call(
        "POST", f"{base}/{private_id}/unsubscribe", token=guest_token
    )
    assert removed.status == 204
    hidden = await env.client.call("GET", f"{base}/{private_id}", token=guest_token)
    assert hidden.status == 404


async def test_subscribe_other_user_rules(env: Env) -> None:
    owner_user, owner = await env.user("abby")
    _, guest_token = await env.user("bert")
    third, _ = await env.user("cleo")
    public_id = await env.channel(owner, "plaza")
    base = f"/api/channels/{public_id}"

    by_guest = await env.client.call(
        "POST", f"{base}/subscribe", {"user_id": third["id"]}, token=guest_token
    )
    assert by_guest.status == 403
    by_owner = await env.client.call(
        "POST", f"{base}/subscribe", {"user_id": third["id"]}, token=owner
    )
    assert by_owner.status == 204

    kick_by_guest = await env.client.call(
        "POST", f"{base}/unsubscribe", {"user_id": owner_user["id"]}, token=guest_token
    )
    assert kick_by_guest.status == 403

    unknown_user = await env.client.call(
        "POST", f"{base}/subscribe", {"user_id": 999999}, token=owner
    )
    assert unknown_user.status == 404
    for bad in ("7", -1, 0, True, 1.5):
        reply = await env.client.call(
            "POST", f"{base}/subscribe", {"user_id": bad}, token=owner
        )
        assert reply.status == 422, bad
    unknown_channel = await env.client.call(
        "POST", "/api/channels/999999/subscribe", token=owner
    )
    assert unknown_channel.status == 404


# Messages.


async def test_post_message_fields_and_seq(env: Env) -> None:
    user, token = await env.user("dora")
    channel_id = await env.channel(token, "chat")
    path = f"/api/channels/{channel_id}/messages"

    first = await env.client.call("POST", path, {"body": "hello"}, token=token)
    second = await env.client.call("POST", path, {"body": "héllo ☃"}, token=token)
    assert first.status == 201
    assert second.status == 201
    message = first.body["message"]
    assert set(message) == {
        "id",
        "channel_id",
        "user_id",
        "username",
        "body",
        "inserted_at",
        "seq",
    }
    assert message["channel_id"] == channel_id
    assert message["user_id"] == user["id"]
    assert message["username"] == "dora"
    assert message["body"] == "hello"
    assert second.body["message"]["seq"] == message["seq"] + 1
    assert second.body["message"]["body"] == "héllo ☃"


async def test_post_message_reaches_bus(env: Env) -> None:
    _, token = await env.user("eddy")
    channel_id = await env.channel(token, "news")
    async with open_rpc_client(env.settings.socket_path("db")) as bus:
        await bus.call("bus_subscribe")
        reply = await env.client.call(
            "POST",
            f"/api/channels/{channel_id}/messages",
            {"body": "ping"},
            token=token,
        )
        assert reply.status == 201
        with trio.fail_after(5):
            event = await bus.events.receive()
    assert event["event"] == "message"
    assert event["topic"] == "channel:news"
    assert event["message"]["id"] == reply.body["message"]["id"]


async def test_post_message_errors(env: Env) -> None:
    _, owner = await env.user("fay")
    _, other = await env.user("gus")
    private_id = await env.channel(owner, "inner", private=True)
    public_id = await env.channel(owner, "outer")

    # Like GET, a post by a non-member does not reveal that the channel exists.
    not_member = await env.client.call(
        "POST", f"/api/channels/{private_id}/messages", {"body": "hi"}, token=other
    )
    assert not_member.status == 404
    assert error_code(not_member) == "not_found"

    path = f"/api/channels/{public_id}/messages"
    for body in ({"body": ""}, {"body": 5}, {}, {"body": "x" * (MAX_BODY_BYTES + 1)}):
        reply = await env.client.call("POST", path, body, token=other)
        assert reply.status == 422, body
        assert reply.body["error"]["field"] == "body"
    # 22 three-byte characters are 66 bytes, over the 64-byte limit.
    wide = await env.client.call("POST", path, {"body": "☃" * 22}, token=other)
    assert wide.status == 422

    missing = await env.client.call(
        "POST", "/api/channels/999999/messages", {"body": "hi"}, token=other
    )
    assert missing.status == 404


async def test_message_history_pagination(env: Env) -> None:
    _, token = await env.user("hank")
    channel_id = await env.channel(token, "log")
    path = f"/api/channels/{channel_id}/messages"
    ids = []
    for index in range(5):
        reply = await env.client.call("POST", path, {"body": f"m{index}"}, token=token)
        ids.append(reply.body["message"]["id"])

    everything = await env.client.call("GET", path, token=token)
    assert everything.status == 200
    assert [m["id"] for m in everything.body["messages"]] == ids
    assert [m["body"] for m in everything.body["messages"]] == [
        f"m{i}" for i in range(5)
    ]

    page = await env.client.call(
        "GET", f"{path}?after_id={ids[1]}&limit=2", token=token
    )
    assert [m["id"] for m in page.body["messages"]] == ids[2:4]

    for query in ("limit=0", "limit=501", "limit=abc", "after_id=-1", "after_id=1.5"):
        bad = await env.client.call("GET", f"{path}?{query}", token=token)
        assert bad.status == 422, query
        assert error_code(bad) == "validation_failed"
    at_max = await env.client.call("GET", f"{path}?limit=500", token=token)
    assert at_max.status == 200


# Routing errors, limits, metrics and health.


async def test_unknown_route_and_wrong_method(env: Env) -> None:
    missing = await env.client.call("GET", "/api/nothing-here")
    assert missing.status == 404
    assert error_code(missing) == "not_found"

    wrong = await env.client.call("PUT", "/api/auth/login")
    assert wrong.status == 405
    assert error_code(wrong) == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]


async def test_body_over_limit_is_413(env: Env) -> None:
    data = json.dumps({"username": "x" * MAX_REQUEST_BODY})
    reply = await env.client.call(
        "POST",
        "/api/auth/register",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == 413
    assert error_code(reply) == "payload_too_large"


async def test_unexpected_error_is_500_json(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode() -> Any:
        raise RuntimeError("secret detail that must not reach the client")

    env.app.add_url_rule("/test/explode", "explode", explode)
    with caplog.at_level("ERROR", logger="deeperhub.acceptor.http"):
        reply = await env.client.call("GET", "/test/explode")
    assert reply.status == 500
    assert error_code(reply) == "internal_error"
    assert "secret detail" not in json.dumps(reply.body)
    assert any("unhandled error" in record.message for record in caplog.records)


def sample(method: str, route: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "deeperhub_http_requests_total",
        {"method": method, "route": route, "status": str(status)},
    )
    return value or 0.0


async def test_metrics_use_route_templates(env: Env) -> None:
    _, token = await env.user("ivy")
    channel_id = await env.channel(token, "metrics-room")
    template = "/api/channels/<int:channel_id>"
    before_ok = sample("GET", template, 200)
    before_unmatched = sample("GET", "unmatched", 404)

    await env.client.call("GET", f"/api/channels/{channel_id}", token=token)
    await env.client.call("GET", "/no/such/path/12345")
    await env.client.call("BREW", "/api/channels")

    assert sample("GET", template, 200) == before_ok + 1
    assert sample("GET", "unmatched", 404) == before_unmatched + 1

    reply = await env.client.call("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body.decode()
    assert 'route="/api/channels/<int:channel_id>"' in text
    assert "/no/such/path" not in text
    assert f"/api/channels/{channel_id}" not in text
    assert 'method="BREW"' not in text
    assert 'method="other"' in text


async def test_health_without_supervisor(env: Env) -> None:
    reply = await env.client.call("GET", "/health")
    assert reply.status == 200
    assert reply.body["status"] == "ok"
    assert reply.body["workers"]["acceptor-1"]["state"] == "running"


async def test_storage_down_is_503(env: Env) -> None:
    env.db_ctx.request_stop("shutdown")
    with trio.fail_after(10):
        await env.db_stopped.wait()
    reply = await env.client.call(
        "POST",
        "/api/auth/register",
        {"username": "late", "email": "late@example.com", "password": PASSWORD},
    )
    assert reply.status == 503
    assert error_code(reply) == "service_unavailable"

    await trio.testing.wait_all_tasks_blocked()
    assert env.services.db.closed
    health = await env.client.call("GET", "/health")
    assert health.status == 503
    assert health.body["status"] == "degraded"


# Supervisor status for /health, served by a real IPC server.


@asynccontextmanager
async def open_supervisor(
    path: Path, workers: dict[str, Any] | None
) -> AsyncIterator[RpcClient]:
    """Serve `status` on `path`. With `workers` None, requests get no reply."""

    async def handle(messages: MessageStream) -> None:
        while (message := await messages.receive()) is not None:
            if workers is None:
                continue
            result = {"workers": workers}
            await messages.send({"id": message["id"], "ok": True, "result": result})

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, handle)
        async with open_rpc_client(path) as client:
            yield client
        nursery.cancel_scope.cancel()


def worker(state: str) -> dict[str, Any]:
    return {"state": state, "pid": 1234, "restarts": 0}


@pytest.mark.parametrize(
    ("states", "status"),
    [
        ({"db_writer": "running", "acceptor-1": "running"}, 200),
        ({"db_writer": "restarting", "acceptor-1": "running"}, 503),
        ({"db_writer": "stopped", "acceptor-1": "running"}, 503),
    ],
)
async def test_health_reports_workers(
    var_dir: Path, states: dict[str, str], status: int
) -> None:
    workers = {name: worker(state) for name, state in states.items()}
    async with (
        open_supervisor(var_dir / "sup.sock", workers) as supervisor,
        open_env(var_dir, supervisor) as env,
    ):
        reply = await env.client.call("GET", "/health")
    assert reply.status == status
    assert reply.body["workers"] == workers
    assert reply.body["status"] == ("ok" if status == 200 else "degraded")


async def test_health_supervisor_silent_is_503(var_dir: Path) -> None:
    async with (
        open_supervisor(var_dir / "sup.sock", None) as supervisor,
        open_env(var_dir, supervisor) as env,
    ):
        with trio.fail_after(10):
            reply = await env.client.call("GET", "/health")
    assert reply.status == 503
    assert reply.body["status"] == "degraded"
    assert reply.body["workers"]["supervisor"]["state"] == "unreachable"
    assert reply.body["workers"]["acceptor-1"]["state"] == "running"


# Through hypercorn on a loopback port, as the acceptor serves it.


async def test_over_loopback_http(env: Env) -> None:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, env.app, config)
        base_url = binds[0]
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            registered = await http.post(
                "/api/auth/register",
                json={
                    "username": "net",
                    "email": "net@example.com",
                    "password": PASSWORD,
                },
            )
            assert registered.status_code == 201

            too_large = await http.post(
                "/api/auth/register",
                content=b"{" + b" " * (MAX_REQUEST_BODY * 4) + b"}",
                headers={"Content-Type": "application/json"},
            )
            assert too_large.status_code == 413
            assert too_large.json()["error"]["code"] == "payload_too_large"

            missing = await http.get("/api/channels/1/nothing")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
        nursery.cancel_scope.cancel()
