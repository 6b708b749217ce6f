"""WebSocket path of the acceptor behind a loopback listener, with real clients.

A DB writer (`workers.db_writer.server.serve`) runs in this process on a
temporary var dir, with a read pool, a token service and a hub, as in the
acceptor. Clients are `websockets` 17 trio clients speaking Phoenix V2 or V1,
or raw sockets where a client must misbehave.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
import trio
import websockets.trio.client
from prometheus_client import REGISTRY
from websockets.exceptions import ConnectionClosed, InvalidStatus

from deeperhub.auth.passwords import PasswordService
from deeperhub.auth.tokens import TokenService
from deeperhub.config import Settings, load_settings
from deeperhub.http_head import find_head_end, parse_request_head
from deeperhub.ipc import open_rpc_client
from deeperhub.storage.reads import open_read_pool
from workers.acceptor import session as session_module
from workers.acceptor.hub import Hub
from workers.acceptor.pushes import PushPipeline
from workers.acceptor.services import Services
from workers.acceptor.websocket import handle_websocket
from workers.common import WorkerContext
from workers.db_writer.server import serve as serve_db_writer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from websockets.trio.client import ClientConnection

    from deeperhub.ipc import RpcClient

STEP_TIMEOUT = 5.0


def make_settings(var_dir: Path, overrides: dict[str, Any]) -> Settings:
    config_file = var_dir / "empty.toml"
    config_file.write_text("")
    environ = {
        "DEEPERHUB_VAR_DIR": str(var_dir),
        "GUARDIAN_SECRET_KEY": "ws-test-signing-key-" + "w" * 40,
    }
    loaded = load_settings(environ, config_file, create_dev_key=False)
    values = dict(loaded.values)
    values["database.pool_size"] = 2
    # Values set here skip the range checks of load_settings, so tests may use
    # a heartbeat timeout below the 1 s minimum.
    values.update(overrides)
    return Settings(values=values, config_file=config_file)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Env:
    settings: Settings
    services: Services
    db: RpcClient
    port: int
    names: dict[str, int] = field(default_factory=dict)

    @property
    def hub(self) -> Hub:
        return self.services.hub

    async def user(self, name: str) -> tuple[int, str]:
        """Register `name` and return its id and an access token."""
        result = await self.db.call(
            "register_user",
            username=name,
            email=f"{name}@example.test",
            password_hash="not-a-real-hash",
        )
        user_id = int(result["user"]["id"])
        token, _ = self.services.tokens.issue_access(user_id)
        return user_id, token

    async def channel(self, name: str, owner_id: int, *, private: bool = False) -> int:
        result = await self.db.call(
            "create_channel", name=name, owner_id=owner_id, private=private
        )
        return int(result["channel"]["id"])

    async def publish(self, channel_id: int, user_id: int, body: str) -> int:
        result = await self.db.call(
            "insert_message", channel_id=channel_id, user_id=user_id, body=body
        )
        return int(result["message"]["id"])

    def url(self, token: str | None, vsn: str | None = "2.0.0") -> str:
        query: dict[str, str] = {}
        if token is not None:
            query["token"] = token
        if vsn is not None:
            query["vsn"] = vsn
        return f"ws://127.0.0.1:{self.port}/socket/websocket?{urlencode(query)}"


async def serve_one(
    services: Services, stream: trio.SocketStream, send_buffer: int | None
) -> None:
    """Read a request head and hand the connection over, as the listener does."""
    if send_buffer is not None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    buffer = bytearray()
    while find_head_end(buffer) < 0:
        chunk = await stream.receive_some(65536)
        if not chunk:
            await stream.aclose()
            return
        buffer += chunk
    end = find_head_end(buffer)
    head = parse_request_head(bytes(buffer[:end]), ("127.0.0.1", 0))
    await handle_websocket(services, stream, head, bytes(buffer[end:]))


@asynccontextmanager
async def open_env(
    *, socket_send_buffer: int | None = None, **overrides: Any
) -> AsyncIterator[Env]:
    """Run a DB writer, a hub and a loopback WebSocket listener.

    `overrides` replace settings, with `__` for the dot: `websocket__max_joins=2`.
    """
    # Unix socket paths are limited to 107 bytes, so stay out of pytest's long
    # per-test folders.
    var_dir = Path(tempfile.mkdtemp(prefix="dh-ws-"))
    settings = make_settings(
        var_dir, {key.replace("__", "."): value for key, value in overrides.items()}
    )
    try:
        async with trio.open_nursery() as nursery:
            ctx = WorkerContext(settings=settings, worker_id="db_writer")
            nursery.start_soon(serve_db_writer, ctx)
            with trio.fail_after(STEP_TIMEOUT):
                await ctx.is_ready.wait()
            socket_path = settings.socket_path("db")
            async with (
                open_rpc_client(socket_path) as db,
                open_rpc_client(socket_path) as bus,
                open_read_pool(settings.db_path, 2) as reads,
            ):
                await bus.call("bus_subscribe")
                hub = Hub(settings)
                services = Services(
                    settings=settings,
                    db=db,
                    reads=reads,
                    tokens=TokenService(settings),
                    passwords=PasswordService(),
                    hub=hub,
                )
                nursery.start_soon(hub.consume_bus, bus.events)
                # As in the acceptor: direct socket writes with drain tasks,
                # and pipelined pushes.
                await nursery.start(hub.run_flusher)
                services.pushes = PushPipeline(settings, hub, timeout=10.0)
                await nursery.start(services.pushes.run)

                async def handler(stream: trio.SocketStream) -> None:
                    await serve_one(services, stream, socket_send_buffer)

                listeners = await nursery.start(
                    partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
                )
                port = listeners[0].socket.getsockname()[1]
                yield Env(settings=settings, services=services, db=db, port=port)
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(var_dir, ignore_errors=True)


@asynccontextmanager
async def open_ws(
    env: Env, token: str | None, vsn: str | None = "2.0.0", **options: Any
) -> AsyncIterator[ClientConnection]:
    options.setdefault("ping_interval", None)
    async with websockets.trio.client.connect(
        env.url(token, vsn),
        compression=None,
        open_timeout=STEP_TIMEOUT,
        close_timeout=STEP_TIMEOUT,
        **options,
    ) as ws:
        yield ws


class Phx:
    """A minimal Phoenix Channels client over a websockets connection."""

    def __init__(self, ws: ClientConnection, vsn: str | None = "2.0.0") -> None:
        self.ws = ws
        self.v2 = vsn == "2.0.0"
        self.next_ref = 0
        # Messages read while waiting for something else, oldest first.
        self.inbox: list[dict[str, Any]] = []

    async def push(
        self, topic: str, event: str, payload: Any, join_ref: str | None = None
    ) -> str:
        self.next_ref += 1
        ref = str(self.next_ref)
        if self.v2:
            frame: Any = [join_ref, ref, topic, event, payload]
        else:
            frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
            if join_ref is not None:
                frame["join_ref"] = join_ref
        await self.ws.send(json.dumps(frame))
        return ref

    async def receive(self) -> dict[str, Any]:
        with trio.fail_after(STEP_TIMEOUT):
            raw = json.loads(await self.ws.recv())
        if self.v2:
            join_ref, ref, topic, event, payload = raw
            return {
                "join_ref": join_ref,
                "ref": ref,
                "topic": topic,
                "event": event,
                "payload": payload,
            }
        return raw

    async def next(self, event: str, topic: str | None = None) -> dict[str, Any]:
        """Return the first message with `event` (on `topic`), keeping others."""
        for index, message in enumerate(self.inbox):
            if message["event"] == event and topic in (None, message["topic"]):
                return self.inbox.pop(index)
        while True:
            message = await self.receive()
            if message["event"] == event and topic in (None, message["topic"]):
                return message
            self.inbox.append(message)

    async def reply(self, ref: str) -> dict[str, Any]:
        """Return the payload of the `phx_reply` to `ref`, keeping other messages."""
        for index, message in enumerate(self.inbox):
            if message["event"] == "phx_reply" and message["ref"] == ref:
                return self.inbox.pop(index)["payload"]
        while True:
            message = await self.receive()
            if message["event"] == "phx_reply" and message["ref"] == ref:
                return message["payload"]
            self.inbox.append(message)

    async def join(
        self, topic: str, payload: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Join `topic` and return the join_ref and the reply payload."""
        join_ref = str(self.next_ref + 1)
        ref = await self.push(topic, "phx_join", payload or {}, join_ref=join_ref)
        return join_ref, await self.reply(ref)

    async def call(
        self, topic: str, event: str, payload: Any, join_ref: str | None = None
    ) -> dict[str, Any]:
        ref = await self.push(topic, event, payload, join_ref=join_ref)
        return await self.reply(ref)


async def expect_close(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes and return the close code and reason."""

    async def read_forever() -> None:
        while True:
            await ws.recv()

    with trio.fail_after(STEP_TIMEOUT), pytest.raises(ConnectionClosed) as info:
        await read_forever()
    received = info.value.rcvd
    assert received is not None, "the server closed TCP without a Close frame"
    return received.code, received.reason


async def eventually(
    predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT
) -> None:
    """Wait until `predicate()` is true, checking every 10 ms, or fail."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"condition still false after {timeout} s")


async def expect_rejected(env: Env, url: str, **options: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.trio.client.connect(
            url, compression=None, open_timeout=STEP_TIMEOUT, **options
        ):
            pass
    return info.value


# Handshake


INVALID_TOKEN_BODY = {
    "error": {
        "code": "invalid_token",
        "message": "missing, invalid, expired or revoked access token",
    }
}


async def test_missing_token_is_403_invalid_token() -> None:
    async with open_env() as env:
        rejected = await expect_rejected(env, env.url(None))
        assert rejected.response.status_code == 403
        assert rejected.response.body is not None
        assert json.loads(rejected.response.body) == INVALID_TOKEN_BODY


async def test_invalid_token_is_403() -> None:
    async with open_env() as env:
        rejected = await expect_rejected(env, env.url("not-a-valid-token"))
        assert rejected.response.status_code == 403
        assert rejected.response.body is not None
        assert json.loads(rejected.response.body) == INVALID_TOKEN_BODY


async def test_refresh_token_is_403() -> None:
    async with open_env() as env:
        user_id, _ = await env.user("alice")
        refresh, _ = env.services.tokens.issue_refresh(user_id, "family")
        rejected = await expect_rejected(env, env.url(refresh))
        assert rejected.response.status_code == 403


async def test_expired_token_is_403() -> None:
    async with open_env() as env:
        user_id, _ = await env.user("alice")
        past = TokenService(env.settings, clock=lambda: time.time() - 86400)
        expired, _ = past.issue_access(user_id)
        rejected = await expect_rejected(env, env.url(expired))
        assert rejected.response.status_code == 403


async def test_revoked_token_is_403() -> None:
    async with open_env() as env:
        user_id, _ = await env.user("alice")
        token, claims = env.services.tokens.issue_access(user_id)
        await env.db.call("revoke_token", jti=claims["jti"], expires_at=claims["exp"])
        rejected = await expect_rejected(env, env.url(token))
        assert rejected.response.status_code == 403


async def test_unknown_vsn_is_400() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        rejected = await expect_rejected(env, env.url(token, vsn="3.0.0"))
        assert rejected.response.status_code == 400
        assert b"unsupported vsn" in rejected.response.body


async def test_max_connections_is_503() -> None:
    async with open_env(server__max_connections=1) as env:
        _, token = await env.user("alice")
        async with open_ws(env, token):
            rejected = await expect_rejected(env, env.url(token))
            assert rejected.response.status_code == 503
        # The slot is released once the first connection ended.
        await eventually(lambda: env.hub.connection_count == 0)
        async with open_ws(env, token) as ws:
            assert await Phx(ws).call("phoenix", "heartbeat", {}) == {
                "status": "ok",
                "response": {},
            }


async def test_token_in_subprotocol_selects_phoenix() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        # phoenix.js 1.8 sends its authToken this way: btoa(token) without "=".
        import base64

        encoded = base64.b64encode(token.encode()).decode().rstrip("=")
        async with open_ws(
            env,
            None,
            subprotocols=["phoenix", f"base64url.bearer.phx.{encoded}"],
        ) as ws:
            assert ws.subprotocol == "phoenix"
            reply = await Phx(ws).call("phoenix", "heartbeat", {})
            assert reply["status"] == "ok"


# Phoenix messages


async def test_heartbeat_reply() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            ref = await phx.push("phoenix", "heartbeat", {})
            message = await phx.receive()
            assert message == {
                "join_ref": None,
                "ref": ref,
                "topic": "phoenix",
                "event": "phx_reply",
                "payload": {"status": "ok", "response": {}},
            }


async def test_v1_client_without_vsn() -> None:
    async with open_env() as env:
        user_id, token = await env.user("alice")
        await env.channel("lobby", user_id)
        async with open_ws(env, token, vsn=None) as ws:
            phx = Phx(ws, vsn=None)
            reply = await phx.call("phoenix", "heartbeat", {})
            assert reply == {"status": "ok", "response": {}}
            ref = await phx.push("channel:lobby", "phx_join", {})
            reply = await phx.reply(ref)
            assert reply["status"] == "ok"
            state = await phx.next("presence_state")
            # Without a join_ref, the join's ref identifies the join.
            assert state["join_ref"] == ref


async def test_join_errors() -> None:
    async with open_env() as env:
        owner_id, _ = await env.user("owner")
        _, token = await env.user("alice")
        await env.channel("secret", owner_id, private=True)
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            cases = {
                "channel:nope": "not_found",
                "channel:": "invalid_topic",
                "channel:bad name!": "invalid_topic",
                "channel:" + "x" * 65: "invalid_topic",
                "channel:secret": "unauthorized",
                "room:lobby": "unmatched topic",
                "lobby": "unmatched topic",
            }
            for topic, reason in cases.items():
                _, reply = await phx.join(topic)
                assert reply == {"status": "error", "response": {"reason": reason}}, (
                    topic
                )
            _, reply = await phx.join("channel:secret", {"last_seen_id": "7"})
            assert reply["response"] == {"reason": "invalid_last_seen_id"}
            _, reply = await phx.join("channel:secret", {"last_seen_seq": -1})
            assert reply["response"] == {"reason": "invalid_last_seen_seq"}
            both = {"last_seen_id": 1, "last_seen_seq": 1}
            _, reply = await phx.join("channel:secret", both)
            assert reply["response"] == {"reason": "invalid_last_seen"}


async def test_join_last_seen_out_of_range() -> None:
    """A last seen id or seq beyond SQLite's integers is an error reply, not 1011."""
    async with open_env() as env:
        owner_id, token = await env.user("alice")
        await env.channel("lobby", owner_id)
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            for value in (10**40, 2**63, -(2**63) - 1):
                for kind in ("id", "seq"):
                    payload = {f"last_seen_{kind}": value}
                    _, reply = await phx.join("channel:lobby", payload)
                    expected = {"reason": f"invalid_last_seen_{kind}"}
                    assert reply["status"] == "error", payload
                    assert reply["response"] == expected, payload

            # The connection is still open, and the largest id is accepted.
            _, reply = await phx.join("channel:lobby", {"last_seen_id": 2**63 - 1})
            assert reply["status"] == "ok"
            assert reply["response"]["recovered"] is True


async def test_private_channel_member_joins() -> None:
    async with open_env() as env:
        owner_id, token = await env.user("owner")
        await env.channel("secret", owner_id, private=True)
        async with open_ws(env, token) as ws:
            _, reply = await Phx(ws).join("channel:secret")
            assert reply["status"] == "ok"


async def test_max_joins_per_connection() -> None:
    async with open_env(websocket__max_joins=2) as env:
        user_id, token = await env.user("alice")
        for name in ("a", "b", "c"):
            await env.channel(name, user_id)
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            assert (await phx.join("channel:a"))[1]["status"] == "ok"
            assert (await phx.join("channel:b"))[1]["status"] == "ok"
            _, reply = await phx.join("channel:c")
            assert reply == {
                "status": "error",
                "response": {"reason": "too_many_joins"},
            }
            # Joining a topic again replaces the old join instead of adding one.
            _, reply = await phx.join("channel:b")
            assert reply["status"] == "ok"


async def test_join_push_broadcast_and_presence_order() -> None:
    async with open_env() as env:
        alice_id, alice_token = await env.user("alice")
        _, bob_token = await env.user("bob")
        await env.channel("lobby", alice_id)
        async with (
            open_ws(env, alice_token) as alice_ws,
            open_ws(env, bob_token) as bob_ws,
        ):
            alice, bob = Phx(alice_ws), Phx(bob_ws)
            alice_join, _ = await alice.join("channel:lobby")
            await alice.next("presence_diff")

            join_ref = str(bob.next_ref + 1)
            ref = await bob.push("channel:lobby", "phx_join", {}, join_ref=join_ref)
            first, second, third = [await bob.receive() for _ in range(3)]
            assert first["event"] == "phx_reply"
            assert first["ref"] == ref
            assert first["payload"]["status"] == "ok"
            assert second["event"] == "presence_state"
            assert second["join_ref"] == join_ref
            assert list(second["payload"]) == [str(alice_id)]
            assert third["event"] == "presence_diff"
            assert third["join_ref"] is None

            diff = await alice.next("presence_diff")
            (joined,) = diff["payload"]["joins"].values()
            assert joined["metas"][0]["username"] == "bob"

            reply = await alice.call(
                "channel:lobby", "new_msg", {"body": "hello"}, join_ref=alice_join
            )
            assert reply["status"] == "ok"
            message_id = reply["response"]["id"]
            broadcast = await bob.next("new_msg")
            assert broadcast["join_ref"] is None
            assert broadcast["ref"] is None
            assert broadcast["payload"]["id"] == message_id
            assert broadcast["payload"]["body"] == "hello"
            assert broadcast["payload"]["user_id"] == alice_id
            assert broadcast["payload"]["username"] == "alice"
            assert broadcast["payload"]["channel"] == "lobby"
            assert "channel_id" not in broadcast["payload"]


async def test_push_errors() -> None:
    async with open_env(websocket__max_body_bytes=8) as env:
        user_id, token = await env.user("alice")
        await env.channel("lobby", user_id)
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            reply = await phx.call("channel:lobby", "new_msg", {"body": "x"})
            assert reply == {
                "status": "error",
                "response": {"reason": "unmatched topic"},
            }
            reply = await phx.call("channel:lobby", "phx_leave", {})
            assert reply == {
                "status": "error",
                "response": {"reason": "unmatched topic"},
            }

            join_ref, _ = await phx.join("channel:lobby")
            for body in ("", None, 5, "123456789"):
                reply = await phx.call(
                    "channel:lobby", "new_msg", {"body": body}, join_ref=join_ref
                )
                assert reply["status"] == "error", body
                assert reply["response"]["reason"] == "invalid_body", body
            reply = await phx.call("channel:lobby", "typing", {}, join_ref=join_ref)
            assert reply["response"] == {"reason": "unknown_event"}
            # A push naming an earlier join of the topic is not routed.
            reply = await phx.call(
                "channel:lobby", "new_msg", {"body": "ok"}, join_ref="x"
            )
            assert reply["response"] == {"reason": "unmatched topic"}
            reply = await phx.call("phoenix", "other", {})
            assert reply["response"] == {"reason": "unmatched topic"}


async def test_leave_replies_and_closes() -> None:
    async with open_env() as env:
        alice_id, alice_token = await env.user("alice")
        _, bob_token = await env.user("bob")
        await env.channel("lobby", alice_id)
        async with (
            open_ws(env, alice_token) as alice_ws,
            open_ws(env, bob_token) as bob_ws,
        ):
            alice, bob = Phx(alice_ws), Phx(bob_ws)
            await alice.join("channel:lobby")
            bob_join, _ = await bob.join("channel:lobby")
            await alice.next("presence_diff")
            await alice.next("presence_diff")

            reply = await bob.call("channel:lobby", "phx_leave", {}, join_ref=bob_join)
            assert reply == {"status": "ok", "response": {}}
            closed = await bob.next("phx_close")
            assert closed["join_ref"] == bob_join

            diff = await alice.next("presence_diff")
            assert diff["payload"]["joins"] == {}
            assert list(diff["payload"]["leaves"]) != []
            assert env.hub.subscriber_count("channel:lobby") == 1


async def test_second_join_closes_first() -> None:
    async with open_env() as env:
        user_id, token = await env.user("alice")
        await env.channel("lobby", user_id)
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            first_join, _ = await phx.join("channel:lobby")
            await phx.next("presence_state")
            second_join, reply = await phx.join("channel:lobby")
            assert reply["status"] == "ok"
            closed = await phx.next("phx_close")
            assert closed["join_ref"] == first_join
            state = await phx.next("presence_state")
            assert state["join_ref"] == second_join
            # Only the second join's meta remains.
            metas = env.hub.presence_state("channel:lobby")[str(user_id)]["metas"]
            assert len(metas) == 1


# Replay


async def test_join_replays_missed_messages() -> None:
    async with open_env() as env:
        user_id, token = await env.user("alice")
        channel_id = await env.channel("lobby", user_id)
        ids = [await env.publish(channel_id, user_id, f"m{n}") for n in range(4)]
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            join_ref, reply = await phx.join("channel:lobby", {"last_seen_id": ids[0]})
            assert reply["status"] == "ok"
            assert reply["response"]["recovered"] is True
            replayed = [await phx.next("new_msg") for _ in range(3)]
            assert [m["payload"]["id"] for m in replayed] == ids[1:]
            assert [m["payload"]["body"] for m in replayed] == ["m1", "m2", "m3"]
            assert all(m["join_ref"] == join_ref for m in replayed)
            assert replayed[0]["payload"]["channel"] == "lobby"

            live_id = await env.publish(channel_id, user_id, "live")
            live = await phx.next("new_msg")
            assert live["payload"]["id"] == live_id


async def test_replay_limit_reports_not_recovered() -> None:
    async with open_env(websocket__replay_limit=2) as env:
        user_id, token = await env.user("alice")
        channel_id = await env.channel("lobby", user_id)
        ids = [await env.publish(channel_id, user_id, f"m{n}") for n in range(5)]
        async with open_ws(env, token) as ws:
            phx = Phx(ws)
            _, reply = await phx.join("channel:lobby", {"last_seen_id": ids[0]})
            assert reply["response"] == {
                "channel_id": channel_id,
                "recovered": False,
                "reason": "replay_limit",
                "replayed_from": ids[3],
                "earliest_available": ids[0],
            }
            # The newest messages are replayed, so the replay joins up with
            # the live messages; ids[1] and ids[2] are left to the history API.
            replayed = [await phx.next("new_msg") for _ in range(2)]
            assert [m["payload"]["id"] for m in replayed] == ids[3:]
            live_id = await env.publish(channel_id, user_id, "live")
            live = await phx.next("new_msg")
            assert live["payload"]["id"] == live_id


async def test_replay_during_publishing_has_no_gap_or_duplicate() -> None:
    async with open_env() as env:
        user_id, token = await env.user("alice")
        channel_id = await env.channel("lobby", user_id)
        first = await env.publish(channel_id, user_id, "before")
        published: list[int] = []
        started = trio.Event()
        done = trio.Event()

        async def publisher() -> None:
            for n in range(150):
                published.append(await env.publish(channel_id, user_id, f"p{n}"))
                if n == 20:
                    started.set()
            done.set()

        async with open_ws(env, token) as ws, trio.open_nursery() as nursery:
            phx = Phx(ws)
            nursery.start_soon(publisher)
            # Let some messages be stored before the join and some after it.
            await started.wait()
            _, reply = await phx.join("channel:lobby", {"last_seen_id": first})
            assert reply["response"]["recovered"] is True
            await done.wait()

            received: list[int] = []
            with trio.fail_after(STEP_TIMEOUT * 2):
                while not received or received[-1] != published[-1]:
                    received.append((await phx.next("new_msg"))["payload"]["id"])
            assert received == published


# Frames and close codes


async def test_ping_is_answered() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        async with open_ws(env, token) as ws:
            pong = await ws.ping(b"abc")
            with trio.fail_after(STEP_TIMEOUT):
                await pong.wait()


async def test_client_close_is_echoed_and_counted() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        # Application codes (3000-4999) share the "other" label.
        closed_before = metric("deeperhub_ws_connections_closed_total", code="other")
        async with open_ws(env, token) as ws:
            await ws.aclose(4000, "bye")
            assert ws.close_code == 4000
        await eventually(lambda: env.hub.connection_count == 0)
        assert (
            metric("deeperhub_ws_connections_closed_total", code="other")
            == closed_before + 1
        )


async def test_malformed_phoenix_message_closes_1008() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        errors_before = metric("deeperhub_ws_protocol_errors_total", code="1008")
        async with open_ws(env, token) as ws:
            await ws.send('{"not": "an array"}')
            code, reason = await expect_close(ws)
            assert code == 1008
            assert "expected a JSON array" in reason
        assert (
            metric("deeperhub_ws_protocol_errors_total", code="1008")
            == errors_before + 1
        )


async def test_binary_message_closes_1003() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        async with open_ws(env, token) as ws:
            await ws.send(b"\x00\x01")
            code, _ = await expect_close(ws)
            assert code == 1003


async def test_heartbeat_timeout_closes_1001() -> None:
    async with open_env(websocket__heartbeat_timeout=0.3) as env:
        _, token = await env.user("alice")
        async with open_ws(env, token) as ws:
            code, reason = await expect_close(ws)
            assert code == 1001
            assert reason == "heartbeat timeout"


async def test_close_all_sends_1012() -> None:
    async with open_env() as env:
        user_id, token = await env.user("alice")
        await env.channel("lobby", user_id)
        async with open_ws(env, token) as first, open_ws(env, token) as second:
            await Phx(first).join("channel:lobby")
            with trio.fail_after(STEP_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(env.hub.close_all, 1012)
                    assert await expect_close(first) == (1012, "server restart")
                    assert await expect_close(second) == (1012, "server restart")
            assert env.hub.connection_count == 0
            rejected = await expect_rejected(env, env.url(token))
            assert rejected.response.status_code == 503


def raw_upgrade_request(env: Env, token: str) -> bytes:
    return (
        f"GET /socket/websocket?token={token}&vsn=2.0.0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{env.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_raw(
    env: Env, token: str, *, receive_buffer: int | None = None
) -> trio.SocketStream:
    """Connect a raw socket, complete the upgrade and return the stream."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", env.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(raw_upgrade_request(env, token))
    response = b""
    with trio.fail_after(STEP_TIMEOUT):
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(1)
    assert response.startswith(b"HTTP/1.1 101 ")
    return stream


async def test_unmasked_frame_closes_1002() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        errors_before = metric("deeperhub_ws_protocol_errors_total", code="1002")
        stream = await open_raw(env, token)
        # A text frame without the mask bit, which clients must always set.
        await stream.send_all(b"\x81\x02hi")
        data = b""
        with trio.fail_after(STEP_TIMEOUT):
            while chunk := await stream.receive_some(4096):
                data += chunk
        assert data[0] == 0x88
        (code,) = struct.unpack_from("!H", data, 2)
        assert code == 1002
        assert (
            metric("deeperhub_ws_protocol_errors_total", code="1002")
            == errors_before + 1
        )
        await stream.aclose()


async def test_slow_consumer_closed_others_still_receive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The slow client never reads, so its Close frame cannot be delivered and
    # the server drops TCP after CLOSE_TIMEOUT.
    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT", 0.5)
    # Small kernel buffers on both ends, so that a client that does not read
    # backs up into the server's send buffer quickly.
    async with open_env(
        socket_send_buffer=16384, websocket__send_queue_bytes=65536
    ) as env:
        user_id, token = await env.user("alice")
        await env.channel("lobby", user_id)
        drops_before = metric("deeperhub_send_queue_drops_total")

        slow = await open_raw(env, token, receive_buffer=4096)
        join = json.dumps(["1", "1", "channel:lobby", "phx_join", {}]).encode()
        await slow.send_all(bytes([0x81, 0x80 | len(join)]) + b"\0\0\0\0" + join)

        async with open_ws(env, token) as ws, trio.open_nursery() as nursery:
            fast = Phx(ws)
            await fast.join("channel:lobby")
            await eventually(lambda: env.hub.subscriber_count("channel:lobby") == 2)
            sent = list(range(1000, 1300))
            received: list[int] = []

            async def read_fast() -> None:
                while len(received) < len(sent):
                    received.append((await fast.next("new_msg"))["payload"]["id"])

            nursery.start_soon(read_fast)
            for n, message_id in enumerate(sent):
                message = {
                    "id": message_id,
                    "seq": n + 1,
                    "channel": "lobby",
                    "user_id": user_id,
                    "username": "alice",
                    "body": "b" * 8000,
                    "inserted_at": "2026-12-04T15:40:00.000000Z",
                }
                env.hub.broadcast_message("channel:lobby", message)
                await trio.sleep(0.001)

            await eventually(lambda: len(received) == len(sent), STEP_TIMEOUT * 2)
            assert received == sent
        assert metric("deeperhub_send_queue_drops_total") == drops_before + 1
        await eventually(lambda: env.hub.connection_count == 0)
        # The slow client finds the end of the stream after what was buffered.
        with trio.fail_after(STEP_TIMEOUT):
            while await slow.receive_some(65536):
                pass
        await slow.aclose()


async def test_close_before_attach_is_sent() -> None:
    async with open_env() as env:
        _, token = await env.user("alice")
        # As when close_all starts while this upgrade is in progress: the
        # connection is closed as soon as it is registered.
        env.hub._shutdown_close = (1012, "server restart")
        async with open_ws(env, token) as ws:
            assert await expect_close(ws) == (1012, "server restart")
