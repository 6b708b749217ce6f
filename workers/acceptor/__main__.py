"""Entry point: `python -m workers.acceptor`."""

from __future__ import annotations

from workers.common import run_worker

from .server import serve

run_worker("acceptor", serve)
