"""Micro benchmark of a burst of joins of one topic in one acceptor's hub.

N connections of N distinct users join one topic one after the other, in one
process and without sockets: each join pushes `presence_state` to the joiner
and broadcasts the joiner's `presence_diff` to every earlier subscriber. The
script reports the wall time of the whole burst and the bytes queued to the
connections. Run from the repository root:

    .venv/bin/python bench/presence_joins.py --joins 1000

Each figure is the best of --repeat runs, measured with time.perf_counter, so
it varies with the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeperhub.config import Settings, load_settings  # noqa: E402
from deeperhub.phoenix.protocol import VSN_2  # noqa: E402
from workers.acceptor.hub import Hub  # noqa: E402

__all__ = ["main"]

TOPIC = "channel:bench"


def make_settings(var_dir: Path) -> Settings:
    """Return default settings with a temporary var dir and a fixed signing key."""
    config_file = var_dir / "empty.toml"
    config_file.write_text("")
    environ = {
        "DEEPERHUB_VAR_DIR": str(var_dir),
        "GUARDIAN_SECRET_KEY": "bench-key-" + "k" * 40,
    }
    loaded = load_settings(environ, config_file, create_dev_key=False)
    values = dict(loaded.values)
    # Nothing reads the buffers, so the whole burst must fit into them.
    values["websocket.send_queue_bytes"] = 256 * 1_048_576
    return Settings(values=values, config_file=config_file)


async def run_burst(settings: Settings, joins: int) -> tuple[float, int]:
    """Time `joins` new connections joining one topic, one after the other.

    Returns the seconds the joins took, without opening the connections, and
    the bytes queued to the connections.
    """
    hub = Hub(settings)
    connections = [
        hub.open_connection(user_id=user_id, username=f"user{user_id}", vsn=VSN_2)
        for user_id in range(1, joins + 1)
    ]

    started = time.perf_counter()
    for connection in connections:
        subscription = hub.subscribe(connection, TOPIC, "1")
        hub.track_presence(subscription)
        hub.go_live(subscription)
    elapsed = time.perf_counter() - started

    queued = sum(connection.buffered_bytes for connection in connections)
    return elapsed, queued


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--joins",
        type=int,
        default=1000,
        help="number of connections that join the topic",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="number of runs, of which the fastest is reported",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as var_dir:
        settings = make_settings(Path(var_dir))
        results = [
            trio.run(run_burst, settings, args.joins) for _ in range(args.repeat)
        ]
    elapsed, queued = min(results)
    print(
        f"{args.joins} joins of one topic: {elapsed * 1000:.0f} ms "
        f"({elapsed / args.joins * 1e6:.0f} us per join), "
        f"{queued / 1_048_576:.1f} MiB queued"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
