"""Objects shared by the tasks of one acceptor process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deeperhub.auth.passwords import PasswordService
    from deeperhub.auth.tokens import TokenService
    from deeperhub.config import Settings
    from deeperhub.ipc import RpcClient
    from deeperhub.storage.reads import ReadPool

    from .hub import Hub
    from .pushes import PushPipeline
    from .security_gate import SecurityGate
    from .token_watch import TokenWatch

__all__ = ["Services"]


@dataclass
class Services:
    """Shared state of an acceptor: settings, clients of other workers, the hub."""

    settings: Settings
    db: RpcClient  # requests to the DB writer (db.sock)
    reads: ReadPool  # read-only SQLite connections
    tokens: TokenService
    passwords: PasswordService
    hub: Hub
    worker_id: str = "acceptor"
    # Requests to the supervisor (status for /health); None in unit tests.
    supervisor: RpcClient | None = None
    # Expiry and revocation of WebSocket tokens, security events; None in unit
    # tests that do not need it.
    token_watch: TokenWatch | None = None
    # Client IPs, blocks, rate limits and payload rules; None in unit tests
    # that do not need it.
    security: SecurityGate | None = None
    # Pipelined `insert_message` requests of WebSocket pushes; None in unit
    # tests, where each push waits for its reply on `db`.
    pushes: PushPipeline | None = None
