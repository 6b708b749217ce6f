"""The operator's view of a running daemon, for `bin/deeperhub remote`.

Every helper sends one request over the supervisor's control socket, which
only the daemon's user can open (mode 0600); requests meant for a worker are
forwarded by the supervisor (`worker_call`). Channels are read from the
database through a read-only connection.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio

from .ipc import RemoteError, open_rpc_client

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["HELP", "HelpText", "RemoteSession"]

# Seconds one remote request may take.
REQUEST_TIMEOUT = 10.0

HELP = """\
Helpers (each returns plain data):
  status()                 supervisor and worker tree
  workers()                worker id -> state, pid, restarts
  connections()            open WebSockets on every acceptor
  presence("channel:NAME") who is online on a topic, merged over acceptors
  channels()               stored channels
  disconnect(USER_ID)      close every WebSocket of a user (code 1008)
  block_ip(IP, seconds)    block an address through the security monitor
  unblock_ip(IP)           lift a block
  call(WORKER, OP, **ARGS) send any request to a worker
"""


class HelpText(str):
    """Text shown as is by the console and by `remote eval`, not quoted."""

    __slots__ = ()

    def __repr__(self) -> str:
        # The console displays a result with repr(), so this prints the lines.
        return str(self).rstrip("\n")


class RemoteSession:
    """Synchronous helpers that talk to the running daemon."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _request(self, op: str, /, **args: Any) -> Any:
        async def send() -> Any:
            with trio.fail_after(REQUEST_TIMEOUT):
                path = self.settings.socket_path("supervisor")
                async with open_rpc_client(path) as client:
                    return await client.call(op, **args)

        return trio.run(send)

    def status(self) -> dict[str, Any]:
        return dict(self._request("status"))

    def workers(self) -> dict[str, Any]:
        return {
            worker_id: {k: worker[k] for k in ("state", "pid", "restarts")}
            for worker_id, worker in self.status()["workers"].items()
        }

    def call(self, worker: str, op: str, **args: Any) -> Any:
        return self._request("worker_call", worker=worker, op=op, args=args)

    def _acceptors(self) -> list[str]:
        return sorted(w for w in self.status()["workers"] if w.startswith("acceptor"))

    def connections(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for acceptor in self._acceptors():
            for connection in self.call(acceptor, "connections"):
                found.append({"acceptor": acceptor, **connection})
        return found

    def presence(self, topic: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for acceptor in self._acceptors():
            for user_id, entry in self.call(acceptor, "presence", topic=topic).items():
                metas = merged.setdefault(user_id, {"metas": []})["metas"]
                for meta in entry["metas"]:
                    if meta not in metas:
                        metas.append(meta)
        return merged

    def disconnect(self, user_id: int) -> int:
        return sum(
            int(self.call(acceptor, "disconnect_user", user_id=user_id)["closed"])
            for acceptor in self._acceptors()
        )

    def block_ip(self, ip: str, seconds: float = 3600) -> Any:
        return self.call("security_monitor", "block", ip=ip, seconds=seconds)

    def unblock_ip(self, ip: str) -> Any:
        return self.call("security_monitor", "unblock", ip=ip)

    def channels(self) -> list[dict[str, Any]]:
        from .storage.database import open_read_connection

        connection = open_read_connection(self.settings.db_path)
        try:
            rows = connection.execute(
                "SELECT id, name, owner_id, private, inserted_at"
                " FROM channels ORDER BY id"
            ).fetchall()
        finally:
            connection.close()
        return [
            {
                "id": row[0],
                "name": row[1],
                "owner_id": row[2],
                "private": bool(row[3]),
                "inserted_at": row[4],
            }
            for row in rows
        ]

    def help(self) -> HelpText:
        """Return the list of helpers, shown in place of Python's interactive help."""
        return HelpText(HELP)

    def namespace(self) -> dict[str, Any]:
        """Return the names offered in the console and to `remote eval`."""
        return {
            "help": self.help,
            "status": self.status,
            "workers": self.workers,
            "connections": self.connections,
            "presence": self.presence,
            "channels": self.channels,
            "disconnect": self.disconnect,
            "block_ip": self.block_ip,
            "unblock_ip": self.unblock_ip,
            "call": self.call,
            "settings": self.settings,
            "RemoteError": RemoteError,
        }


def format_result(value: Any) -> str:
    """Return `value` as indented JSON when it is JSON data, else its repr.

    HelpText is returned as plain text.
    """
    if isinstance(value, HelpText):
        return str(value).rstrip("\n")
    try:
        return json.dumps(value, indent=2, default=str)
    except (TypeError, ValueError):
        return repr(value)
