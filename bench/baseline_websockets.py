"""Minimal Phoenix V2 broadcast server on the `websockets` library (asyncio).

The reference that `bench/fanout.py` and `bench/connections.py` compare
DeeperHub with: it speaks the same frames (`phx_join`, `new_msg`,
`heartbeat`) on `/socket/websocket`, but checks no token and stores
nothing. A push is acknowledged with an increasing id and broadcast with
`websockets.broadcast`, which encodes the frame once for all subscribers.

    .venv/bin/python bench/baseline_websockets.py --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["main"]

_ids = itertools.count(1)
_seqs: dict[str, itertools.count[int]] = {}
_topics: dict[str, set[ServerConnection]] = {}


def _dump(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


async def _handle(connection: ServerConnection) -> None:
    joined: set[str] = set()
    try:
        async for raw in connection:
            join_ref, ref, topic, event, payload = json.loads(raw)
            if event == "phx_join":
                _topics.setdefault(topic, set()).add(connection)
                joined.add(topic)
                reply = {"status": "ok", "response": {}}
                await connection.send(_dump([join_ref, ref, topic, "phx_reply", reply]))
            elif event == "new_msg":
                message_id = next(_ids)
                seq = next(_seqs.setdefault(topic, itertools.count(1)))
                message = {
                    "id": message_id,
                    "seq": seq,
                    "channel": topic.partition(":")[2],
                    "user_id": 1,
                    "username": "publisher",
                    "body": payload.get("body"),
                    "inserted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                }
                reply = {"status": "ok", "response": {"id": message_id}}
                await connection.send(_dump([join_ref, ref, topic, "phx_reply", reply]))
                frame = _dump([None, None, topic, "new_msg", message])
                broadcast(_topics.get(topic, ()), frame)
            else:
                reply = {"status": "ok", "response": {}}
                await connection.send(_dump([join_ref, ref, topic, "phx_reply", reply]))
    except ConnectionClosed:
        pass  # the load generator drops its sockets without a close handshake
    finally:
        for topic in joined:
            _topics.get(topic, set()).discard(connection)


async def _serve(host: str, port: int) -> None:
    async with serve(
        _handle,
        host,
        port,
        compression=None,
        ping_interval=None,
        max_size=2**21,
        max_queue=None,
    ):
        await asyncio.get_running_loop().create_future()


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(options.host, options.port))


if __name__ == "__main__":
    main()
