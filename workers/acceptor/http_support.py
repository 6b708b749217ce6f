"""Building blocks of the HTTP JSON API: errors, request bodies, DB and auth calls.

Every error a client sees is `{"error": {"code", "message"}}`, plus `field` when
one input field is at fault. The codes are stable, but messages may change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import apsw
import trio
from quart import request
from werkzeug.routing import BaseConverter

from deeperhub.auth.tokens import ACCESS, TokenError
from deeperhub.errors import DeeperHubError, ProtocolError, StorageError
from deeperhub.json_text import JSONParseError, parse_json
from deeperhub.storage import reads
from deeperhub.storage.reads import MAX_INT64

if TYPE_CHECKING:
    from collections.abc import Callable

    from quart import Blueprint
    from quart.blueprints import BlueprintSetupState

    from deeperhub.ipc import RemoteError

    from .services import Services

__all__ = [
    "DB_CALL_TIMEOUT",
    "MAX_INT64",
    "Api",
    "ApiError",
    "Identity",
    "RowIdConverter",
    "error_body",
    "parse_int",
    "read_json_object",
    "remote_error_response",
    "use_row_id_converter",
]

# Seconds an HTTP request waits for the DB writer to commit its write.
# NOTE: a judgement call, not measured: long enough for a large group commit on
# a slow disk, short enough that a hung DB writer does not pile up requests.
DB_CALL_TIMEOUT = 10.0

T = TypeVar("T")

log = logging.getLogger("deeperhub.acceptor.http")

# Status and client-facing code for each DB writer error code.
_REMOTE_STATUS: dict[str, tuple[int, str]] = {
    "conflict": (409, "conflict"),
    "not_found": (404, "not_found"),
    "forbidden": (403, "forbidden"),
    "invalid": (422, "validation_failed"),
    "reused": (401, "unauthorized"),
    "storage": (503, "service_unavailable"),
}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """Return the JSON error object sent to clients."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


class ApiError(DeeperHubError):
    """An error response: HTTP `status`, stable `code`, readable `message`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


def remote_error_response(exc: RemoteError) -> ApiError:
    """Return the ApiError for a DB writer error that no route handled itself."""
    status, code = _REMOTE_STATUS.get(exc.code, (500, "internal_error"))
    if status == 500:
        log.error("unexpected DB writer error code %r: %s", exc.code, exc.message)
        return ApiError(500, code, "internal server error")
    if status == 503:
        log.error("DB writer reported a storage failure: %s", exc.message)
        return ApiError(503, code, "storage is unavailable, retry later")
    return ApiError(status, code, exc.message)


async def read_json_object(*, required: bool = True) -> dict[str, Any]:
    """Parse the request body as a JSON object.

    An empty body is `{}` when `required` is false. A body over
    `MAX_CONTENT_LENGTH` raises werkzeug's RequestEntityTooLarge (HTTP 413).
    """
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if not data.strip():
        if required:
            raise ApiError(400, "invalid_json", "request body is empty, expected JSON")
        return {}
    try:
        value = parse_json(data.decode("utf-8"))
    except (JSONParseError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, "invalid_json", f"request body is not valid JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(422, "validation_failed", "request body must be a JSON object")
    return value


@dataclass(frozen=True)
class Identity:
    """The user behind a verified, unrevoked access token."""

    user_id: int
    claims: dict[str, Any]


def _unauthorized(message: str, *, token_given: bool) -> ApiError:
    # RFC 6750 section 3: a 401 for a protected resource names the scheme, and
    # `invalid_token` means that the token itself was rejected.
    challenge = 'Bearer realm="deeperhub"'
    if token_given:
        challenge += ', error="invalid_token"'
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": challenge}
    )


class Api:
    """Helpers that route handlers share: DB writer calls, reads and Bearer auth."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings

    async def db(self, op: str, **args: Any) -> Any:
        """Send write `op` to the DB writer and return its result.

        RemoteError is raised for the route to handle. An unreachable or slow
        DB writer becomes a 503 ApiError.
        """
        try:
            return await self.services.db.call(op, timeout=DB_CALL_TIMEOUT, **args)
        except trio.TooSlowError:
            log.error("DB writer request %s timed out after %g s", op, DB_CALL_TIMEOUT)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ProtocolError,
        ) as exc:
            log.error("DB writer connection failed during %s: %s", op, exc)
        raise ApiError(
            503, "service_unavailable", "storage is unavailable, retry later"
        )

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the read query `fn(conn, *args)` on the read pool."""
        try:
            return await self.services.reads.run(fn, *args)
        except (StorageError, apsw.Error, trio.ClosedResourceError) as exc:
            # For example apsw.BusyError after busy_timeout, or a pool closed
            # while the acceptor stops.
            log.error("read query %s failed: %s", getattr(fn, "__name__", fn), exc)
            raise ApiError(
                503, "service_unavailable", "storage is unavailable, retry later"
            ) from None

    async def authenticate(self) -> Identity:
        """Return the Identity of the request's Bearer access token, or raise 401."""
        header = request.headers.get("Authorization")
        if header is None:
            raise _unauthorized("missing Authorization header", token_given=False)
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized(
                "Authorization header must be 'Bearer <access token>'",
                token_given=False,
            )

        try:
            claims = self.services.tokens.verify(token, ACCESS)
        except TokenError as exc:
            log.debug("rejected access token: %s", exc.reason)
            raise _unauthorized(exc.message, token_given=True) from None
        if not claims["sub"].isdecimal():
            raise _unauthorized("token subject is not a user id", token_given=True)
        revoked = await self.read(
            reads.token_revocation,
            claims["jti"],
            claims.get("fam"),
            int(claims["sub"]),
            claims["iat"],
        )
        if revoked is not None:
            raise _unauthorized("token has been revoked", token_given=True)
        return Identity(user_id=int(claims["sub"]), claims=claims)


class RowIdConverter(BaseConverter):
    """URL converter for an id: 1 to 19 ASCII digits.

    Werkzeug's own `int` converter matches any Unicode digit (`/api/channels/١`
    was channel 1) and any length. A longer segment matches no route (404).
    A 19-digit value can still exceed MAX_INT64, and `reads.channel_by_id`
    returns None for it, so it is a 404 as well. The converter never rejects a
    value it matched, because werkzeug then reports 405 instead of 404 when
    another method's rule has the same path.
    """

    regex = r"[0-9]{1,19}"
    weight = 50

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: object) -> str:
        return str(value)


def use_row_id_converter(blueprint: Blueprint) -> None:
    """Make `<int:NAME>` in every route of the app a RowIdConverter.

    The converter keeps the name `int`, so route templates, and the `route`
    label of the HTTP metrics built from them, stay as they were. Call it
    before the blueprint's first route: the app binds each rule when the
    blueprint registers, in the order the blueprint recorded them.
    """

    def replace_converter(state: BlueprintSetupState) -> None:
        state.app.url_map.converters["int"] = RowIdConverter

    blueprint.record_once(replace_converter)


def parse_int(
    field: str,
    raw: object,
    *,
    minimum: int = 0,
    maximum: int = MAX_INT64,
    from_query: bool = False,
) -> int:
    """Return `raw` as an int within `minimum`..`maximum`, or raise a 422 ApiError.

    `raw` must be a JSON integer, or with `from_query` a query-string value of
    ASCII digits.
    """
    value: int | None = None
    if from_query:
        if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 19:
            value = int(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    if value is None or not minimum <= value <= maximum:
        if maximum == MAX_INT64:
            allowed = f"an integer of at least {minimum}"
        else:
            allowed = f"an integer from {minimum} to {maximum}"
        raise ApiError(
            422, "validation_failed", f"{field} must be {allowed}", field=field
        )
    return value
