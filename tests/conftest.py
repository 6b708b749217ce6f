"""Shared fixtures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running daemon with an empty data directory, stopped after the test."""
    instance = Daemon(tmp_path / "var")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
