"""Client addresses as the limits, the logs and the cleartext policy see them: normalised,
IPv6 aggregated per prefix, loopback, and the ``-trusted-networks`` list.

One IPv6 subscriber holds a whole /64 (often more), so a limit keyed by the exact address is
none at all; an IPv4-mapped address (``::ffff:192.0.2.1`` on a dual-stack socket) is the IPv4
address. Used by the supervisor (``-max-per-address``), the workers' failed-login guard,
cleartext policy and log lines, the admin client (where a password may go in clear), and the
settings (parsing ``-trusted-networks``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)  # the same few addresses come back all day
def parse_address(text: str) -> Address | None:
    """The address, IPv4-mapped ones as IPv4 and without an IPv6 zone; None if not an IP.
    A dual-stack listener sees IPv4 clients as ``::ffff:a.b.c.d``: the same client."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(text: str) -> bool:
    """127.0.0.0/8 or ::1, also written as IPv4-mapped IPv6; False for anything not an IP."""
    address = parse_address(text)
    return address is not None and address.is_loopback


def normalized(text: str) -> str:
    """The address as logged (what fail2ban's <HOST> parses): IPv4-mapped IPv6 as IPv4."""
    address = parse_address(text)
    return str(address) if address is not None else (text or "unknown")


@functools.lru_cache(maxsize=4096)  # the same few addresses come back all day
def limit_key(text: str, ipv6_prefix: int = 64) -> str:
    """What a per-address limit counts: the IPv4 address, or the IPv6 network of
    ``ipv6_prefix`` bits around it (``2001:db8:1:2::/64``); other text as it is."""
    address = parse_address(text)
    if address is None:
        return text
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


def parse_networks(specs: Iterable[str]) -> tuple[str, ...]:
    """Canonical CIDR strings for ``-trusted-networks`` (space or comma separated; a bare
    address is a /32 or /128); ValueError names the first bad one."""
    networks: list[str] = []
    for spec in specs:
        for word in spec.replace(",", " ").split():
            try:
                network = ipaddress.ip_network(word, strict=False)
            except ValueError:
                raise ValueError(f"{word!r} is not an address or network (CIDR)") from None
            networks.append(str(network))
    return tuple(networks)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[IPv6]:PORT`` as (address, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets: its last group is no port
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or (
            parse_address(host) is None):
        raise ValueError(f"{text!r} is not ADDR:PORT (an IPv6 address in brackets)")
    return host, int(port)


def parse_endpoints(values: tuple[str, ...]) -> tuple[str, ...]:
    """Checked ``ADDR:PORT`` words, as given (each may hold several, space separated)."""
    words = tuple(w for value in values for w in value.replace(",", " ").split())
    for word in words:
        parse_endpoint(word)
    return words


class Networks:
    """A parsed network list; ``contains`` answers for an address given as text."""

    def __init__(self, specs: Iterable[str] = ()):
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n)
                                                   for n in parse_networks(specs))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, text: str) -> bool:
        address = parse_address(text)
        return address is not None and any(
            address.version == n.version and address in n for n in self.networks)


def host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:9110`` or ``[::1]:9110`` as (address, port); ValueError says what is wrong
    (an address and a port are both required: a listener on every interface is asked for
    explicitly with ``0.0.0.0:PORT`` or ``[::]:PORT``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"wants ADDRESS:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"wants an IPv6 address in brackets ([::1]:PORT), not {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"wants an IP address before the port, not {host!r}") from None
    return host, int(port)
