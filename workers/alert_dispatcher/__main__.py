"""Entry point: `python -m workers.alert_dispatcher`."""

from __future__ import annotations

from workers.common import run_worker

from .server import serve

run_worker("alert_dispatcher", serve)
