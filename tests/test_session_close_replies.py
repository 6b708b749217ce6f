"""Replies to pushes in flight when the server closes a WebSocket connection.

The DB writer runs in this process (see `test_websocket_loop.py`). The test
holds back the pipeline's results of `insert_message`, so the pushes are
stored but not yet acknowledged when the server decides to close. The server
must then send their replies before its Close frame, store nothing that it
reads after the decision, and stop waiting after `REPLY_WAIT_TIMEOUT` seconds.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
from websockets.exceptions import ConnectionClosed

from deeperhub.storage.reads import messages_after
from deeperhub.ws.frames import CloseCode
from workers.acceptor import session as session_module
from workers.acceptor.connection import Connection
from workers.acceptor.token_watch import TokenWatch

from .test_websocket_loop import STEP_TIMEOUT, Env, Phx, eventually, open_env, open_ws

if TYPE_CHECKING:
    from collections.abc import Callable

    import pytest
    from websockets.trio.client import ClientConnection

    from workers.acceptor.pushes import PushResult

TOPIC = "channel:acks"
PUSHES = 5


class HeldResults:
    """Holds the push pipeline's results back until `release`."""

    def __init__(self, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
        self.env = env
        self.held_results: list[tuple[Callable[[PushResult], None], PushResult]] = []
        self.holding = True
        pipeline = env.services.pushes
        assert pipeline is not None
        submit = pipeline.submit

        def held_submit(
            op: str, args: dict[str, Any], callback: Callable[[PushResult], None]
        ) -> None:
            def deliver(result: PushResult) -> None:
                if self.holding:
                    self.held_results.append((callback, result))
                else:
                    callback(result)

            submit(op, args, deliver)

        monkeypatch.setattr(pipeline, "submit", held_submit)

    def release(self) -> None:
        self.holding = False
        pending, self.held_results = self.held_results, []
        for callback, result in pending:
            callback(result)
        self.env.hub.flush()


async def stored_bodies(env: Env, channel_id: int) -> list[str]:
    messages = await env.services.reads.run(messages_after, channel_id, 0, 500)
    return [message["body"] for message in messages]


async def read_until_close(
    ws: ClientConnection,
) -> tuple[list[dict[str, Any]], int | None, str]:
    """Return the push replies in order, then the close code and reason."""
    replies: list[dict[str, Any]] = []
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            try:
                raw = await ws.recv()
            except ConnectionClosed as exc:
                received = exc.rcvd
                if received is None:
                    return replies, None, ""
                return replies, received.code, received.reason
            frame = json.loads(raw)
            if frame[3] == "phx_reply":
                replies.append(frame[4])


async def push_held(
    env: Env, ws: ClientConnection, results: HeldResults
) -> tuple[int, Phx, str]:
    """Join, push PUSHES messages and wait until all are stored but unanswered.

    Returns the channel id, the client and its join_ref.
    """
    user_id = env.names["alice"]
    channel_id = await env.channel("acks", user_id)
    client = Phx(ws)
    join_ref, reply = await client.join(TOPIC)
    assert reply["status"] == "ok"
    for number in range(PUSHES):
        await client.push(TOPIC, "new_msg", {"body": f"m{number}"}, join_ref=join_ref)
    await eventually(lambda: len(results.held_results) == PUSHES)
    assert len(await stored_bodies(env, channel_id)) == PUSHES
    return channel_id, client, join_ref


def only_connection(env: Env) -> Connection:
    (connection,) = env.hub.connections()
    return connection


async def alice(env: Env) -> str:
    user_id, token = await env.user("alice")
    env.names["alice"] = user_id
    return token


async def test_revoked_token_close_sends_held_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_env() as env:
        token = await alice(env)
        results = HeldResults(env, monkeypatch)
        async with open_ws(env, token) as ws:
            channel_id, client, join_ref = await push_held(env, ws, results)
            connection = only_connection(env)

            # What token_watch does on a revocation: leave, drop the buffer, close.
            TokenWatch(env.settings, env.hub).end(connection, "token revoked")
            assert connection.is_awaiting_replies
            # Read after the close decision, so it must not be stored.
            await client.push(TOPIC, "new_msg", {"body": "late"}, join_ref=join_ref)
            await trio.sleep(0.2)
            results.release()
            replies, code, reason = await read_until_close(ws)

        assert [reply["status"] for reply in replies] == ["ok"] * PUSHES
        assert code == CloseCode.POLICY_VIOLATION
        assert reason == "token revoked"
        bodies = await stored_bodies(env, channel_id)
        assert bodies == [f"m{number}" for number in range(PUSHES)]


async def test_close_all_waits_for_held_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_env() as env:
        token = await alice(env)
        results = HeldResults(env, monkeypatch)
        async with open_ws(env, token) as ws:
            await push_held(env, ws, results)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.hub.close_all, CloseCode.SERVICE_RESTART)
                await eventually(lambda: only_connection(env).is_awaiting_replies)
                await trio.sleep(0.2)
                results.release()
                replies, code, reason = await read_until_close(ws)
        assert [reply["status"] for reply in replies] == ["ok"] * PUSHES
        assert code == CloseCode.SERVICE_RESTART
        assert reason == "server restart"


async def test_reply_wait_timeout_closes_without_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "REPLY_WAIT_TIMEOUT", 0.3)
    async with open_env() as env:
        token = await alice(env)
        results = HeldResults(env, monkeypatch)
        async with open_ws(env, token) as ws:
            await push_held(env, ws, results)
            connection = only_connection(env)
            started = trio.current_time()
            connection.close(CloseCode.POLICY_VIOLATION, "test close")
            replies, code, _ = await read_until_close(ws)
            waited = trio.current_time() - started
            # Results that come after the Close frame are dropped.
            results.release()
        assert replies == []
        assert code == CloseCode.POLICY_VIOLATION
        assert 0.3 <= waited < STEP_TIMEOUT


async def test_close_ignores_pushes_read_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_env() as env:
        token = await alice(env)
        results = HeldResults(env, monkeypatch)
        async with open_ws(env, token) as ws:
            user_id = env.names["alice"]
            channel_id = await env.channel("acks", user_id)
            client = Phx(ws)
            join_ref, reply = await client.join(TOPIC)
            assert reply["status"] == "ok"
            connection = only_connection(env)

            # One push in flight, then a close as the security gate does it on
            # a flood, then a push that is read after the close decision.
            await client.push(TOPIC, "new_msg", {"body": "before"}, join_ref=join_ref)
            await eventually(lambda: len(results.held_results) == 1)
            connection.close(CloseCode.POLICY_VIOLATION, "rate_limited")
            await client.push(TOPIC, "new_msg", {"body": "after"}, join_ref=join_ref)
            await trio.sleep(0.2)
            results.release()
            replies, code, _ = await read_until_close(ws)
        assert code == CloseCode.POLICY_VIOLATION
        assert [reply["status"] for reply in replies] == ["ok"]
        assert await stored_bodies(env, channel_id) == ["before"]


def test_discarding_close_keeps_push_replies() -> None:
    connection = Connection(
        connection_id=1,
        user_id=1,
        username="alice",
        vsn="2.0.0",
        send_queue_bytes=1000,
    )
    connection.pushes_in_flight = 2
    assert connection.send(b"broadcast" * 10)
    assert connection.send_reply(b"first reply")

    # A slow-consumer or token close drops the broadcast, not the reply.
    connection.close(CloseCode.POLICY_VIOLATION, "token expired", discard=True)
    assert connection.is_awaiting_replies
    assert connection.buffered_bytes == len(b"first reply")
    assert not connection.send(b"broadcast")
    assert connection.send_reply(b"second reply")

    connection.pushes_in_flight = 0
    connection.finish_close()
    assert not connection.is_awaiting_replies
    assert connection.close_code == CloseCode.POLICY_VIOLATION
    close_frame_size = 2 + 2 + len("token expired")
    expected = len(b"first reply") + len(b"second reply") + close_frame_size
    assert connection.buffered_bytes == expected
    assert not connection.send_reply(b"too late")
