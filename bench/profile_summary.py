"""Summarize py-spy raw profiles: the functions with the most samples.

    .venv/bin/python bench/profile_summary.py /tmp/profiles/*.txt

Each input line of `py-spy record --format raw` is a `;`-separated stack and
a sample count. For each file this prints the share of samples spent in each
function itself (self time) and in each function or its callees (total).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

__all__ = ["main"]


def summarize(path: Path, top: int = 15) -> None:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"== {path.name}: {samples} samples")
    print("  self:")
    for frame, count in own.most_common(top):
        print(f"    {100 * count / samples:5.1f}%  {frame}")
    print("  total:")
    for frame, count in total.most_common(top + 10)[10:]:
        print(f"    {100 * count / samples:5.1f}%  {frame}")


def main() -> None:
    """Print a summary of each profile given on the command line."""
    for name in sys.argv[1:]:
        summarize(Path(name))


if __name__ == "__main__":
    main()
