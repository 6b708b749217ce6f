"""Retention routes: a channel's own message retention limits.

`GET /api/channels/{id}/retention` (visible channels) returns the channel's
own limits and the limits in force:

    {"retention": {"max_messages": null, "max_age": 86400,
                   "effective": {"max_messages": 0, "max_age": 86400}}}

`PUT /api/channels/{id}/retention` with `{"max_messages"?, "max_age"?}`
(owner only) replaces the channel's own limits and returns the same shape.
A missing or null limit falls back to the `retention.*` default, 0 keeps
messages without that limit, and `max_age` is in seconds. The DB writer
applies the limits on its next retention pass (`retention.interval`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Blueprint

from deeperhub.ipc import RemoteError
from deeperhub.storage import reads

from .http_support import ApiError, parse_int, read_json_object, use_row_id_converter

if TYPE_CHECKING:
    from .http_support import Api

__all__ = ["create_retention_blueprint"]

# The largest limits the columns accept: about 31 years in seconds, and more
# messages than a channel can hold.
_MAX_LIMIT = 1_000_000_000


def create_retention_blueprint(api: Api) -> Blueprint:
    """Return the blueprint of `/api/channels/{id}/retention`."""
    blueprint = Blueprint("retention", __name__)
    use_row_id_converter(blueprint)

    def shape(own: dict[str, Any]) -> dict[str, Any]:
        defaults = {
            "max_messages": int(api.settings["retention.max_messages"]),
            "max_age": int(api.settings["retention.max_age"]),
        }
        effective = {
            key: default if own[key] is None else own[key]
            for key, default in defaults.items()
        }
        return {"retention": {**own, "effective": effective}}

    async def load(channel_id: int, user_id: int) -> dict[str, Any]:
        channel = await api.read(reads.channel_by_id, channel_id)
        visible = channel is not None and (
            not channel["private"]
            or channel["owner_id"] == user_id
            or await api.read(reads.is_member, channel_id, user_id)
        )
        if not visible:
            raise ApiError(404, "not_found", f"channel {channel_id} not found")
        assert channel is not None
        return channel

    @blueprint.get("/api/channels/<int:channel_id>/retention")
    async def show_retention(channel_id: int) -> Any:
        identity = await api.authenticate()
        await load(channel_id, identity.user_id)
        own = await api.read(reads.channel_retention, channel_id)
        if own is None:
            raise ApiError(404, "not_found", f"channel {channel_id} not found")
        return shape(own)

    @blueprint.put("/api/channels/<int:channel_id>/retention")
    async def set_retention(channel_id: int) -> Any:
        identity = await api.authenticate()
        body = await read_json_object()
        own: dict[str, Any] = {}
        for key in ("max_messages", "max_age"):
            raw = body.get(key)
            own[key] = None if raw is None else parse_int(key, raw, maximum=_MAX_LIMIT)
        channel = await load(channel_id, identity.user_id)
        if channel["owner_id"] != identity.user_id:
            raise ApiError(
                403, "forbidden", "only the channel owner can change its retention"
            )
        try:
            await api.db(
                "set_channel_retention",
                channel_id=channel_id,
                user_id=identity.user_id,
                **own,
            )
        except RemoteError as exc:
            if exc.code == "not_found":
                raise ApiError(404, "not_found", exc.message) from None
            raise
        return shape(own)

    return blueprint
