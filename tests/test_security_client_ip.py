"""Client address resolution behind trusted proxies (sans-I/O)."""

from __future__ import annotations

import pytest

from deeperhub.security.addresses import AddressSet, canonical_ip
from deeperhub.security.client_ip import (
    FORWARDED,
    forwarded_for_values,
    resolve_client_ip,
)

PROXIES = AddressSet(["10.0.0.0/8", "2001:db8:ffff::1"])


def xff(*values: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-For", value) for value in values]


def test_untrusted_peer_header_ignored() -> None:
    headers = xff("198.51.100.7")
    assert resolve_client_ip("203.0.113.5", headers, PROXIES) == "203.0.113.5"


def test_no_trusted_proxies_uses_peer() -> None:
    headers = xff("198.51.100.7")
    assert resolve_client_ip("10.0.0.2", headers, AddressSet()) == "10.0.0.2"


def test_trusted_peer_rightmost_untrusted_hop() -> None:
    # The client forged the first entry; the proxy appended the real address.
    headers = xff("127.0.0.1, 198.51.100.7")
    assert resolve_client_ip("10.0.0.2", headers, PROXIES) == "198.51.100.7"


def test_trusted_hops_skipped() -> None:
    headers = xff("192.0.2.44, 198.51.100.7, 10.1.1.1", "10.2.2.2")
    assert resolve_client_ip("10.0.0.2", headers, PROXIES) == "198.51.100.7"


def test_all_hops_trusted_uses_leftmost() -> None:
    headers = xff("10.9.9.9, 10.1.1.1")
    assert resolve_client_ip("10.0.0.2", headers, PROXIES) == "10.9.9.9"


@pytest.mark.parametrize("bad", ["unknown", "_hidden", "not-an-ip", ""])
def test_invalid_hop_stops_at_last_trusted(bad: str) -> None:
    headers = xff(f"198.51.100.7, {bad}, 10.1.1.1")
    assert resolve_client_ip("10.0.0.2", headers, PROXIES) == "10.1.1.1"


def test_hop_with_port() -> None:
    assert resolve_client_ip("10.0.0.2", xff("198.51.100.7:4711"), PROXIES) == (
        "198.51.100.7"
    )
    assert resolve_client_ip("10.0.0.2", xff("[2001:db8::7]:4711"), PROXIES) == (
        "2001:db8::7"
    )


def test_forwarded_header_parsed() -> None:
    headers = [
        ("Forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43"),
        ("Forwarded", 'for="[2001:db8:cafe::17]:4711", for=10.3.3.3'),
    ]
    resolved = resolve_client_ip("10.0.0.2", headers, PROXIES, FORWARDED)
    assert resolved == "2001:db8:cafe::17"


def test_forwarded_ignored_when_xff_configured() -> None:
    headers = [("Forwarded", "for=192.0.2.60"), ("X-Forwarded-For", "198.51.100.7")]
    assert resolve_client_ip("10.0.0.2", headers, PROXIES) == "198.51.100.7"
    forwarded = resolve_client_ip("10.0.0.2", headers, PROXIES, FORWARDED)
    assert forwarded == "192.0.2.60"


def test_forwarded_quoted_separators() -> None:
    values = forwarded_for_values(['for="_a,b;c";proto=https, by=x'])
    assert values == ["_a,b;c", ""]


def test_mapped_ipv6_peer_canonical() -> None:
    assert resolve_client_ip("::ffff:192.0.2.9", [], PROXIES) == "192.0.2.9"
    assert canonical_ip("[2001:DB8::1]") == "2001:db8::1"


def test_address_set_membership() -> None:
    assert "10.200.0.1" in PROXIES
    assert "2001:db8:ffff::1" in PROXIES
    assert "11.0.0.1" not in PROXIES
    assert "garbage" not in PROXIES


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "300.1.1.1", "host.example"])
def test_address_set_rejects_invalid(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        AddressSet([entry])
