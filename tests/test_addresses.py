"""shared/netaddr.py: one reading of loopback and IPv4-mapped addresses for every caller."""

from __future__ import annotations

import pytest

from shared import netaddr as addresses


@pytest.mark.parametrize("address, loopback, shown", [
    ("127.0.0.1", True, "127.0.0.1"),
    ("127.9.9.9", True, "127.9.9.9"),
    ("::1", True, "::1"),
    ("::ffff:127.0.0.1", True, "127.0.0.1"),
    ("::ffff:192.0.2.7", False, "192.0.2.7"),
    ("2001:db8::7", False, "2001:db8::7"),
    ("fe80::1%eth0", False, "fe80::1"),
    ("", False, "unknown"),
    ("not an address", False, "not an address"),
])
def test_loopback_and_logged_form(address, loopback, shown):
    """Mapped IPv4 reads as IPv4 (loopback included); a non-IP is never loopback."""
    assert addresses.is_loopback(address) is loopback
    assert addresses.normalized(address) == shown
