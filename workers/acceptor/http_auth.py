"""Account routes: register, login, refresh, revoke and the current user.

Refresh tokens rotate: each refresh marks the presented token used (in the DB
writer, atomically) and returns a new pair in the same family. When a used
token is presented again, the DB writer returns the error `reused` and revokes
the whole family, access tokens included (they carry the family in `fam`),
and the acceptor sends a `refresh_token_reuse` security event.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from quart import Blueprint, g, request

from deeperhub.auth.tokens import REFRESH, TokenError
from deeperhub.ipc import RemoteError
from deeperhub.storage import reads
from deeperhub.validation import (
    ValidationError,
    validate_email,
    validate_password,
    validate_username,
)

from .http_support import ApiError, read_json_object

if TYPE_CHECKING:
    from .http_support import Api

__all__ = ["create_auth_blueprint", "public_user"]

log = logging.getLogger("deeperhub.auth")

# Same response for an unknown user and a wrong password, so that login does
# not reveal which accounts exist.
_BAD_CREDENTIALS = "invalid login or password"


def public_user(row: dict[str, Any]) -> dict[str, Any]:
    """Return the fields of a user row that clients may see (no password hash)."""
    return {"id": row["id"], "username": row["username"], "email": row["email"]}


def _conflict_field(message: str) -> str | None:
    # The DB writer's conflict message names the column that is taken.
    for field in ("username", "email"):
        if field in message.lower():
            return field
    return None


def _login_name(body: dict[str, Any]) -> str:
    for field in ("login", "username", "email"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ValidationError(field, f"{field} must be a non-empty string")
        return value
    raise ValidationError("login", "login, username or email is required")


def create_auth_blueprint(api: Api) -> Blueprint:
    """Return the blueprint of `/api/auth/*` and `/api/users/me`."""
    blueprint = Blueprint("auth", __name__)
    services = api.services
    tokens = services.tokens

    async def issue_pair(user_id: int, family_id: str) -> dict[str, Any]:
        access_token, _ = tokens.issue_access(user_id, family_id)
        refresh_token, refresh_claims = tokens.issue_refresh(user_id, family_id)
        await api.db(
            "store_refresh_token",
            jti=refresh_claims["jti"],
            user_id=user_id,
            family_id=family_id,
            expires_at=refresh_claims["exp"],
        )
        return {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": tokens.access_ttl,
        }

    async def rehash(user_id: int, old_hash: str, password: str) -> None:
        """Store a hash with the current parameters; a failure only logs."""
        new_hash = await services.passwords.hash(password)
        try:
            result = await api.db(
                "update_password_hash",
                user_id=user_id,
                old_hash=old_hash,
                new_hash=new_hash,
            )
        except (RemoteError, ApiError) as exc:
            log.warning("rehash of the password of user %s failed: %s", user_id, exc)
            return
        if result.get("updated"):
            log.info("rehashed the password of user %s", user_id)

    @blueprint.post("/api/auth/register")
    async def register() -> Any:
        body = await read_json_object()
        username = validate_username(body.get("username"))
        email = validate_email(body.get("email"))
        password = validate_password(body.get("password"), api.settings)

        password_hash = await services.passwords.hash(password)
        try:
            result = await api.db(
                "register_user",
                username=username,
                email=email,
                password_hash=password_hash,
            )
        except RemoteError as exc:
            if exc.code != "conflict":
                raise
            field = _conflict_field(exc.message)
            message = f"{field} is already taken" if field else exc.message
            raise ApiError(409, "conflict", message, field=field) from None

        user = public_user(result["user"])
        log.info("registered user %s", user["id"])
        return {"user": user}, 201

    @blueprint.post("/api/auth/login")
    async def login() -> Any:
        body = await read_json_object()
        name = _login_name(body)
        password = body.get("password")
        if not isinstance(password, str):
            raise ValidationError("password", "password must be a string")

        # Verify even when the user does not exist or the password is too long
        # to be right, so every failure takes about the same time. An
        # over-long password is never hashed: the dummy hash is checked
        # against an empty one instead.
        row = await api.read(reads.user_for_login, name)
        stored_hash = row["password_hash"] if row is not None else None
        if len(password) > api.settings["auth.password_max"]:
            await services.passwords.verify(None, "")
            verified = False
        else:
            verified = await services.passwords.verify(stored_hash, password)
        if row is None or not verified:
            log.info(
                "login failed from %s (%s)",
                request.remote_addr,
                "wrong password" if row is not None else "unknown user",
            )
            raise ApiError(401, "unauthorized", _BAD_CREDENTIALS)

        user_id = int(row["id"])
        if services.passwords.needs_rehash(stored_hash):
            await rehash(user_id, stored_hash, password)
        log.info("user %s logged in from %s", user_id, request.remote_addr)
        return await issue_pair(user_id, secrets.token_urlsafe(16))

    @blueprint.post("/api/auth/refresh")
    async def refresh() -> Any:
        body = await read_json_object()
        token = body.get("refresh_token")
        if not isinstance(token, str) or not token:
            raise ValidationError("refresh_token", "refresh_token must be a string")
        try:
            claims = tokens.verify(token, REFRESH)
        except TokenError as exc:
            log.info(
                "rejected refresh token from %s: %s", request.remote_addr, exc.reason
            )
            raise ApiError(401, "unauthorized", exc.message) from None

        try:
            used = await api.db(
                "use_refresh_token",
                jti=claims["jti"],
                now=int(time.time()),
                issued_at=claims["iat"],
                reuse_grace=api.settings["auth.refresh_reuse_grace"],
            )
        except RemoteError as exc:
            if exc.code == "reused":
                # The security gate stores the client IP resolved behind
                # trusted proxies; without the gate it is the peer address.
                client_ip = g.get("client_ip") or request.remote_addr
                log.warning(
                    "refresh token reused for user %s from %s, so its token family "
                    "is revoked",
                    claims["sub"],
                    client_ip,
                )
                if services.token_watch is not None:
                    services.token_watch.notify_security(
                        {
                            "event": "security",
                            "kind": "refresh_token_reuse",
                            "ip": client_ip,
                            "user_id": int(claims["sub"]),
                        }
                    )
                raise ApiError(
                    401, "unauthorized", "refresh token was already used"
                ) from None
            if exc.code == "invalid":
                log.info(
                    "rejected refresh token of user %s: %s", claims["sub"], exc.message
                )
                raise ApiError(
                    401, "unauthorized", "refresh token is not valid"
                ) from None
            raise

        user_id = int(used["user_id"])
        family_id = str(used["family_id"])
        if str(user_id) != claims["sub"] or claims.get("fam", family_id) != family_id:
            log.warning(
                "refresh token of user %s does not match its stored user or family",
                claims["sub"],
            )
            raise ApiError(401, "unauthorized", "refresh token is not valid")
        return await issue_pair(user_id, family_id)

    @blueprint.post("/api/auth/revoke")
    async def revoke() -> Any:
        identity = await api.authenticate()
        body = await read_json_object(required=False)
        revoked = [identity.claims]

        revoke_all = body.get("all", False)
        if not isinstance(revoke_all, bool):
            raise ValidationError("all", "all must be true or false")
        if revoke_all:
            # NOTE: `iat` has whole seconds, so a token issued earlier in the
            # same second as this cutoff stays valid. The presented token is
            # revoked by its jti as well.
            await api.db(
                "revoke_all", user_id=identity.user_id, before=int(time.time())
            )
            log.info("user %s revoked all of its tokens", identity.user_id)

        # A refresh token in the body is revoked too (a full logout), but only
        # one that belongs to the same user.
        refresh_token = body.get("refresh_token")
        if refresh_token is not None:
            try:
                refresh_claims = tokens.verify(refresh_token, REFRESH)
            except TokenError as exc:
                raise ValidationError("refresh_token", exc.message) from None
            if refresh_claims["sub"] != identity.claims["sub"]:
                raise ApiError(
                    403, "forbidden", "refresh token belongs to another user"
                )
            revoked.append(refresh_claims)

        for claims in revoked:
            await api.db("revoke_token", jti=claims["jti"], expires_at=claims["exp"])
        log.info("user %s revoked %d token(s)", identity.user_id, len(revoked))
        return "", 204

    @blueprint.get("/api/users/me")
    async def current_user() -> Any:
        identity = await api.authenticate()
        row = await api.read(reads.user_by_id, identity.user_id)
        if row is None:
            raise ApiError(401, "unauthorized", "the token's user no longer exists")
        return {"user": public_user(row)}

    return blueprint
