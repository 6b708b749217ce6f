"""Logging set-up for the supervisor and the workers.

The supervisor writes the runtime log (`<var_dir>/log/runtime.log`: starts,
stops, restarts, exits) and the workers write the application log
(`<var_dir>/log/deeper_hub.log`). Both use WatchedFileHandler, which reopens
the file when logrotate moves it. With `DEEPERHUB_LOG_STDERR=1` (set by the
foreground `start` command) records also go to standard error.

A log file that does not exist yet is created with mode 0600, because logs
contain user ids and client IP addresses. The mode of an existing file is kept, so an
operator may open it to a log reader group (0640).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import TYPE_CHECKING

from .process_metrics import ErrorCountHandler

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["APPLICATION_LOG", "RUNTIME_LOG", "configure_logging"]

RUNTIME_LOG = "runtime.log"
APPLICATION_LOG = "deeper_hub.log"

_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def configure_logging(settings: Settings, filename: str) -> None:
    """Send the `deeperhub` loggers to `<var_dir>/log/<filename>` at the set level."""
    level = getattr(logging, str(settings["logging.level"]).upper())
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(_FORMAT)

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    path = settings.log_dir / filename
    # O_APPEND without O_TRUNC leaves an existing file and its mode as they are.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    file_handler = logging.handlers.WatchedFileHandler(path)
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    if os.environ.get("DEEPERHUB_LOG_STDERR") == "1":
        stream_handler = logging.StreamHandler(sys.stderr)
        stream_handler.setFormatter(formatter)
        root.addHandler(stream_handler)
    root.addHandler(ErrorCountHandler())

    root.setLevel(logging.WARNING)
    logging.getLogger("deeperhub").setLevel(level)
