"""The client address of a request, honouring trusted reverse proxies.

The client is the socket peer, unless the peer is a trusted proxy. Then the
proxy header (`X-Forwarded-For`, or `Forwarded` from RFC 7239, whichever
`security.proxy_header` names) is read from the right: each proxy appends the
address it received the request from, so the rightmost entries were written by
our own proxies and everything left of the first untrusted entry may be forged
by the client. The walk skips trusted entries and stops at the first untrusted
one, which is the client.

An entry that is not an IP address (`unknown`, an obfuscated `_hidden` node, a
typo) ends the walk at the last trusted hop, because nothing to its left can be
trusted. Only the configured header is read, so a client cannot add the other
one to pick its own address.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .addresses import canonical_ip

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .addresses import AddressSet

__all__ = [
    "FORWARDED",
    "MAX_HOPS",
    "X_FORWARDED_FOR",
    "forwarded_for_values",
    "resolve_client_ip",
]

X_FORWARDED_FOR = "x-forwarded-for"
FORWARDED = "forwarded"
# Entries read from the right of a proxy header. A longer chain ends at the
# last trusted hop, as if the next entry were invalid.
MAX_HOPS = 32


def resolve_client_ip(
    peer: str,
    headers: Iterable[tuple[str, str]],
    trusted: AddressSet,
    header: str = X_FORWARDED_FOR,
) -> str:
    """Return the canonical client IP of a request from `peer` with `headers`.

    `headers` are (name, value) pairs in any case, repeated names allowed and
    read in order. `header` is `x-forwarded-for` or `forwarded`.
    """
    client = canonical_ip(peer) or peer
    if not trusted or client not in trusted:
        return client

    wanted = header.lower()
    values = [value for name, value in headers if name.lower() == wanted]
    if wanted == FORWARDED:
        hops = forwarded_for_values(values)
    else:
        hops = [item.strip() for value in values for item in value.split(",")]

    for hop in reversed(hops[-MAX_HOPS:]):
        address = _hop_address(hop)
        if address is None:
            break
        client = address
        if address not in trusted:
            break
    return client


def _hop_address(hop: str) -> str | None:
    """Return the canonical IP of one proxy-header entry, with or without a port."""
    hop = hop.strip().strip('"')
    address = canonical_ip(hop)
    if address is not None:
        return address
    if hop.startswith("["):
        # "[2001:db8::1]:4711"
        end = hop.find("]")
        return canonical_ip(hop[1:end]) if end > 0 else None
    if hop.count(":") == 1:
        # "192.0.2.1:4711"
        return canonical_ip(hop.split(":", 1)[0])
    return None


def forwarded_for_values(values: Iterable[str]) -> list[str]:
    """Return the `for=` value of each element of `Forwarded` headers, in order.

    An element without `for=` yields an empty string, which ends the walk in
    `resolve_client_ip` like any other invalid entry.
    """
    hops: list[str] = []
    for value in values:
        for element in _split_quoted(value, ","):
            found = ""
            for pair in _split_quoted(element, ";"):
                name, _, raw = pair.partition("=")
                if name.strip().lower() == "for":
                    found = _unquote(raw.strip())
                    break
            hops.append(found)
    return hops


def _split_quoted(text: str, separator: str) -> list[str]:
    """Split `text` at `separator` outside double-quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value
