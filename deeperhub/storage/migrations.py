"""Numbered schema migrations, applied by the DB writer at start.

Each migration is `(version, name, sql)`. Versions start at 1 and increase by
one. A migration that has shipped is never edited, because databases that
already recorded it would not run the new text: change the schema by
appending a migration.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import apsw

from ..errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["MIGRATIONS", "Migration", "apply_migrations", "applied_versions"]

log = logging.getLogger("deeperhub.db_writer")

Migration = tuple[int, str, str]

_SCHEMA_V1 = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE COLLATE NOCASE,
    email TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    inserted_at TEXT NOT NULL
);

CREATE TABLE channels (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    private INTEGER NOT NULL DEFAULT 0 CHECK (private IN (0, 1)),
    -- seq of the newest message in the channel; insert_message increments it.
    last_seq INTEGER NOT NULL DEFAULT 0,
    inserted_at TEXT NOT NULL
);
CREATE INDEX channels_owner_id ON channels (owner_id);

CREATE TABLE channel_members (
    channel_id INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    inserted_at TEXT NOT NULL,
    PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX channel_members_user_id ON channel_members (user_id);

-- AUTOINCREMENT keeps ids of deleted messages from being reused, so a client
-- that replays from its last seen id never skips a newer message.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users (id),
    body TEXT NOT NULL,
    inserted_at TEXT NOT NULL,
    UNIQUE (channel_id, seq)
);
CREATE INDEX messages_channel_id_id ON messages (channel_id, id);

-- Times in the token tables are Unix seconds.
CREATE TABLE refresh_tokens (
    jti TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX refresh_tokens_family_id ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_id ON refresh_tokens (user_id);

CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
"""

MIGRATIONS: Sequence[Migration] = ((1, "initial schema", _SCHEMA_V1),)

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""


def applied_versions(conn: apsw.Connection) -> list[int]:
    """Return the versions recorded in `schema_migrations`, ascending."""
    rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
    return [row[0] for row in rows.fetchall() if isinstance(row[0], int)]


def apply_migrations(
    conn: apsw.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """Apply the migrations missing from `conn` and return their versions.

    Each migration runs in its own `BEGIN IMMEDIATE` transaction together with
    its row in `schema_migrations`, so a failed migration leaves the schema at
    the previous version. Raises StorageError if the database records a version
    newer than any in `migrations`, or if a migration fails.
    """
    conn.execute(_CREATE_LEDGER)
    known = max((version for version, _, _ in migrations), default=0)
    newest = max(applied_versions(conn), default=0)
    if newest > known:
        raise StorageError(
            "storage",
            f"database schema version {newest} is newer than this DeeperHub, which "
            f"knows versions up to {known}: upgrade DeeperHub or restore a backup "
            "made by this version",
        )

    applied: list[int] = []
    for version, name, sql in sorted(migrations):
        if _apply_one(conn, version, name, sql):
            applied.append(version)
    return applied


def _apply_one(conn: apsw.Connection, version: int, name: str, sql: str) -> bool:
    """Run one migration in its own transaction unless it is already recorded."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except apsw.Error as exc:
        raise StorageError(
            "storage", f"cannot start migration {version} ({name}): {exc}"
        ) from exc

    try:
        # Another process may have applied it while this one waited for the lock.
        recorded = conn.execute(
            "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
        ).fetchall()
        if recorded:
            conn.execute("ROLLBACK")
            return False

        conn.execute(sql)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) "
            "VALUES (?, ?, ?)",
            (version, name, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
        )
        conn.execute("COMMIT")
    except apsw.Error as exc:
        if not conn.getautocommit():
            conn.execute("ROLLBACK")
        raise StorageError(
            "storage", f"migration {version} ({name}) failed: {exc}"
        ) from exc

    log.info("applied schema migration %d (%s)", version, name)
    return True
