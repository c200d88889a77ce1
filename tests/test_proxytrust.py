"""Trust behind a PROXY header: XCLIENT and the -trusted-networks
exemption belong to the TCP peer speaking for itself (no header, or v2 LOCAL), never to the
client a header names nor to a client the header could not name (v1 UNKNOWN, v2 AF_UNSPEC or
AF_UNIX), which is counted under the balancer's address with none of its trust."""

from __future__ import annotations

import struct

from conftest import RawClient
from shared import proxyprotocol as pp
from shared import refusal
from shared.proxyprotocol import parse, v2_header
from worker import replies as R

V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_UNSPEC = pp.V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
V2_UNIX = (pp.V2_SIGNATURE + bytes([0x21, pp.AF_UNIX << 4 | pp.TRANSPORT_STREAM])
           + struct.pack("!H", 216) + b"/run/haproxy.sock".ljust(108, b"\0") + bytes(108))


def _proxied(server, header: bytes) -> RawClient:
    raw = RawClient(server.port, 10)
    raw.send(header)
    return raw


def test_unknown_sources_are_neither_local_nor_a_health_check():
    """v1 UNKNOWN and v2 PROXY over AF_UNSPEC or AF_UNIX say "source unknown"; only v2 LOCAL
    means the proxy itself."""
    for data in (V1_UNKNOWN, b"PROXY UNKNOWN ffff:f...f:ffff 0 0\r\n", V2_UNSPEC, V2_UNIX):
        header = parse(data)
        assert header.unknown_source and not header.local and header.source is None, data
        assert header.describe().endswith("client unknown")
    local = parse(v2_header(None))
    assert local.local and not local.unknown_source


def test_xclient_trust_is_the_tcp_peers_not_the_headers_client(start_server):
    """A client whose own address is in -trusted-networks, behind a trusted balancer, gets no
    [XCLIENT] greeting, cannot claim TLS with XCLIENT, and stays under -cleartext-auth NEVER;
    the balancer's own v2 LOCAL connection keeps XCLIENT."""
    server = start_server("-proxy-protocol", "-xclient", "-trusted-networks",
                          "127.0.0.1 10.0.0.0/8", "-cleartext-auth", "NEVER")
    client = _proxied(server, v2_header(("10.9.9.9", 4000)))
    greeting = client.line()
    assert greeting.startswith(b"+OK ") and b"[XCLIENT]" not in greeting
    assert client.command("XCLIENT ADDR=198.51.100.1 CLIENT-TRANSPORT=TLS") == \
        R.UNKNOWN_COMMAND.encode()
    assert client.command("USER alice") == R.CLEARTEXT_REFUSED.encode()
    server.wait_for(r"connect from 10\.9\.9\.9:4000")
    balancer = _proxied(server, v2_header(None))
    assert balancer.line().startswith(b"+OK [XCLIENT] ")
    assert balancer.command("XCLIENT ADDR=198.51.100.1 CLIENT-TRANSPORT=TLS").startswith(b"+OK")
    assert balancer.command("USER alice").startswith(b"+OK")
    assert balancer.command("PASS wonderland").startswith(b"+OK")
    for raw in (client, balancer):
        raw.command("QUIT")


def test_unknown_source_gets_no_trust_of_the_balancer(start_server):
    """Behind v1 UNKNOWN, v2 AF_UNSPEC and AF_UNIX headers a client is logged and penalised
    under the balancer's address without its -trusted-networks exemption (one failure blocks
    the next such login with -auth-block 1) and gets no XCLIENT; the balancer's own LOCAL
    connection is still exempt and still trusted."""
    server = start_server("-proxy-protocol", "-xclient", "-trusted-networks", "127.0.0.1",
                          "-cleartext-auth", "ALWAYS", "-auth-delay", "0", "-auth-block", "1")
    clients = [_proxied(server, header) for header in (V1_UNKNOWN, V2_UNSPEC, V2_UNIX)]
    for raw in clients:
        greeting = raw.line()
        assert greeting.startswith(b"+OK ") and b"[XCLIENT]" not in greeting
        assert raw.command("XCLIENT ADDR=198.51.100.1") == R.UNKNOWN_COMMAND.encode()
    server.wait_for(r"PROXY v1 client unknown from 127\.0\.0\.1:\d+")
    first, second, third = clients
    assert first.command("USER alice").startswith(b"+OK")
    assert first.command("PASS wrong").startswith(b"-ERR")
    server.wait_for(r"login failed for alice from 127\.0\.0\.1 port \d+")
    for raw in (second, third):
        assert raw.command("USER alice").startswith(b"+OK")
        assert raw.command("PASS wonderland") == R.ADDRESS_BLOCKED.encode()
    server.wait_for(r"login refused: too many failures from 127\.0\.0\.1")
    balancer = _proxied(server, v2_header(None))
    assert balancer.line().startswith(b"+OK [XCLIENT] ")
    assert balancer.command("USER alice").startswith(b"+OK")
    assert balancer.command("PASS wonderland").startswith(b"+OK")
    for raw in (first, balancer):
        raw.command("QUIT")


def test_unknown_sources_count_under_the_balancers_address(start_server):
    """-max-per-address counts clients of unknown source under the balancer's address (the
    only one known), while a client the header names counts under its own."""
    server = start_server("-proxy-protocol", "-trusted-networks", "127.0.0.1",
                          "-max-per-address", "1", "-cleartext-auth", "ALWAYS")
    first = _proxied(server, V1_UNKNOWN)
    assert first.line().startswith(b"+OK")
    second = _proxied(server, V2_UNSPEC)
    assert second.line() + b"\r\n" == refusal.TOO_MANY_FROM_ADDRESS
    named = _proxied(server, v2_header(("192.0.2.7", 5555)))
    assert named.line().startswith(b"+OK")
    for raw in (first, named):
        raw.command("QUIT")
