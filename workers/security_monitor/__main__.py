"""Entry point: `python -m workers.security_monitor`."""

from __future__ import annotations

from workers.common import run_worker

from .server import serve

run_worker("security_monitor", serve)
