"""The security layer's logic, kept free of I/O so that it runs under test clocks.

- `addresses`: IP addresses, address and CIDR sets (trusted proxies, allowlist).
- `client_ip`: the client address behind trusted proxies.
- `rate_limit`: per-key request limits on a monotonic clock.
- `rules`: the payload rule set (SQL and script injection, path traversal, ...).
- `anomaly`, `reputation`, `blocks`: what the security monitor counts and decides.
- `policy`: the security monitor's decisions, built from the three above.
- `alerts`: alert records, grouping of repeats, retry delays, webhook signatures.
- `decisions`: the acceptor's cache of the monitor's decisions.
- `config`: the security settings, read and cross-checked.
- `links`: the reconnecting Unix socket link the workers share (the one I/O part).
"""

from __future__ import annotations

__all__: list[str] = []
