"""Micro benchmark of the per-request work of the acceptor's security gate.

Measures, in one process, the cost of what every HTTP request goes through:
resolving the client IP behind a trusted proxy, the block and rate limit
checks (`SecurityGate.check_access`), and the payload rules on a typical path,
query string and header set (`SecurityGate.inspect_request`). Run from the
repository root:

    .venv/bin/python bench/security_gate.py

Each figure is the best of --repeat runs, measured with time.perf_counter, so
it varies with the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeperhub.config import load_settings  # noqa: E402
from workers.acceptor.security_gate import HTTP, SecurityGate  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["main"]

HEADERS = [
    ("host", "hub.example.test"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101"),
    ("accept", "application/json, text/plain, */*"),
    ("accept-language", "en-US,en;q=0.9"),
    ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"),
    ("x-forwarded-for", "198.51.100.7"),
]


def best_rate(run: Callable[[int], None], count: int, repeat: int) -> float:
    """Return the best calls per second of `run(count)` over `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run(count)
        best = min(best, time.perf_counter() - started)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()

    var_dir = Path(tempfile.mkdtemp(prefix="dh-bench-"))
    settings = load_settings(
        {
            "DEEPERHUB_VAR_DIR": str(var_dir),
            "GUARDIAN_SECRET_KEY": "b" * 40,
            "DEEPER_HUB_SECURITY_TRUSTED_PROXIES": "127.0.0.1",
            "DEEPER_HUB_SECURITY_RATE_LIMIT_API": "1000000",
        },
        None,
    )
    gate = SecurityGate(settings)

    def resolve(count: int) -> None:
        for _ in range(count):
            gate.client_ip("127.0.0.1", HEADERS)

    def access(count: int) -> None:
        for index in range(count):
            gate.check_access(f"198.51.100.{index % 250}", HTTP)

    def inspect(count: int) -> None:
        for _ in range(count):
            gate.inspect_request(
                "198.51.100.7",
                "/api/channels/12/messages",
                "after_id=5&limit=50",
                HEADERS,
            )

    for name, run in (
        ("client_ip", resolve),
        ("check_access", access),
        ("inspect_request", inspect),
    ):
        rate = best_rate(run, options.count, options.repeat)
        print(f"{name:<16} {rate:>12,.0f} per second  {1e6 / rate:7.1f} µs each")


if __name__ == "__main__":
    main()
