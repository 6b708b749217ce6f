"""Password hashing with Argon2id, run in worker threads.

Hashing costs tens of milliseconds of CPU and about 19 MiB of memory per call, so
it never runs on the trio event loop. A capacity limiter bounds how many hashes
run at once, which also bounds their memory use.
"""

from __future__ import annotations

import os
import secrets

import trio
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "DEFAULT_MEMORY_COST",
    "DEFAULT_PARALLELISM",
    "DEFAULT_TIME_COST",
    "PasswordService",
]

# OWASP Password Storage Cheat Sheet, minimum Argon2id configuration:
# 19 MiB of memory, 2 iterations, 1 degree of parallelism.
DEFAULT_MEMORY_COST = 19456  # KiB
DEFAULT_TIME_COST = 2
DEFAULT_PARALLELISM = 1


def _encode(password: str) -> bytes:
    # "surrogatepass" lets a string holding a lone surrogate (which JSON can
    # carry as "\ud800") hash and verify instead of raising UnicodeEncodeError.
    return password.encode("utf-8", "surrogatepass")


class PasswordService:
    """Argon2id hashing and verification that keeps the event loop free.

    The cost parameters are arguments so that tests can run with cheap hashes.
    Production code should keep the defaults, which are the OWASP minimum.
    """

    def __init__(
        self,
        *,
        memory_cost: int = DEFAULT_MEMORY_COST,
        time_cost: int = DEFAULT_TIME_COST,
        parallelism: int = DEFAULT_PARALLELISM,
        max_concurrent: int | None = None,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=Type.ID,
        )
        if max_concurrent is None:
            max_concurrent = max(1, min(4, os.cpu_count() or 1))
        self._limiter = trio.CapacityLimiter(max_concurrent)

        # Verifying against this hash when the user does not exist makes a failed
        # login take about as long as a wrong password for a real account.
        self._dummy_hash = self._hasher.hash(secrets.token_bytes(32))

    async def hash(self, password: str) -> str:
        """Hash `password` in a worker thread and return the encoded Argon2id hash."""
        secret = _encode(password)
        return await trio.to_thread.run_sync(
            self._hasher.hash, secret, limiter=self._limiter
        )

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Check `password` against `stored_hash` in a worker thread.

        A `stored_hash` of None (unknown user) is checked against a fixed dummy
        hash, so the call costs the same and always returns False. A corrupt
        stored hash also returns False instead of raising.
        """
        secret = _encode(password)
        target = self._dummy_hash if stored_hash is None else stored_hash
        matched = await trio.to_thread.run_sync(
            self._check, target, secret, limiter=self._limiter
        )
        return matched and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """Return True if `stored_hash` is weaker than this service's hashes.

        Weaker means another Argon2 variant than Argon2id, or less memory, fewer
        iterations, or a shorter salt or output. A hash made with stronger
        parameters is kept. A corrupt hash also returns True.
        """
        try:
            parameters = extract_parameters(stored_hash)
        except (InvalidHashError, ValueError):  # ValueError: a hash that is not ASCII
            return True
        ours = self._hasher
        return (
            parameters.type is not Type.ID
            or parameters.memory_cost < ours.memory_cost
            or parameters.time_cost < ours.time_cost
            or parameters.salt_len < ours.salt_len
            or parameters.hash_len < ours.hash_len
        )

    def _check(self, stored_hash: str, secret: bytes) -> bool:
        try:
            return self._hasher.verify(stored_hash, secret)
        except VerificationError:
            return False
        except ValueError:  # InvalidHashError, or a hash that is not ASCII
            return False
