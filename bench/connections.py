"""Idle connections: resident memory per connection and time to connect.

Opens N WebSocket connections (10,000 by default) to DeeperHub, each with an
access token, keeps them idle, and reports the growth of the servers'
resident memory divided by N and the time to open them all. The same figures
are measured in the same run for `bench/baseline_websockets.py`, which checks
no token.

    .venv/bin/python bench/connections.py
    .venv/bin/python bench/connections.py --connections 2000 --join

DeeperHub's memory is the sum over its processes (supervisor and workers);
the acceptors hold the connections, the other processes do not grow. The
open-file limit is raised to the hard limit, and connections come from
several source addresses (127.0.0.1 to 127.0.0.N) so that ephemeral ports
do not run out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout import baseline_server, deeperhub_server, prepare_deeperhub  # noqa: E402
from wsload import open_clients, phoenix, raise_file_limit  # noqa: E402

__all__ = ["main"]


def session_rss(session: int) -> int:
    """Return the resident memory in bytes of the processes of a session."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            with open(f"/proc/{entry}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * page
        except OSError:
            continue
    return total


def measure(
    port: int, session: int, query: str, options: argparse.Namespace
) -> dict[str, Any]:
    """Open the connections, wait for the memory to settle, and close them."""
    before = session_rss(session)
    start = time.monotonic()
    clients = open_clients(
        "127.0.0.1", port, query, options.connections, sources=options.sources
    )
    seconds = time.monotonic() - start
    if options.join:
        message = phoenix("1", "1", "channel:bench", "phx_join", {})
        for client in clients:
            client.sock.setblocking(True)
            client.sock.sendall(message)
    time.sleep(options.settle)
    after = session_rss(session)
    for client in clients:
        client.sock.close()
    return {
        "connections": len(clients),
        "connect_seconds": round(seconds, 2),
        "connections_per_second": round(len(clients) / seconds),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "bytes_per_connection": round((after - before) / len(clients)),
    }


def main() -> None:
    """Run both measurements and print JSON lines and a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument(
        "--join", action="store_true", help="also join one topic per connection"
    )
    parser.add_argument("--acceptors", default="")
    options = parser.parse_args()
    limit = raise_file_limit()
    if limit < options.connections + 100:
        sys.exit(f"open-file limit {limit} is too low for {options.connections}")

    extra = {"DEEPERHUB_ACCEPTORS": options.acceptors} if options.acceptors else {}
    results = {}
    with baseline_server() as (port, session):
        results["websockets"] = measure(port, session, "vsn=2.0.0", options)
        print(json.dumps({"server": "websockets", **results["websockets"]}))
    with deeperhub_server(extra) as (port, session):
        subscriber_query, _ = prepare_deeperhub(port)
        results["DeeperHub"] = measure(port, session, subscriber_query, options)
        print(json.dumps({"server": "deeperhub", **results["DeeperHub"]}))

    print()
    print(
        "| server | connections | seconds to connect | RSS growth | bytes/connection |"
    )
    print("|---|---|---|---|---|")
    for name, result in results.items():
        growth = result["rss_after_mib"] - result["rss_before_mib"]
        print(
            f"| {name} | {result['connections']} | {result['connect_seconds']} "
            f"| {growth:.1f} MiB | {result['bytes_per_connection']} |"
        )


if __name__ == "__main__":
    main()
