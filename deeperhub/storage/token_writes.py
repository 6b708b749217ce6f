"""DB writer ops for credentials: password rehash, token cutoffs, purging.

These ops run inside `WriteExecutor` batches like the ops of `writes.py`, which
registers them. Times are Unix seconds.

Revocations are published on the bus as one event shape,
`{"event": "revoked", "jtis": [...], "families": [...], "user_id": N,
"before": T}`, where every key but `event` is optional. A connection must
close when its token has one of the `jtis`, belongs to one of the `families`,
or was issued before `before` (by user `user_id`, or by anyone when `user_id`
is absent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import StorageError
from .writes import WriteOutcome, _int_arg, _str_arg

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .writes import WriteExecutor

__all__ = [
    "ALL_USERS",
    "TOKEN_OPS",
    "purge_expired_tokens",
    "revocation_event",
    "revoke_all",
    "update_password_hash",
]

# `token_cutoffs.user_id` of the cutoff that applies to every user.
ALL_USERS = 0


def revocation_event(
    *,
    jtis: list[str] | None = None,
    families: list[str] | None = None,
    user_id: int | None = None,
    before: int | None = None,
) -> dict[str, Any]:
    """Return the bus event announcing a revocation (see the module docstring)."""
    event: dict[str, Any] = {"event": "revoked"}
    if jtis:
        event["jtis"] = jtis
    if families:
        event["families"] = families
    if user_id is not None:
        event["user_id"] = user_id
    if before is not None:
        event["before"] = before
    return event


def update_password_hash(ex: WriteExecutor, args: Mapping[str, Any]) -> WriteOutcome:
    """Replace a user's password hash if it still equals `old_hash`.

    The compare-and-set keeps a rehash at login from overwriting a password
    that changed meanwhile. Returns `{"updated": bool}`; `not_found` if the
    user does not exist.
    """
    user_id = _int_arg(args, "user_id")
    old_hash = _str_arg(args, "old_hash")
    new_hash = _str_arg(args, "new_hash")

    ex._require_user(user_id)
    rows = ex._rows(
        "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ? "
        "RETURNING id",
        (new_hash, user_id, old_hash),
    )
    return WriteOutcome(result={"updated": bool(rows)})


def revoke_all(ex: WriteExecutor, args: Mapping[str, Any]) -> WriteOutcome:
    """Reject every token issued before `before`, of `user_id` or of everyone.

    A later cutoff replaces an earlier one, and an earlier one changes nothing.
    Returns `{"before": T}`, the cutoff now in force for that scope.
    """
    before = _int_arg(args, "before")
    user_id: int | None = None
    if args.get("user_id") is not None:
        user_id = _int_arg(args, "user_id")
        if user_id <= ALL_USERS:
            raise StorageError("invalid", f"invalid argument user_id: {user_id}")
        ex._require_user(user_id)
    if before < 0:
        raise StorageError("invalid", f"invalid argument before: {before}")

    scope = ALL_USERS if user_id is None else user_id
    row = ex._row(
        "INSERT INTO token_cutoffs (user_id, not_before) VALUES (?, ?) "
        "ON CONFLICT (user_id) DO UPDATE "
        "SET not_before = max(not_before, excluded.not_before) "
        "RETURNING not_before",
        (scope, before),
    )
    in_force = int(row[0]) if row else before
    event = revocation_event(user_id=user_id, before=in_force)
    return WriteOutcome(result={"before": in_force}, events=(event,))


def purge_expired_tokens(ex: WriteExecutor, args: Mapping[str, Any]) -> WriteOutcome:
    """Delete revocation and refresh token rows that no longer matter.

    Rows of tokens that expired before `expired_before` are deleted: such a
    token fails verification on its `exp` alone. Cutoffs older than
    `cutoffs_before` are deleted too, because every token they reject has
    expired. The caller subtracts the leeway and the longest token lifetime.
    Returns the number of rows deleted per table.
    """
    expired_before = _int_arg(args, "expired_before")
    cutoffs_before = _int_arg(args, "cutoffs_before")

    deleted: dict[str, int] = {}
    for table in ("revoked_tokens", "revoked_families", "refresh_tokens"):
        ex._rows(f"DELETE FROM {table} WHERE expires_at < ?", (expired_before,))
        deleted[table] = ex.conn.changes()
    ex._rows("DELETE FROM token_cutoffs WHERE not_before < ?", (cutoffs_before,))
    deleted["token_cutoffs"] = ex.conn.changes()
    return WriteOutcome(result={"deleted": deleted})


TOKEN_OPS = {
    "update_password_hash": update_password_hash,
    "revoke_all": revoke_all,
    "purge_expired_tokens": purge_expired_tokens,
}
