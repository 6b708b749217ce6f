"""Entry point: `python -m workers.db_writer`."""

from __future__ import annotations

from workers.common import run_worker

from .server import serve

__all__: list[str] = []

run_worker("db_writer", serve)
