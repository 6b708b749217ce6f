"""Token lifetime of open WebSocket connections: expiry, renewal, revocation.

A connection runs under the access token it was opened with. `TokenWatch`
closes it with 1008 when that token expires (at `exp` plus `auth.leeway`,
the moment the token stops verifying) or is revoked. Before the expiry the
client can send a new access token of the same user on the `phoenix` topic
(event `access_token`), which moves the deadline.

Revocations come from the DB writer's bus as `revoked` events (see
`deeperhub/storage/token_writes.py`), so they reach every acceptor process. A
closing connection first leaves all its topics, which broadcasts the presence
leaves at once and stops deliveries to it, then closes with its buffered frames
discarded.

The watch also forwards security events to the security monitor
(`security.sock`) without blocking the caller: events wait in a bounded queue
and are dropped, with a log record, when the monitor is unreachable.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import apsw
import trio

from deeperhub.auth.tokens import ACCESS, TokenError
from deeperhub.errors import ProtocolError, StorageError
from deeperhub.ipc import open_unix_stream
from deeperhub.storage import reads
from deeperhub.ws.frames import CloseCode

if TYPE_CHECKING:
    from deeperhub.config import Settings

    from .hub import Connection, Hub
    from .services import Services

__all__ = [
    "ACCESS_TOKEN_EVENT",
    "EXPIRED_REASON",
    "REVOKED_REASON",
    "TokenWatch",
    "check_revocation",
    "renew_access_token",
]

log = logging.getLogger("deeperhub.acceptor.tokens")

# Event on the `phoenix` topic that carries a new access token.
ACCESS_TOKEN_EVENT = "access_token"
EXPIRED_REASON = "token expired"
REVOKED_REASON = "token revoked"
# Seconds a revocation event is remembered, so that a connection whose upgrade
# checked the database just before the revocation committed is still closed
# when it registers after the event arrived.
RECENT_REVOCATION_SECONDS = 60.0
SECURITY_QUEUE_SIZE = 1000
SECURITY_SEND_TIMEOUT = 2.0
SECURITY_RETRY_DELAY = 1.0


async def check_revocation(services: Services, claims: dict[str, Any]) -> str | None:
    """Return why the token with `claims` was revoked, or None.

    Raises StorageError, apsw.Error or trio.ClosedResourceError when the
    database cannot be read, for the caller to map to 503.
    """
    return await services.reads.run(
        reads.token_revocation,
        claims["jti"],
        claims.get("fam"),
        int(claims["sub"]),
        int(claims["iat"]),
    )


@dataclass(eq=False)
class _Watched:
    """The token a connection currently runs under."""

    connection: Connection
    jti: str
    family: str | None
    issued_at: int
    # trio clock time at which the token stops verifying.
    deadline: float
    generation: int


class TokenWatch:
    """Expiry deadlines and revocation matching for one acceptor's connections."""

    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.hub = hub
        self.leeway = int(settings["auth.leeway"])
        self.security_path = settings.socket_path("security")
        self._watched: dict[Connection, _Watched] = {}
        self._by_jti: dict[str, set[Connection]] = {}
        self._by_family: dict[str, set[Connection]] = {}
        self._deadlines: list[tuple[float, int, _Watched]] = []
        self._generations = itertools.count(1)
        self._deadlines_changed = trio.Event()
        self._recent: deque[tuple[float, dict[str, Any]]] = deque()
        self._security_send, self._security_receive = trio.open_memory_channel[
            dict[str, Any]
        ](SECURITY_QUEUE_SIZE)
        self._dropped_security_events = 0

    @property
    def watched_count(self) -> int:
        return len(self._watched)

    # Registration

    def watch(self, connection: Connection, claims: dict[str, Any]) -> None:
        """Run `connection` under the access token with `claims`.

        The connection is closed at once if a revocation seen in the last
        `RECENT_REVOCATION_SECONDS` covers the token.
        """
        self._set_token(connection, claims)
        self._forget_old_revocations()
        for _, event in self._recent:
            if self._matches(self._watched[connection], event):
                self.end(connection, REVOKED_REASON)
                return

    def renew(self, connection: Connection, claims: dict[str, Any]) -> None:
        """Switch `connection` to a new access token of the same user."""
        self._set_token(connection, claims)

    def forget(self, connection: Connection) -> None:
        """Stop watching a connection that ended."""
        watched = self._watched.pop(connection, None)
        if watched is None:
            return
        _discard(self._by_jti, watched.jti, connection)
        if watched.family is not None:
            _discard(self._by_family, watched.family, connection)

    def _set_token(self, connection: Connection, claims: dict[str, Any]) -> None:
        self.forget(connection)
        remaining = int(claims["exp"]) + self.leeway - time.time()
        watched = _Watched(
            connection=connection,
            jti=str(claims["jti"]),
            family=claims.get("fam"),
            issued_at=int(claims["iat"]),
            deadline=trio.current_time() + remaining,
            generation=next(self._generations),
        )
        self._watched[connection] = watched
        self._by_jti.setdefault(watched.jti, set()).add(connection)
        if watched.family is not None:
            self._by_family.setdefault(watched.family, set()).add(connection)
        heapq.heappush(self._deadlines, (watched.deadline, watched.generation, watched))
        # Entries of forgotten tokens stay in the heap until their deadline, so
        # rebuild it when they outnumber the live ones.
        if len(self._deadlines) > 2 * len(self._watched) + 1024:
            self._deadlines = [
                (item.deadline, item.generation, item)
                for item in self._watched.values()
            ]
            heapq.heapify(self._deadlines)
        self._deadlines_changed.set()

    # Closing

    def end(self, connection: Connection, reason: str) -> None:
        """Leave every topic, then close with 1008 and drop the buffered frames."""
        self.forget(connection)
        if not connection.is_open:
            return
        for topic in list(connection.subscriptions):
            self.hub.unsubscribe(connection, topic)
        log.info("closing connection: %s", reason, extra=connection.extra)
        connection.close(CloseCode.POLICY_VIOLATION, reason, discard=True)

    def apply_revocation(self, event: dict[str, Any]) -> int:
        """Close the connections a bus `revoked` event covers; return how many."""
        self._recent.append((time.monotonic(), event))
        self._forget_old_revocations()

        matched: set[Connection] = set()
        for jti in _strings(event.get("jtis")):
            matched.update(self._by_jti.get(jti, ()))
        for family in _strings(event.get("families")):
            matched.update(self._by_family.get(family, ()))
        if isinstance(event.get("before"), int):
            matched.update(
                watched.connection
                for watched in self._watched.values()
                if self._matches_cutoff(watched, event)
            )
        for connection in matched:
            self.end(connection, REVOKED_REASON)
        if matched:
            log.info("closed %d connections after a token revocation", len(matched))
        return len(matched)

    def _matches(self, watched: _Watched, event: dict[str, Any]) -> bool:
        return (
            watched.jti in _strings(event.get("jtis"))
            or (
                watched.family is not None
                and watched.family in _strings(event.get("families"))
            )
            or self._matches_cutoff(watched, event)
        )

    @staticmethod
    def _matches_cutoff(watched: _Watched, event: dict[str, Any]) -> bool:
        before = event.get("before")
        if isinstance(before, bool) or not isinstance(before, int):
            return False
        user_id = event.get("user_id")
        if user_id is not None and user_id != watched.connection.user_id:
            return False
        return watched.issued_at < before

    def _forget_old_revocations(self) -> None:
        horizon = time.monotonic() - RECENT_REVOCATION_SECONDS
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    # Background tasks

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Close connections at their deadlines and send security events, forever."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_expired)
            nursery.start_soon(self._send_security_events)
            task_status.started()

    async def _close_expired(self) -> None:
        while True:
            deadline = self._deadlines[0][0] if self._deadlines else math.inf
            with trio.move_on_at(deadline):
                await self._deadlines_changed.wait()
            self._deadlines_changed = trio.Event()

            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, generation, watched = heapq.heappop(self._deadlines)
                current = self._watched.get(watched.connection)
                if current is not None and current.generation == generation:
                    self.end(watched.connection, EXPIRED_REASON)

    def notify_security(self, event: dict[str, Any]) -> None:
        """Queue a security event for the monitor; never blocks."""
        try:
            self._security_send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped_security_events += 1
            log.warning(
                "security event queue full (%d events); dropped %s event",
                SECURITY_QUEUE_SIZE,
                event.get("kind"),
            )

    async def _send_security_events(self) -> None:
        """Send queued events over one connection, reconnecting when it breaks."""
        stream = None
        async for event in self._security_receive:
            error: Exception | None = None
            for _attempt in range(2):
                try:
                    with trio.fail_after(SECURITY_SEND_TIMEOUT):
                        if stream is None:
                            stream = await open_unix_stream(self.security_path)
                        await stream.send(event)
                    break
                except (OSError, trio.TooSlowError, ProtocolError) as exc:
                    if stream is not None:
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
                        stream = None
                    error = exc
            else:
                log.warning(
                    "security monitor unreachable at %s, dropped %s event: %s",
                    self.security_path,
                    event.get("kind"),
                    error,
                )
                await trio.sleep(SECURITY_RETRY_DELAY)


async def renew_access_token(
    services: Services, connection: Connection, payload: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Handle `access_token` on the `phoenix` topic; return the reply status and body.

    The new token must be a valid, unrevoked access token of the connection's
    user. On error the connection keeps its current token and deadline.
    """
    watch = services.token_watch
    token = payload.get("token")
    if watch is None:
        return "error", {"reason": "unsupported"}
    if not isinstance(token, str) or not token:
        return "error", {"reason": "invalid_token", "message": "token is required"}
    try:
        claims = services.tokens.verify(token, ACCESS)
    except TokenError as exc:
        return "error", {"reason": "invalid_token", "message": exc.message}
    if claims["sub"] != str(connection.user_id):
        return "error", {
            "reason": "invalid_token",
            "message": "token belongs to another user",
        }
    try:
        revoked = await check_revocation(services, claims)
    except (apsw.Error, StorageError, trio.ClosedResourceError) as exc:
        log.warning("cannot check a renewed token: %s", exc, extra=connection.extra)
        return "error", {"reason": "unavailable"}
    if revoked is not None:
        return "error", {"reason": "invalid_token", "message": "token is revoked"}
    if not connection.is_open:
        return "error", {"reason": "closed"}
    watch.renew(connection, claims)
    return "ok", {"expires_at": int(claims["exp"])}


def _strings(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]


def _discard(index: dict[str, set[Connection]], key: str, item: Connection) -> None:
    members = index.get(key)
    if members is None:
        return
    members.discard(item)
    if not members:
        del index[key]
