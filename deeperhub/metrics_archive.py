"""Fold the metric files of exited processes into one archive file per kind.

In multiprocess mode every process writes `counter_<pid>.db`,
`histogram_<pid>.db` and `gauge_<mode>_<pid>.db` under
`$PROMETHEUS_MULTIPROC_DIR`, and a scrape reads all of them. Without upkeep
each worker restart would leave files that every later scrape reads again.

`fold_dead_process` moves one exited process's samples into
`<kind>_archive.db` with the same arithmetic a scrape applies, so the scraped
values do not change:

- counters, histograms, summaries and `sum` gauges are added;
- `max` and `min` gauges keep the larger or the smaller value;
- `mostrecent` gauges keep the sample with the newer timestamp.

`live*` gauge files are removed instead (a dead process's value must
disappear), and `all` gauges are left alone, because their samples carry the
pid as a label.

A scrape that read the archive before a fold and the dead file after it would
count the same samples twice. One that read them in the other order would miss
them. Either shows as a counter reset. So folds hold an exclusive `flock` on
`.files.lock` in the folder, and scrapes hold a shared one (`scrape_lock`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.mmap_dict import MmapedDict

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["ARCHIVE", "dead_pids", "fold_dead_process", "scrape_lock"]

log = logging.getLogger("deeperhub.metrics")

ARCHIVE = "archive"
LOCK_FILE = ".files.lock"

# `counter_123.db`, `histogram_123.db`, `summary_123.db`, `gauge_livesum_123.db`.
_PROCESS_FILE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db$")
_ADDED = frozenset({"counter", "histogram", "summary", "gauge_sum"})
_FOLDED = _ADDED | {"gauge_max", "gauge_min", "gauge_mostrecent"}


@contextmanager
def _locked(directory: str | os.PathLike[str], operation: int) -> Iterator[None]:
    fd = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def scrape_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a shared lock while the files of `directory` are read."""
    with _locked(directory, fcntl.LOCK_SH):
        yield


def dead_pids(
    directory: str | os.PathLike[str], exists: Callable[[int], bool]
) -> list[int]:
    """Return the pids with metric files in `directory` for which `exists` is false."""
    pids: set[int] = set()
    for name in os.listdir(directory):
        match = _PROCESS_FILE.match(name)
        if match:
            pids.add(int(match.group(2)))
    return sorted(pid for pid in pids if not exists(pid))


def fold_dead_process(directory: str | os.PathLike[str], pid: int) -> int:
    """Fold the metric files of the exited process `pid` and return how many went."""
    folder = Path(directory)
    removed = 0
    with _locked(folder, fcntl.LOCK_EX):
        for path in sorted(folder.glob(f"*_{pid}.db")):
            match = _PROCESS_FILE.match(path.name)
            if match is None or int(match.group(2)) != pid:
                continue
            kind = match.group(1)
            if kind.startswith("gauge_live"):
                path.unlink()
            elif kind not in _FOLDED:
                continue
            else:
                try:
                    samples = list(MmapedDict.read_all_values_from_file(str(path)))
                except (OSError, ValueError, struct.error) as exc:
                    # A scrape cannot read it either, so dropping it loses nothing.
                    log.warning(
                        "dropped invalid metric file %s of exited process %d: %s",
                        path,
                        pid,
                        exc,
                    )
                else:
                    _fold_samples(samples, folder / f"{kind}_{ARCHIVE}.db", kind)
                path.unlink()
            removed += 1
    return removed


def _fold_samples(
    samples: list[tuple[str, float, float, int]], archive_path: Path, kind: str
) -> None:
    archive = MmapedDict(str(archive_path))
    try:
        known = {key: (value, ts) for key, value, ts in archive.read_all_values()}
        for key, value, timestamp, _ in samples:
            if key in known:
                value, timestamp = _combine(kind, *known[key], value, timestamp)
            known[key] = (value, timestamp)
            archive.write_value(key, value, timestamp)
    finally:
        archive.close()


def _combine(
    kind: str, old: float, old_timestamp: float, value: float, timestamp: float
) -> tuple[float, float]:
    """Return the archived sample for `key` after one more process's sample."""
    if kind in _ADDED:
        return old + value, max(old_timestamp, timestamp)
    if kind == "gauge_max":
        return max(old, value), max(old_timestamp, timestamp)
    if kind == "gauge_min":
        return min(old, value), max(old_timestamp, timestamp)
    if kind == "gauge_mostrecent":
        return (value, timestamp) if timestamp > old_timestamp else (old, old_timestamp)
    raise AssertionError(f"no rule to fold metric files of kind {kind!r}")
