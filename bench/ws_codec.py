"""Micro benchmark of the WebSocket frame codec in deeperhub/ws/frames.py.

Reports how many small masked text frames per second FrameParser.feed parses,
its throughput on 1 MiB masked binary frames, and how fast the encoder builds
small text frames and 64 KiB binary frames. Run from the repository root:

    .venv/bin/python bench/ws_codec.py

Each figure is the best of --repeat runs, measured with time.perf_counter in one
process, so it varies with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeperhub.ws.frames import (  # noqa: E402
    FrameParser,
    Opcode,
    encode_frame,
    encode_text,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["main"]


def mask_client_frame(frame: bytes, mask: bytes) -> bytes:
    """Turn an unmasked server frame into the masked frame a client would send."""
    length = frame[1]
    if length >= 126:
        header_size = 4 if length == 126 else 10
    else:
        header_size = 2
    payload = frame[header_size:]
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    masked = bytes(byte ^ key_byte for byte, key_byte in zip(payload, key, strict=True))
    return bytes((frame[0], frame[1] | 0x80)) + frame[2:header_size] + mask + masked


def best_time(function: Callable[[], object], repeat: int) -> float:
    """Run `function` `repeat` times and return the shortest time in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bench_parse_small(count: int, size: int, chunk: int, repeat: int) -> None:
    """Print the rate of parsing masked text frames, fed `chunk` bytes per call."""
    frame = mask_client_frame(encode_text("x" * size), os.urandom(4))
    stream = frame * count
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]

    def run() -> None:
        parser = FrameParser(max_message_size=1 << 20)
        events = 0
        for data in chunks:
            events += len(parser.feed(data))
        assert events == count, events

    seconds = best_time(run, repeat)
    print(
        f"parse  {size}-byte masked text frames, {chunk:5}-byte reads: "
        f"{count / seconds:12,.0f} frames/s"
    )


def bench_parse_large(count: int, size: int, chunk: int, repeat: int) -> None:
    """Print the rate of parsing masked binary frames of `size` bytes."""
    payload = os.urandom(size)
    frame = mask_client_frame(encode_frame(Opcode.BINARY, payload), os.urandom(4))
    stream = frame * count
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]

    def run() -> None:
        parser = FrameParser(max_message_size=size)
        events = 0
        for data in chunks:
            events += len(parser.feed(data))
        assert events == count, events

    seconds = best_time(run, repeat)
    print(
        f"parse  {size >> 10} KiB masked binary frames, {chunk}-byte reads: "
        f"{size * count / seconds / 1e6:12,.0f} MB/s"
    )


def bench_encode(count: int, size: int, repeat: int) -> None:
    """Print the rate of encoding small text frames and large binary frames."""
    text = "x" * size
    data = text.encode()
    large = os.urandom(1 << 16)
    large_count = 2_000

    def run_str() -> None:
        for _ in range(count):
            encode_text(text)

    def run_bytes() -> None:
        for _ in range(count):
            encode_text(data)

    def run_large() -> None:
        for _ in range(large_count):
            encode_frame(Opcode.BINARY, large)

    for label, function in (("str", run_str), ("bytes", run_bytes)):
        seconds = best_time(function, repeat)
        print(
            f"encode {size}-byte text frames from {label:5}: "
            f"{count / seconds:12,.0f} frames/s"
        )
    seconds = best_time(run_large, repeat)
    print(
        f"encode 64 KiB binary frames: "
        f"{len(large) * large_count / seconds / 1e6:12,.0f} MB/s"
    )


def main() -> None:
    """Parse the options and print one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count", type=int, default=200_000, help="number of small frames per run"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=32,
        help="payload size of the small frames, in bytes",
    )
    parser.add_argument(
        "--chunk", type=int, default=65536, help="bytes passed to each feed call"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="timed runs per figure, the fastest is shown",
    )
    options = parser.parse_args()

    print(f"Python {sys.version.split()[0]}, best of {options.repeat} runs")
    bench_parse_small(options.count, options.size, options.chunk, options.repeat)
    frame_size = len(encode_text("x" * options.size)) + 4
    bench_parse_small(options.count, options.size, frame_size, options.repeat)
    bench_parse_large(64, 1 << 20, options.chunk, options.repeat)
    bench_encode(options.count, options.size, options.repeat)


if __name__ == "__main__":
    main()
