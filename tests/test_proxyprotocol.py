"""PROXY protocol v1 and v2 (issue 14 item 1): the sans-IO parser with hypothesis, then the real
server behind hand-made headers (what a real HAProxy sends is in tests/test_haproxy.py).

The supervisor reads the header before the hand-off (supervisor/proxyintake.py), so the client's
own address is what the log, -max-per-address, the failed-login penalty and the cleartext policy
see; a header from outside -trusted-networks, a bad one or none within 3 s closes the connection.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from conftest import ROOT, RawClient, make_cert
from processes import wait_until
from shared import proxyprotocol as pp
from shared import refusal
from shared.proxyprotocol import ProxyError, header_length, parse, tlv, v2_header
from worker import replies as R

SSL_TLV = tlv(pp.PP2_TYPE_SSL, b"\x01" + bytes(4) + tlv(pp.PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"))


# -- the parser ---------------------------------------------------------------------------------
def test_v1_tcp4_tcp6_and_unknown():
    """v1 lines give the client's address and port; UNKNOWN is a client of unknown source."""
    header = parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\n")
    assert (header.version, header.local) == (1, False)
    assert header.source == ("192.0.2.7", 56324) and header.destination == ("198.51.100.1", 110)
    header = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 995\r\n")
    assert header.source == ("2001:db8::7", 65535)
    assert parse(b"PROXY UNKNOWN\r\n").unknown_source
    assert parse(b"PROXY UNKNOWN ffff:f...f:ffff 0 0\r\n").unknown_source


def test_v2_proxy_local_and_tlvs():
    """v2 PROXY over IPv4 and IPv6 with its TLVs (SSL client flag, authority); LOCAL is local."""
    header = parse(v2_header(("192.0.2.7", 5555), ("198.51.100.1", 110),
                             tlv(pp.PP2_TYPE_AUTHORITY, b"pop.example.org") + SSL_TLV))
    assert header.source == ("192.0.2.7", 5555) and not header.local
    assert header.tls and header.tls_version == "TLSv1.3"
    assert header.authority == "pop.example.org"
    assert "TLS TLSv1.3" in header.describe() and "authority pop.example.org" in header.describe()
    assert parse(v2_header(("2001:db8::9", 1))).source == ("2001:db8::9", 1)
    assert parse(v2_header(None)).local
    no_client_ssl = tlv(pp.PP2_TYPE_SSL, b"\x00" + bytes(4))
    assert not parse(v2_header(("192.0.2.7", 1), tlvs=no_client_ssl)).tls


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.0\r\n",                                        # not a header at all
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\n",              # LF without CR
    b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 110\r\n",           # leading zero
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 110\r\n",            # port out of range
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 110\r\n",              # wrong family
    b"PROXY TCP4 192.0.2.7  198.51.100.1 1 110\r\n",               # two spaces
    b"PROXY UDP4 192.0.2.7 198.51.100.1 1 110\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
    pp.V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),               # version 1 in the v2 form
    pp.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),              # command 2
    pp.V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),              # PROXY over UDP
    pp.V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),               # shorter than its addresses
    v2_header(("192.0.2.7", 1), tlvs=b"\x02\x00\x09abc"),          # TLV longer than the header
    v2_header(("192.0.2.7", 1), tlvs=b"\x02\x00"),                 # TLV cut short
    v2_header(("192.0.2.7", 1), tlvs=tlv(pp.PP2_TYPE_SSL, b"\x01")),  # SSL TLV too short
])
def test_malformed_headers_are_errors(data):
    """Whatever the specification does not allow is a ProxyError, never a guess."""
    with pytest.raises(ProxyError):
        parse(data)


def test_oversized_headers_are_refused_early():
    """A v1 line past 107 bytes or a v2 length past our limit is refused from its first bytes."""
    with pytest.raises(ProxyError):
        header_length(b"PROXY TCP4 " + b"1" * 200)
    big = pp.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", pp.V2_MAX_PAYLOAD + 1)
    with pytest.raises(ProxyError):
        header_length(big)


def test_length_never_reaches_past_the_header():
    """Every prefix of a header needs more; the whole one is its own length even with the
    client's next bytes (a TLS ClientHello) behind it."""
    for header in (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\n",
                   v2_header(("192.0.2.7", 5555), tlvs=SSL_TLV)):
        for cut in range(len(header)):
            assert header_length(header[:cut]) is None
        assert header_length(header + b"\x16\x03\x01\x02\x00") == len(header)


_addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
_ports = st.integers(0, 65535)


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_are_errors_or_headers(data):
    """Random bytes: header_length and parse raise ProxyError or agree on a header."""
    try:
        length = header_length(data)
        if length is not None:
            header = parse(data[:length])
            assert header.raw == data[:length]
    except ProxyError:
        pass


@hsettings(max_examples=300, deadline=None)
@given(st.sampled_from([pp.V2_SIGNATURE, b"PROXY "]), st.binary(max_size=120))
def test_fuzz_signature_then_garbage(prefix, data):
    """A right signature followed by garbage is still only ever a ProxyError or a header."""
    try:
        length = header_length(prefix + data)
        if length is not None:
            parse((prefix + data)[:length])
    except ProxyError:
        pass


@hsettings(max_examples=200, deadline=None)
@given(_addresses, _ports, st.binary(max_size=64), st.binary(max_size=40))
def test_fuzz_v2_round_trip(address, port, authority, after):
    """A v2 header we build parses back to the same client, whatever follows it."""
    header = v2_header((address, port), tlvs=tlv(pp.PP2_TYPE_AUTHORITY, authority))
    assert header_length(header + after) == len(header)
    parsed = parse(header)
    assert parsed.source == (address, port) and len(parsed.authority) <= 255


# -- the real server ----------------------------------------------------------------------------
def _proxy_server(start_server, *args):
    """A server whose listeners expect a header from 127.0.0.1 (127.0.0.2 is a stranger)."""
    return start_server("-proxy-protocol", "-trusted-networks", "127.0.0.1", *args)


def _proxied(server, header: bytes, source: str = "") -> RawClient:
    raw = RawClient(server.port, 10, source=source)
    raw.send(header)
    return raw


def test_clients_address_reaches_log_limit_and_penalty(start_server):
    """Behind v1 and v2 headers the session logs the client's address, -max-per-address counts
    it (not the balancer's), and a failed login is logged and penalised for it."""
    server = _proxy_server(start_server, "-max-per-address", "1", "-cleartext-auth", "ALWAYS")
    first = _proxied(server, v2_header(("192.0.2.7", 5555), tlvs=tlv(pp.PP2_TYPE_AUTHORITY,
                                                                      b"pop.example.org")))
    assert first.line().startswith(b"+OK")
    server.wait_for(r"PROXY v2 client 192\.0\.2\.7:5555, authority pop\.example\.org "
                    r"from 127\.0\.0\.1:\d+")
    server.wait_for(r"connect from 192\.0\.2\.7:5555")
    second = _proxied(server, b"PROXY TCP4 192.0.2.7 127.0.0.1 5556 110\r\n")
    assert second.line() + b"\r\n" == refusal.TOO_MANY_FROM_ADDRESS
    other = _proxied(server, b"PROXY TCP4 192.0.2.8 127.0.0.1 5557 110\r\n")
    assert other.line().startswith(b"+OK")
    assert other.command("USER alice").startswith(b"+OK")
    assert other.command("PASS wrong").startswith(b"-ERR")
    server.wait_for(r"login failed for alice from 192\.0\.2\.8 port 5557")
    v6 = _proxied(server, v2_header(("2001:db8::7", 4444)))
    assert v6.line().startswith(b"+OK")
    server.wait_for(r"connect from \[2001:db8::7\]:4444")
    for client in (first, other, v6):
        assert client.command("QUIT").startswith(b"+OK")


def test_refused_headers_close_the_connection_and_count(start_server, tmp_path):
    """Untrusted peer, malformed, oversized, cut short, missing after 3 s: closed, no greeting,
    each logged and counted; a header trickled byte by byte still works."""
    auth = tmp_path / "pop_xtnd.dat"
    auth.write_text("stats alice\n")
    server = _proxy_server(start_server, "-xtnd", str(auth), "-cleartext-auth", "ALWAYS")
    cases = [
        (_proxied(server, v2_header(("192.0.2.7", 1)), source="127.0.0.2"), "not in -trusted"),
        (_proxied(server, b"USER alice\r\n"), "not a PROXY header"),
        (_proxied(server, b"PROXY TCP4 " + b"9" * 120), "longer than 107"),
        (_proxied(server, pp.V2_SIGNATURE + b"\x21\x11\xff\xff"), "is larger than"),
    ]
    for client, why in cases:
        assert wait_until(client.closed, 10), why
        assert client.buffer == b""
        server.wait_for(rf"PROXY header refused from 127\.0\.0\.[12]: .*{why}")
    silent = _proxied(server, pp.V2_SIGNATURE[:5])
    cut = _proxied(server, b"PROXY TCP4 192.0.2.7")
    cut.sock.shutdown(socket.SHUT_WR)
    server.wait_for(r"PROXY header refused from 127\.0\.0\.1: closed before the end")
    # While the silent one waits, the loop serves others: a header trickled byte by byte.
    trickled = server.raw()
    for byte in b"PROXY TCP4 192.0.2.9 127.0.0.1 4000 110\r\n":
        trickled.send(bytes([byte]))
    assert trickled.line().startswith(b"+OK")
    server.wait_for(r"connect from 192\.0\.2\.9:4000")
    assert "within 3s" not in server.output  # 3 s is ~100 times what the trickle takes
    server.wait_for(r"PROXY header refused from 127\.0\.0\.1: no complete header within 3s")
    assert wait_until(silent.closed, 10)
    _stats_shows(trickled, "Proxy Refusals", 6)


def _stats_shows(client, name: str, value: int) -> None:
    assert client.command("USER alice").startswith(b"+OK")
    assert client.command("PASS wonderland").startswith(b"+OK")
    assert client.command("XTND STATS").startswith(b"+OK")
    lines = client.multiline()
    row = [line.decode() for line in lines if line.decode().startswith(name)]
    assert row and row[0].split(":")[1].strip() == str(value), lines
    client.command("QUIT")


def test_local_is_direct_and_ssl_flag_counts_as_tls(start_server):
    """v2 LOCAL (a health check) is served as the connection itself; behind a proxy on this
    host a client is not local for -cleartext-auth LOOPBACK, unless PP2_TYPE_SSL says TLS."""
    server = _proxy_server(start_server)
    check = _proxied(server, v2_header(None))
    assert check.line().startswith(b"+OK")
    assert check.command("USER alice").startswith(b"+OK")  # LOCAL: 127.0.0.1, loopback
    server.wait_for(r"PROXY v2 LOCAL from 127\.0\.0\.1:\d+")
    remote = _proxied(server, v2_header(("192.0.2.7", 5555)))
    remote.line()
    assert remote.command("USER alice") == R.CLEARTEXT_REFUSED.encode()
    terminated = _proxied(server, v2_header(("192.0.2.7", 5556), tlvs=SSL_TLV))
    terminated.line()
    assert terminated.command("USER alice").startswith(b"+OK")
    assert terminated.command("PASS wonderland").startswith(b"+OK")
    server.wait_for(r"PROXY v2 client 192\.0\.2\.7:5556, TLS TLSv1\.3 from")
    for client in (check, remote, terminated):
        client.command("QUIT")


def test_implicit_tls_and_a_separate_proxy_port(start_server, tmp_path):
    """-proxy-listen and -proxy-tls-listen take headers (the TLS one before the handshake)
    while the POP3 port stays direct for administrators (where a PROXY line is an unknown
    command, never believed)."""
    cert, key = make_cert(tmp_path)
    server = start_server("-trusted-networks", "127.0.0.1", "-tls-cert", str(cert), "-tls-key",
                          str(key), "-proxy-listen", "127.0.0.1:0",
                          "-proxy-tls-listen", "127.0.0.1:0", "-cleartext-auth", "NEVER")
    match = server.wait_for(r"PROXY protocol header expected on 127\.0\.0\.1:(\d+), "
                            r"127\.0\.0\.1:(\d+) from 127\.0\.0\.1/32")
    plain_port, tls_port = int(match.group(1)), int(match.group(2))
    direct = server.raw()
    assert direct.line().startswith(b"+OK")  # no header wanted here, and none believed:
    assert direct.command("PROXY TCP4 192.0.2.66 127.0.0.1 1 110") == R.UNKNOWN_COMMAND.encode()
    sock = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    sock.sendall(v2_header(("192.0.2.7", 6000)))
    context = ssl.create_default_context(cafile=str(cert))
    with context.wrap_socket(sock, server_hostname="localhost") as tls:
        assert tls.recv(200).startswith(b"+OK")
        tls.sendall(b"USER alice\r\n")
        assert tls.recv(200).startswith(b"+OK")
        tls.sendall(b"QUIT\r\n")
        tls.recv(200)
    server.wait_for(r"connect from 192\.0\.2\.7:6000")
    plain = socket.create_connection(("127.0.0.1", plain_port), timeout=10)
    plain.sendall(b"PROXY TCP4 192.0.2.8 127.0.0.1 6001 110\r\n")
    assert plain.recv(200).startswith(b"+OK")
    plain.close()
    server.wait_for(r"connect from 192\.0\.2\.8:6001")
    direct.command("QUIT")
    assert "192.0.2.66" not in server.output.replace("PROXY TCP4 192.0.2.66", "")


@pytest.mark.parametrize("args, message", [
    (["-proxy-protocol"], "-proxy-protocol needs -trusted-networks"),
    (["-xclient"], "-xclient needs -trusted-networks"),
    (["-proxy-listen", "127.0.0.1"], "-proxy-listen '127.0.0.1' is not ADDR:PORT"),
    (["-proxy-tls-listen", "127.0.0.1:0", "-trusted-networks", "127.0.0.1"],
     "-proxy-tls-listen needs -tls-cert"),
])
def test_bad_proxy_settings_are_one_line_and_exit_2(tmp_path, args, message):
    """A proxy setting that cannot work is one line on stderr and exit 2, before anything runs."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}x::::::\n")
    result = subprocess.run([sys.executable, "-m", "supervisor", "-users", str(users), *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert re.fullmatch(rf"iupop3: .*{re.escape(message)}.*\n", result.stderr), result.stderr
