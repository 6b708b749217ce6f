"""Exception hierarchy: one root, one subclass per domain."""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "DeeperHubError",
    "ProtocolError",
    "StorageError",
    "SupervisionError",
]


class DeeperHubError(Exception):
    """Root of every error DeeperHub raises on purpose."""


class ConfigError(DeeperHubError):
    """A setting is missing or invalid. The message names the setting and the value."""


class AuthError(DeeperHubError):
    """A credential or token was rejected."""


class ProtocolError(DeeperHubError):
    """A peer sent bytes that break the wire protocol (IPC, WebSocket or Phoenix)."""


class StorageError(DeeperHubError):
    """A database operation failed. `code` is the stable error code sent to clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SupervisionError(DeeperHubError):
    """A child process failed to start or crashed too often."""
