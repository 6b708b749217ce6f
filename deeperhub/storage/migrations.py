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

# Times are Unix seconds. A row of `token_cutoffs` rejects every token of its
# user issued before `not_before`; the row with user_id 0 applies to all users.
# `revoked_families` rejects every token of a refresh token family (one login).
_SCHEMA_V3_TOKEN_REVOCATION = """
CREATE TABLE token_cutoffs (
    user_id INTEGER PRIMARY KEY,
    not_before INTEGER NOT NULL
);

CREATE TABLE revoked_families (
    family_id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX revoked_families_expires_at ON revoked_families (expires_at);
CREATE INDEX revoked_tokens_expires_at ON revoked_tokens (expires_at);
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);
"""

# Security layer. Times are Unix seconds, except `inserted_at` (ISO 8601 UTC as
# in the other tables). A block that ended keeps its row in `ip_blocks`,
# because its `offences` set how long the IP's next block lasts.
# `security_events` contains the alerts, each stored before any delivery; the
# outbox has one row per alert and channel.
_SCHEMA_V2_SECURITY = """
CREATE TABLE ip_blocks (
    ip TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('anomaly', 'manual')),
    created_at REAL NOT NULL,
    expires_at REAL,
    offences INTEGER NOT NULL CHECK (offences >= 1)
);
CREATE INDEX ip_blocks_expires_at ON ip_blocks (expires_at);

CREATE TABLE ip_reputation (
    ip TEXT PRIMARY KEY,
    score REAL NOT NULL CHECK (score >= 0 AND score < 100),
    updated_at REAL NOT NULL
);

-- user_id has no foreign key, so an event outlives a deleted user.
CREATE TABLE security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    ip TEXT,
    user_id INTEGER,
    details TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1 CHECK (count >= 1),
    inserted_at TEXT NOT NULL
);
CREATE INDEX security_events_inserted_at ON security_events (inserted_at);

CREATE TABLE alert_outbox (
    id INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES security_events (id) ON DELETE CASCADE,
    channel TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    deadline REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (event_id, channel)
);
CREATE INDEX alert_outbox_due ON alert_outbox (status, channel, next_attempt_at);
"""

# Retention: a channel's own limits (NULL: the `retention.*` defaults, 0: no
# limit; `max_age` in seconds). The DB writer deletes the oldest messages in
# seq order, so every message with seq <= `pruned_seq` is gone and no other;
# `pruned_id` is the largest id it deleted, for replays that start from an id.
_SCHEMA_V4_RETENTION = """
ALTER TABLE channels ADD COLUMN retention_max_messages INTEGER;
ALTER TABLE channels ADD COLUMN retention_max_age INTEGER;
ALTER TABLE channels ADD COLUMN pruned_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN pruned_id INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_channel_id_inserted_at ON messages (channel_id, inserted_at);
"""

# Channel ids are never reused, so a client that kept the id of a deleted
# channel gets 404 instead of another channel's messages. SQLite cannot add
# AUTOINCREMENT to a table, so `channels` is copied with its ids into a new
# table, dropped, and the copy renamed. The copy's explicit ids set its
# `sqlite_sequence` row to the current max id, and the rename carries that row
# over. Dropping `channels` with foreign keys on would cascade into
# `channel_members` and `messages`, so `apply_migrations` runs migrations with
# foreign keys off and checks them before each commit. Child tables name
# `channels` in their REFERENCES clauses, so they point at the new table.
# NOTE: an id above the current max that was deleted before this migration ran
# can still be given out once, because no earlier record of it exists.
_SCHEMA_V5_CHANNEL_AUTOINCREMENT = """
CREATE TABLE channels_autoincrement (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    owner_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    private INTEGER NOT NULL DEFAULT 0 CHECK (private IN (0, 1)),
    -- seq of the newest message in the channel; insert_message increments it.
    last_seq INTEGER NOT NULL DEFAULT 0,
    inserted_at TEXT NOT NULL,
    retention_max_messages INTEGER,
    retention_max_age INTEGER,
    pruned_seq INTEGER NOT NULL DEFAULT 0,
    pruned_id INTEGER NOT NULL DEFAULT 0
);
INSERT INTO channels_autoincrement (
    id, name, owner_id, private, last_seq, inserted_at,
    retention_max_messages, retention_max_age, pruned_seq, pruned_id
)
SELECT
    id, name, owner_id, private, last_seq, inserted_at,
    retention_max_messages, retention_max_age, pruned_seq, pruned_id
FROM channels ORDER BY id;
DROP TABLE channels;
ALTER TABLE channels_autoincrement RENAME TO channels;
CREATE INDEX channels_owner_id ON channels (owner_id);
"""

MIGRATIONS: Sequence[Migration] = (
    (1, "initial schema", _SCHEMA_V1),
    (2, "security: blocks, reputation, events, alert outbox", _SCHEMA_V2_SECURITY),
    (3, "token cutoffs and revoked families", _SCHEMA_V3_TOKEN_REVOCATION),
    (4, "message retention per channel", _SCHEMA_V4_RETENTION),
    (5, "channel ids never reused", _SCHEMA_V5_CHANNEL_AUTOINCREMENT),
)

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
    the previous version. Foreign keys are off while migrations run, so that a
    table rebuild does not cascade, and `PRAGMA foreign_key_check` must find no
    violation before each commit. The connection's `foreign_keys` setting is
    restored afterwards. Raises StorageError if the database records a version
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

    # PRAGMA foreign_keys is a no-op inside a transaction, so it is switched
    # here, around the per-migration transactions.
    (foreign_keys,) = conn.execute("PRAGMA foreign_keys").fetchall()[0]
    conn.execute("PRAGMA foreign_keys = OFF")
    applied: list[int] = []
    try:
        for version, name, sql in sorted(migrations):
            if _apply_one(conn, version, name, sql):
                applied.append(version)
    finally:
        conn.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
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
        _check_foreign_keys(conn, version, name)
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
    except StorageError:
        if not conn.getautocommit():
            conn.execute("ROLLBACK")
        raise

    log.info("applied schema migration %d (%s)", version, name)
    return True


def _check_foreign_keys(conn: apsw.Connection, version: int, name: str) -> None:
    """Raise StorageError if any row references a parent row that is missing."""
    rows = conn.execute("PRAGMA foreign_key_check").fetchall()
    if not rows:
        return
    tables = sorted({f"{table} -> {parent}" for table, _, parent, _ in rows})
    raise StorageError(
        "storage",
        f"migration {version} ({name}) failed: {len(rows)} foreign key "
        f"violations ({', '.join(tables)}); list them with the sqlite3 shell's "
        "`PRAGMA foreign_key_check`, delete those rows or restore a backup, then "
        "start again",
    )
