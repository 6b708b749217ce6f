"""WebSocket connections of the acceptor: the upgrade, then the Phoenix Channels loop.

The listener calls `handle_websocket` for `/socket/websocket`. These requests
are rejected with an HTTP error before the upgrade:

- 400 or 426: an invalid upgrade request or an unsupported `vsn`.
- 403 with the code `invalid_token`: a missing, invalid, expired or revoked
  access token. The message does not say which, so a client cannot probe tokens.
- 503: `server.max_connections` is reached over all acceptors (see
  `admission.py`), the server is shutting down, or the database cannot be read.
- 403, 429 or 400 from the security gate (`security_gate.py`): a blocked IP,
  the HTTP rate limit, a malicious payload.

Each error has a JSON body `{"error": {"code", "message"}}`.

The security gate also rate limits client messages (error reply
`{"reason": "rate_limited"}`, close 1008 after sustained flooding) and closes
the connections of an IP with 1008 when it gets blocked.

After the 101 response, `session.Session` runs the Phoenix Channels loop.

Close codes the server sends:

- 1001 (going away): no frame from the client for `websocket.heartbeat_timeout`
  seconds, or server shutdown (`Hub.close_all`).
- 1012 (service restart): server restart (`Hub.close_all`).
- 1008 (policy violation): slow consumer, a malformed Phoenix message, or
  an access token that expired or was revoked (`token_watch.py`).
- 1003 (unsupported data): a binary message, since only the JSON serializers
  are supported.
- 1002, 1007, 1009: protocol violations found by the frame parser.
- The client's own code, echoed, when the client closes first.

The server never closes with 1000. phoenix.js 1.7 (checked in 1.7.23,
`Socket.onConnClose`) does not reconnect after a close with code 1000. 1.8
(checked in 1.8.16) reconnects after any close it did not start itself, but
older clients are still deployed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import apsw
import trio

from deeperhub.errors import AuthError, ProtocolError, StorageError
from deeperhub.metrics import (
    WS_CONNECTIONS_ACTIVE,
    WS_CONNECTIONS_CLOSED,
    WS_CONNECTIONS_OPENED,
    WS_UPGRADES_REJECTED,
    close_code_label,
)
from deeperhub.phoenix.protocol import select_vsn
from deeperhub.storage import reads
from deeperhub.ws.handshake import (
    HandshakeError,
    accept_response,
    check_upgrade,
    error_response,
    extract_token,
)

from .hub import CLOSE_TIMEOUT
from .joins import CHANNEL_TOPIC_PREFIX
from .session import DB_CALL_TIMEOUT, Session
from .token_watch import check_revocation

if TYPE_CHECKING:
    from deeperhub.http_head import RequestHead

    from .connection import Connection
    from .services import Services

__all__ = ["CHANNEL_TOPIC_PREFIX", "DB_CALL_TIMEOUT", "handle_websocket"]

log = logging.getLogger("deeperhub.acceptor.ws")

REJECTION_LOG_INTERVAL = 10.0


class _LogThrottle:
    """Allows one log record per `interval` seconds and counts the ones skipped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next_at = -math.inf
        self._skipped = 0

    def allow(self) -> int | None:
        """Return how many records were skipped since the last one, or None to skip."""
        now = time.monotonic()
        if now < self._next_at:
            self._skipped += 1
            return None
        self._next_at = now + self.interval
        skipped, self._skipped = self._skipped, 0
        return skipped


# Rejected upgrades are logged at most once per interval, so that a client
# retrying in a loop cannot flood the log.
_rejection_log = _LogThrottle(REJECTION_LOG_INTERVAL)


def _log_rejection(status: int, reason: str, client_ip: str) -> None:
    skipped = _rejection_log.allow()
    if skipped is not None:
        log.info(
            "rejecting WebSocket upgrade with %d: %s (%d more rejections not logged)",
            status,
            reason,
            skipped,
            extra={"ip": client_ip},
        )


# The message of every 403 for a token, whatever the reason that is logged.
INVALID_TOKEN_MESSAGE = "missing, invalid, expired or revoked access token"


class _Rejected(Exception):
    """Rejection of an upgrade request with an HTTP error instead of 101.

    `reason` is logged. A 403 sends `INVALID_TOKEN_MESSAGE` instead of it.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def handle_websocket(
    services: Services, stream: trio.SocketStream, head: RequestHead, buffered: bytes
) -> None:
    """Serve one WebSocket request from the upgrade to the TCP close.

    `buffered` contains the bytes received after the request head. The stream is
    closed before this returns. The caller should hold no reference to `head`
    or `buffered`, so that they are freed once the upgrade is done.
    """
    client_ip = head.client[0]
    try:
        upgraded = await _upgrade(services, stream, head)
        # An idle connection keeps none of the request (see bench/connections.py).
        del head
        if upgraded is not None:
            await upgraded.serve(buffered)
    except Exception:
        # A bug ends only this connection, never the listener's other tasks.
        log.exception("WebSocket connection failed", extra={"ip": client_ip})
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


class _Upgraded:
    """A connection after its 101 response, holding one connection slot."""

    __slots__ = ("connection", "services", "stream")

    def __init__(
        self, services: Services, stream: trio.SocketStream, connection: Connection
    ) -> None:
        self.services = services
        self.stream = stream
        self.connection = connection

    async def serve(self, buffered: bytes) -> None:
        """Run the Phoenix session, then forget the connection and free its slot."""
        services = self.services
        connection = self.connection
        try:
            await Session(services, connection).run(self.stream, buffered)
        finally:
            if services.token_watch is not None:
                services.token_watch.forget(connection)
            if services.security is not None:
                services.security.untrack(connection)
            services.hub.remove_connection(connection)
            services.hub.release_slot()
            code = connection.close_code if connection.close_code is not None else 1006
            WS_CONNECTIONS_ACTIVE.dec()
            WS_CONNECTIONS_CLOSED.labels(code=close_code_label(code)).inc()
            log.info(
                "WebSocket connection closed with code %d",
                code,
                extra=connection.extra,
            )


async def _upgrade(
    services: Services, stream: trio.SocketStream, head: RequestHead
) -> _Upgraded | None:
    """Check the request and send 101, or send an HTTP error and return None."""
    hub = services.hub
    client_ip = head.client[0]
    security = services.security
    if security is not None and not await security.admit_upgrade(stream, head):
        return None
    try:
        key = check_upgrade(head)
        vsn = select_vsn(head.query)
    except HandshakeError as exc:
        code = "unsupported_version" if exc.status == 426 else "invalid_upgrade"
        await _send_http_error(stream, exc.status, code, exc.message, exc.headers)
        return None
    except ProtocolError as exc:
        await _send_http_error(stream, 400, "invalid_vsn", str(exc))
        return None

    if not await hub.reserve_slot():
        if hub.shutting_down.is_set():
            code, reason = "shutting_down", "server is shutting down"
        else:
            code = "too_many_connections"
            reason = f"too many WebSocket connections (limit {hub.max_connections})"
        _log_rejection(503, reason, client_ip)
        await _send_http_error(stream, 503, code, reason)
        return None
    upgraded = None
    try:
        upgraded = await _accept(services, stream, head, key, vsn)
    finally:
        if upgraded is None:
            hub.release_slot()
    return upgraded


async def _accept(
    services: Services,
    stream: trio.SocketStream,
    head: RequestHead,
    key: str,
    vsn: str,
) -> _Upgraded | None:
    client_ip = head.client[0]
    token, subprotocol = extract_token(head)
    try:
        user_id, username, claims = await _authenticate(services, token)
    except _Rejected as exc:
        _log_rejection(exc.status, exc.reason, client_ip)
        if exc.status == 403:
            code, message = "invalid_token", INVALID_TOKEN_MESSAGE
        else:
            code, message = "unavailable", exc.reason
        await _send_http_error(stream, exc.status, code, message)
        return None

    try:
        with trio.fail_after(CLOSE_TIMEOUT):
            await stream.send_all(accept_response(key, subprotocol))
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None

    connection = services.hub.open_connection(
        user_id=user_id, username=username, vsn=vsn
    )
    if services.token_watch is not None:
        services.token_watch.watch(connection, claims)
    if services.security is not None:
        services.security.track(connection, head)
    WS_CONNECTIONS_OPENED.inc()
    WS_CONNECTIONS_ACTIVE.inc()
    log.info(
        "WebSocket connection opened (vsn %s)",
        vsn,
        extra={**connection.extra, "ip": client_ip},
    )
    return _Upgraded(services, stream, connection)


async def _authenticate(
    services: Services, token: str | None
) -> tuple[int, str, dict[str, Any]]:
    """Return the user id, username and claims of a valid access token.

    Raises _Rejected otherwise.
    """
    if token is None:
        raise _Rejected(403, "missing access token")
    try:
        claims = services.tokens.verify(token, "access")
    except AuthError as exc:
        # Only the stable reason code is logged: a PyJWT message may quote
        # parts of the token.
        reason = getattr(exc, "reason", "invalid")
        raise _Rejected(403, f"access token rejected ({reason})") from None
    try:
        user_id = int(claims["sub"])
    except (KeyError, TypeError, ValueError):
        raise _Rejected(403, "invalid access token: `sub` is not a user id") from None

    try:
        if await check_revocation(services, claims) is not None:
            raise _Rejected(403, f"access token of user {user_id} is revoked")
        user = await services.reads.run(reads.user_by_id, user_id)
    except (apsw.Error, StorageError, trio.ClosedResourceError) as exc:
        log.warning("cannot check the access token of user %d: %s", user_id, exc)
        raise _Rejected(503, "database unavailable, try again later") from None
    if user is None:
        raise _Rejected(403, f"user {user_id} of the access token does not exist")
    return user_id, str(user["username"]), claims


async def _send_http_error(
    stream: trio.SocketStream,
    status: int,
    code: str,
    message: str,
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Send a JSON error response with `Connection: close`."""
    WS_UPGRADES_REJECTED.labels(status=str(status)).inc()
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = (*headers, ("Content-Type", "application/json"))
    try:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.send_all(error_response(status, headers, body))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
