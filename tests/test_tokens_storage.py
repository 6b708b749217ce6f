"""Token ops of the DB writer and the revocation read, on a real SQLite file."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from deeperhub.storage import reads
from deeperhub.storage.database import open_read_connection, open_write_connection
from deeperhub.storage.migrations import apply_migrations
from deeperhub.storage.writes import WriteExecutor, WriteOutcome

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import apsw

NOW = 1_800_000_000


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


@pytest.fixture
def executor(db_path: Path) -> Iterator[WriteExecutor]:
    conn = open_write_connection(db_path)
    apply_migrations(conn)
    yield WriteExecutor(conn)
    conn.close()


@pytest.fixture
def reader(db_path: Path, executor: WriteExecutor) -> Iterator[apsw.Connection]:
    conn = open_read_connection(db_path)
    yield conn
    conn.close()


def run(executor: WriteExecutor, op: str, **args: Any) -> WriteOutcome:
    (outcome,) = executor.execute_batch([(op, args)])
    return outcome


def add_user(executor: WriteExecutor, name: str) -> int:
    outcome = run(
        executor,
        "register_user",
        username=name,
        email=f"{name}@example.com",
        password_hash="old-hash",
    )
    assert outcome.result is not None
    return int(outcome.result["user"]["id"])


def store(executor: WriteExecutor, jti: str, user_id: int, family: str) -> None:
    outcome = run(
        executor,
        "store_refresh_token",
        jti=jti,
        user_id=user_id,
        family_id=family,
        expires_at=NOW + 1000,
    )
    assert outcome.error is None, outcome.error


def test_reuse_after_grace_revokes_family(
    executor: WriteExecutor, reader: apsw.Connection
) -> None:
    user = add_user(executor, "ann")
    store(executor, "r1", user, "fam")
    assert run(executor, "use_refresh_token", jti="r1", now=NOW).ok

    reused = run(executor, "use_refresh_token", jti="r1", now=NOW + 5, reuse_grace=2)
    assert reused.error is not None
    assert reused.error[0] == "reused"
    assert reused.events == ({"event": "revoked", "families": ["fam"]},)
    assert reads.token_revocation(reader, "a1", "fam", user, NOW) == "family_revoked"

    # A successor stored after the reuse is rejected too.
    late = run(
        executor,
        "store_refresh_token",
        jti="r2",
        user_id=user,
        family_id="fam",
        expires_at=NOW + 1000,
    )
    assert late.error == ("invalid", "refresh token family revoked")


def test_reuse_within_grace_revokes_nothing(
    executor: WriteExecutor, reader: apsw.Connection
) -> None:
    user = add_user(executor, "bob")
    store(executor, "r1", user, "fam")
    assert run(executor, "use_refresh_token", jti="r1", now=NOW).ok

    again = run(executor, "use_refresh_token", jti="r1", now=NOW + 1, reuse_grace=2)
    assert again.error == ("invalid", "refresh token already used")
    assert again.events == ()
    assert reads.token_revocation(reader, "a1", "fam", user, NOW) is None


def test_revoke_token_publishes_jti(
    executor: WriteExecutor, reader: apsw.Connection
) -> None:
    outcome = run(executor, "revoke_token", jti="j1", expires_at=NOW + 10)
    assert outcome.events == ({"event": "revoked", "jtis": ["j1"]},)
    assert reads.token_revocation(reader, "j1", None, 1, NOW) == "revoked"
    assert reads.token_revocation(reader, "j2", None, 1, NOW) is None


def test_revoke_all_cutoffs(executor: WriteExecutor, reader: apsw.Connection) -> None:
    ann = add_user(executor, "ann")
    bob = add_user(executor, "bob")
    outcome = run(executor, "revoke_all", user_id=ann, before=NOW)
    assert outcome.result == {"before": NOW}
    assert outcome.events == ({"event": "revoked", "user_id": ann, "before": NOW},)
    assert reads.token_revocation(reader, "j", None, ann, NOW - 1) == "revoked_all"
    assert reads.token_revocation(reader, "j", None, ann, NOW) is None
    assert reads.token_revocation(reader, "j", None, bob, NOW - 1) is None

    # An earlier cutoff does not move the one in force back.
    earlier = run(executor, "revoke_all", user_id=ann, before=NOW - 100)
    assert earlier.result == {"before": NOW}

    everyone = run(executor, "revoke_all", before=NOW + 50)
    assert everyone.events == ({"event": "revoked", "before": NOW + 50},)
    assert reads.token_revocation(reader, "j", None, bob, NOW + 49) == "revoked_all"


def test_revoke_all_checks_args(executor: WriteExecutor) -> None:
    assert run(executor, "revoke_all", user_id=999, before=NOW).error is not None
    assert run(executor, "revoke_all", user_id=0, before=NOW).error is not None
    assert run(executor, "revoke_all", before=-1).error is not None
    assert run(executor, "revoke_all", before="now").error is not None


def test_refresh_before_cutoff_is_invalid(executor: WriteExecutor) -> None:
    user = add_user(executor, "cid")
    store(executor, "r1", user, "fam")
    assert run(executor, "revoke_all", user_id=user, before=NOW).ok
    used = run(executor, "use_refresh_token", jti="r1", now=NOW, issued_at=NOW - 1)
    assert used.error == ("invalid", "refresh token revoked")


def test_update_password_hash_compares(executor: WriteExecutor) -> None:
    user = add_user(executor, "dee")
    stale = run(
        executor, "update_password_hash", user_id=user, old_hash="x", new_hash="n"
    )
    assert stale.result == {"updated": False}
    fresh = run(
        executor,
        "update_password_hash",
        user_id=user,
        old_hash="old-hash",
        new_hash="new-hash",
    )
    assert fresh.result == {"updated": True}
    missing = run(
        executor, "update_password_hash", user_id=999, old_hash="a", new_hash="b"
    )
    assert missing.error is not None
    assert missing.error[0] == "not_found"


def test_purge_deletes_only_expired(
    executor: WriteExecutor, reader: apsw.Connection
) -> None:
    user = add_user(executor, "eve")
    run(executor, "revoke_token", jti="old", expires_at=NOW - 10)
    run(executor, "revoke_token", jti="live", expires_at=NOW + 10)
    run(executor, "revoke_all", user_id=user, before=NOW - 5000)
    outcome = run(
        executor, "purge_expired_tokens", expired_before=NOW, cutoffs_before=NOW - 100
    )
    assert outcome.result is not None
    assert outcome.result["deleted"]["revoked_tokens"] == 1
    assert outcome.result["deleted"]["token_cutoffs"] == 1
    assert reads.token_revocation(reader, "old", None, user, NOW) is None
    assert reads.token_revocation(reader, "live", None, user, NOW) == "revoked"
