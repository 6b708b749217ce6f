"""Channel routes: create, list, show, delete, membership and messages.

Visibility rules: a public channel is visible to every signed-in user, and a
private one only to its owner and members. Every route on a private channel
returns 404 to a non-member, exactly as for an unknown id, so no route reveals
that the channel exists. A caller who can see the channel but lacks the right
(delete by a non-owner, adding members by a non-owner) gets 403.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Blueprint, request

from deeperhub.ipc import RemoteError
from deeperhub.metrics import MESSAGES_RECEIVED
from deeperhub.storage import reads
from deeperhub.validation import ValidationError, validate_body, validate_channel_name

from .http_support import ApiError, parse_int, read_json_object, use_row_id_converter

if TYPE_CHECKING:
    from .http_support import Api, Identity

__all__ = [
    "HISTORY_LIMIT_DEFAULT",
    "HISTORY_LIMIT_MAX",
    "create_channels_blueprint",
    "public_channel",
    "public_message",
]

HISTORY_LIMIT_DEFAULT = 50
HISTORY_LIMIT_MAX = 500

_MESSAGE_FIELDS = (
    "id",
    "channel_id",
    "user_id",
    "username",
    "body",
    "inserted_at",
    "seq",
)


def public_channel(row: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON form of a channel row (SQLite stores `private` as 0 or 1)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "owner_id": row["owner_id"],
        "private": bool(row["private"]),
        "inserted_at": row["inserted_at"],
    }


def public_message(row: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON form of a message row."""
    return {field: row[field] for field in _MESSAGE_FIELDS}


def _channel_not_found(channel_id: int) -> ApiError:
    return ApiError(404, "not_found", f"channel {channel_id} not found")


def _target_user(body: dict[str, Any], identity: Identity) -> int:
    raw = body.get("user_id")
    if raw is None:
        return identity.user_id
    return parse_int("user_id", raw, minimum=1)


def create_channels_blueprint(api: Api) -> Blueprint:
    """Return the blueprint of `/api/channels` and its sub-resources."""
    blueprint = Blueprint("channels", __name__)
    use_row_id_converter(blueprint)

    async def load_channel(channel_id: int) -> dict[str, Any]:
        row = await api.read(reads.channel_by_id, channel_id)
        if row is None:
            raise _channel_not_found(channel_id)
        return row

    async def is_member(channel: dict[str, Any], user_id: int) -> bool:
        if channel["owner_id"] == user_id:
            return True
        return bool(await api.read(reads.is_member, channel["id"], user_id))

    async def load_visible_channel(channel_id: int, user_id: int) -> dict[str, Any]:
        channel = await load_channel(channel_id)
        if channel["private"] and not await is_member(channel, user_id):
            raise _channel_not_found(channel_id)
        return channel

    @blueprint.post("/api/channels")
    async def create_channel() -> Any:
        identity = await api.authenticate()
        body = await read_json_object()
        name = validate_channel_name(body.get("name"))
        private = body.get("private", False)
        if not isinstance(private, bool):
            raise ValidationError("private", "private must be true or false")

        try:
            result = await api.db(
                "create_channel", name=name, owner_id=identity.user_id, private=private
            )
        except RemoteError as exc:
            if exc.code != "conflict":
                raise
            raise ApiError(
                409, "conflict", f"channel name {name!r} is already taken", field="name"
            ) from None
        return {"channel": public_channel(result["channel"])}, 201

    @blueprint.get("/api/channels")
    async def list_channels() -> Any:
        identity = await api.authenticate()
        rows = await api.read(reads.list_channels_for, identity.user_id)
        return {"channels": [public_channel(row) for row in rows]}

    @blueprint.get("/api/channels/<int:channel_id>")
    async def show_channel(channel_id: int) -> Any:
        identity = await api.authenticate()
        channel = await load_visible_channel(channel_id, identity.user_id)
        return {"channel": public_channel(channel)}

    @blueprint.delete("/api/channels/<int:channel_id>")
    async def delete_channel(channel_id: int) -> Any:
        identity = await api.authenticate()
        channel = await load_visible_channel(channel_id, identity.user_id)
        if channel["owner_id"] != identity.user_id:
            raise ApiError(403, "forbidden", "only the channel owner can delete it")
        await api.db("delete_channel", channel_id=channel_id, user_id=identity.user_id)
        return "", 204

    @blueprint.post("/api/channels/<int:channel_id>/subscribe")
    async def subscribe(channel_id: int) -> Any:
        identity = await api.authenticate()
        body = await read_json_object(required=False)
        target = _target_user(body, identity)
        channel = await load_visible_channel(channel_id, identity.user_id)

        is_owner = channel["owner_id"] == identity.user_id
        if channel["private"] and not is_owner:
            raise ApiError(
                403, "forbidden", "only the owner can add members to a private channel"
            )
        if target != identity.user_id and not is_owner:
            raise ApiError(
                403, "forbidden", "only the channel owner can add other users"
            )

        await api.db("add_member", channel_id=channel_id, user_id=target)
        return "", 204

    @blueprint.post("/api/channels/<int:channel_id>/unsubscribe")
    async def unsubscribe(channel_id: int) -> Any:
        identity = await api.authenticate()
        body = await read_json_object(required=False)
        target = _target_user(body, identity)
        channel = await load_visible_channel(channel_id, identity.user_id)

        if target != identity.user_id and channel["owner_id"] != identity.user_id:
            raise ApiError(
                403, "forbidden", "only the channel owner can remove other users"
            )
        await api.db("remove_member", channel_id=channel_id, user_id=target)
        return "", 204

    @blueprint.post("/api/channels/<int:channel_id>/messages")
    async def post_message(channel_id: int) -> Any:
        identity = await api.authenticate()
        body = await read_json_object()
        text = validate_body(body.get("body"), api.settings)
        await load_visible_channel(channel_id, identity.user_id)

        # The DB writer publishes the committed message to WebSocket subscribers.
        result = await api.db(
            "insert_message", channel_id=channel_id, user_id=identity.user_id, body=text
        )
        MESSAGES_RECEIVED.inc()
        return {"message": public_message(result["message"])}, 201

    @blueprint.get("/api/channels/<int:channel_id>/messages")
    async def list_messages(channel_id: int) -> Any:
        identity = await api.authenticate()
        after_id = parse_int(
            "after_id", request.args.get("after_id", "0"), from_query=True
        )
        limit = parse_int(
            "limit",
            request.args.get("limit", str(HISTORY_LIMIT_DEFAULT)),
            minimum=1,
            maximum=HISTORY_LIMIT_MAX,
            from_query=True,
        )
        await load_visible_channel(channel_id, identity.user_id)

        rows = await api.read(reads.messages_after, channel_id, after_id, limit)
        return {"messages": [public_message(row) for row in rows]}

    return blueprint
