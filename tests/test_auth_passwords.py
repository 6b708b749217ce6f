"""PasswordService: Argon2id parameters, verification and thread offloading."""

from __future__ import annotations

import statistics
import time

import pytest
import trio
import trio.lowlevel
from argon2 import extract_parameters

from deeperhub.auth.passwords import (
    DEFAULT_MEMORY_COST,
    DEFAULT_PARALLELISM,
    DEFAULT_TIME_COST,
    PasswordService,
)


@pytest.fixture(scope="module")
def production() -> PasswordService:
    return PasswordService()


@pytest.fixture(scope="module")
def cheap() -> PasswordService:
    return PasswordService(memory_cost=1024, time_cost=1)


def test_defaults_meet_owasp_minimum() -> None:
    assert DEFAULT_MEMORY_COST >= 19456
    assert DEFAULT_TIME_COST >= 2
    assert DEFAULT_PARALLELISM == 1


async def test_hash_uses_argon2id_defaults(production: PasswordService) -> None:
    encoded = await production.hash("correct horse battery staple")
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    parameters = extract_parameters(encoded)
    assert parameters.memory_cost == DEFAULT_MEMORY_COST
    assert parameters.time_cost == DEFAULT_TIME_COST
    assert parameters.parallelism == DEFAULT_PARALLELISM


async def test_hash_is_salted(cheap: PasswordService) -> None:
    first = await cheap.hash("same password")
    second = await cheap.hash("same password")
    assert first != second


async def test_verify_accepts_right_password(cheap: PasswordService) -> None:
    encoded = await cheap.hash("s3cret-passw0rd")
    assert await cheap.verify(encoded, "s3cret-passw0rd") is True


async def test_verify_rejects_wrong_password(cheap: PasswordService) -> None:
    encoded = await cheap.hash("s3cret-passw0rd")
    assert await cheap.verify(encoded, "s3cret-passw0rD") is False
    assert await cheap.verify(encoded, "") is False


async def test_verify_unknown_user_is_false(cheap: PasswordService) -> None:
    assert await cheap.verify(None, "anything") is False
    assert await cheap.verify(None, "") is False


@pytest.mark.parametrize(
    "stored",
    ["", "not a hash", "$argon2id$v=19$m=1,t=1,p=1$AAAA$AAAA", "$2b$12$x", "é"],
)
async def test_verify_corrupt_hash_is_false(
    cheap: PasswordService, stored: str
) -> None:
    assert await cheap.verify(stored, "password") is False


async def test_non_ascii_and_surrogate_passwords(cheap: PasswordService) -> None:
    for password in ("pässwörd-ü", "密码密码密码密码", "\ud800lone-surrogate"):
        encoded = await cheap.hash(password)
        assert await cheap.verify(encoded, password) is True
        assert await cheap.verify(encoded, password + "x") is False


async def test_unknown_user_costs_a_real_verify(production: PasswordService) -> None:
    encoded = await production.hash("a real password")

    async def median_seconds(stored: str | None) -> float:
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            await production.verify(stored, "a wrong password")
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    known = await median_seconds(encoded)
    unknown = await median_seconds(None)
    # Both run one Argon2id computation with the same parameters; the bound is
    # loose so that a loaded test machine does not make this flaky.
    assert unknown > known * 0.5
    assert known > unknown * 0.5


async def test_hashing_does_not_block_event_loop(production: PasswordService) -> None:
    ticks = 0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        await production.hash("a password to hash")
        during = ticks - before
        done.set()
    # A hash on the event loop thread would let the ticker run at most once.
    assert during > 5


async def test_concurrent_verifies_all_complete(cheap: PasswordService) -> None:
    encoded = await cheap.hash("shared")
    results: list[bool] = []

    async def check(password: str) -> None:
        results.append(await cheap.verify(encoded, password))

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(check, "shared" if index % 2 else "other")
    assert sorted(results) == [False] * 10 + [True] * 10


async def test_needs_rehash(
    production: PasswordService, cheap: PasswordService
) -> None:
    strong = await production.hash("password")
    weak = await cheap.hash("password")
    assert production.needs_rehash(strong) is False
    assert production.needs_rehash(weak) is True
    assert cheap.needs_rehash(weak) is False
    assert production.needs_rehash("not a hash") is True
    assert production.needs_rehash("é") is True
