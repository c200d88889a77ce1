"""XCLIENT (issue 14 item 2), as Dovecot's and sora's POP3 proxies send it to a backend:
accepted only from -trusted-networks with -xclient, before login; the greeting says so only to
them; the named client is what the log, the failed-login guard and -cleartext-auth see.
"""

from __future__ import annotations

import pytest

from conftest import RawClient
from worker import replies as R
from worker import xclient


def test_parse_attributes():
    """ADDR, PORT, SESSION, TTL and CLIENT-TRANSPORT are read; unknown ones are ignored."""
    info = xclient.parse(b"ADDR=192.0.2.9 PORT=4242 SESSION=Fz8Rk TTL=4 FORWARD=eA== "
                         b"client-transport=TLS")
    assert info == xclient.ClientInfo("192.0.2.9", 4242, "Fz8Rk", 4, True)
    assert xclient.parse(b"ADDR=::ffff:192.0.2.9").address == "192.0.2.9"
    assert not xclient.parse(b"ADDR=2001:db8::1 PORT=1").tls


@pytest.mark.parametrize("rest", [b"ADDR=example.org", b"PORT=70000", b"PORT=-1", b"TTL=x",
                                  b"ADDR", b"=1", b"ADDR=1.2.3.4\x01"])
def test_parse_refuses_malformed(rest):
    """An attribute that is not KEY=VALUE, an address that is no IP, a bad number: refused."""
    with pytest.raises(ValueError):
        xclient.parse(rest)


def test_trusted_proxy_names_the_client(start_server):
    """From a trusted peer: +OK [XCLIENT] greeting, then the named client is logged, penalised
    for a failed login, and (being remote) refused cleartext unless the proxy says TLS."""
    server = start_server("-xclient", "-trusted-networks", "127.0.0.1")
    proxy = server.raw()
    assert proxy.line().startswith(b"+OK [XCLIENT] IUPOP3 server V")
    assert proxy.command("XCLIENT ADDR=192.0.2.9 PORT=4242 SESSION=Fz8Rk TTL=4") == b"+OK"
    server.wait_for(r"XCLIENT from 127\.0\.0\.1:\d+: client 192\.0\.2\.9:4242, session Fz8Rk")
    assert proxy.command("USER alice") == R.CLEARTEXT_REFUSED.encode()
    tls_proxy = server.raw()
    tls_proxy.line()
    assert tls_proxy.command("XCLIENT ADDR=192.0.2.10 PORT=1 CLIENT-TRANSPORT=TLS") == b"+OK"
    assert tls_proxy.command("USER alice").startswith(b"+OK")
    assert tls_proxy.command("PASS wrong").startswith(b"-ERR")
    server.wait_for(r"login failed for alice from 192\.0\.2\.10 port 1 ")
    assert tls_proxy.command("USER alice").startswith(b"+OK")
    assert tls_proxy.command("PASS wonderland").startswith(b"+OK")
    assert tls_proxy.command("XCLIENT ADDR=192.0.2.11") == R.WRONG_STATE.encode()  # after login
    assert proxy.command("XCLIENT ADDR=nonsense") == xclient.BAD.encode()
    for client in (proxy, tls_proxy):
        client.command("QUIT")


def test_untrusted_peer_gets_no_xclient(start_server):
    """A peer outside -trusted-networks sees the plain greeting and XCLIENT is unknown to it."""
    server = start_server("-xclient", "-trusted-networks", "127.0.0.1")
    stranger = RawClient(server.port, 10, source="127.0.0.2")
    assert stranger.line().startswith(b"+OK IUPOP3 server V")
    assert stranger.command("XCLIENT ADDR=192.0.2.9 PORT=1") == R.UNKNOWN_COMMAND.encode()
    assert stranger.command("USER alice").startswith(b"+OK")  # still 127.0.0.2: loopback
    stranger.command("QUIT")
    server.wait_for(r"connect from 127\.0\.0\.2:\d+")
    assert "XCLIENT from" not in server.output
