"""Client IP addresses as text: one reading of loopback and of IPv4-mapped IPv6 for the worker
(cleartext policy, log lines) and the admin client (where a password may go in clear)."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)  # the same few addresses come back all day
def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone (fe80::1%eth0) aside
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: the same client.
    return getattr(ip, "ipv4_mapped", None) or ip


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also written as IPv4-mapped IPv6; False for anything not an IP."""
    ip = _parse(address)
    return ip is not None and ip.is_loopback


def normalized(address: str) -> str:
    """The address as logged (what fail2ban's <HOST> parses): IPv4-mapped IPv6 as IPv4."""
    ip = _parse(address)
    return str(ip) if ip is not None else (address or "unknown")
