"""A Unix-time clock that only moves with the monotonic clock."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SteadyClock"]


class SteadyClock:
    """Unix seconds, read once at start and then advanced by the monotonic clock.

    While the process runs, setting the system clock moves neither block
    expiries nor score recovery. The times it returns are stored, so after a
    restart they are compared with the (possibly corrected) system clock.
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def __call__(self) -> float:
        return self._monotonic() + self._offset
