"""IP addresses in canonical form, and sets of addresses and CIDR networks."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["AddressSet", "IPAddress", "canonical_ip", "parse_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_KNOWN_MAX = 8192


# Parsing is the costly part of resolving a client IP, and requests repeat the
# same few addresses, so results are cached.
@lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress | None:
    """Parse an IPv4 or IPv6 address, or return None.

    Brackets around an IPv6 address and a zone id (`fe80::1%eth0`) are
    accepted. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) becomes the IPv4
    address, so one client has one identity on a dual-stack socket.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def canonical_ip(text: str) -> str | None:
    """Return the canonical text of an IP address (`parse_ip`), or None."""
    address = parse_ip(text)
    return None if address is None else str(address)


class AddressSet:
    """Addresses and CIDR networks, such as the trusted proxies or the allowlist.

    Raises ValueError naming the first entry that is neither an address nor a
    network.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries: tuple[str, ...] = tuple(entry.strip() for entry in entries)
        self._networks: list[IPNetwork] = []
        for entry in self.entries:
            self._networks.append(_parse_network(entry))
        # Membership of recently checked address strings.
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not self._networks:
            return False
        if isinstance(address, str):
            known = self._known.get(address)
            if known is None:
                if len(self._known) >= _KNOWN_MAX:
                    self._known.clear()
                known = self._known[address] = self._contains(parse_ip(address))
            return known
        if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return self._contains(address)
        return False

    def _contains(self, parsed: IPAddress | None) -> bool:
        if parsed is None:
            return False
        return any(
            parsed.version == network.version and parsed in network
            for network in self._networks
        )


def _parse_network(entry: str) -> IPNetwork:
    if "/" not in entry:
        address = parse_ip(entry)
        if address is None:
            raise ValueError(f"invalid address {entry!r}: expected an IP or a CIDR")
        return ipaddress.ip_network(address)
    try:
        return ipaddress.ip_network(entry, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"invalid network {entry!r}: {exc} (write the network address, "
            "for example 10.0.0.0/8)"
        ) from None
