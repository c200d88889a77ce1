"""AUTH (RFC 5034: PLAIN and LOGIN) and APOP (RFC 1939), against the real server."""

from __future__ import annotations

import base64
import poplib
import re

import pytest

from conftest import USERS
from worker import replies as R


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _ready(server):
    raw = server.raw()
    raw.line()
    return raw


def test_capa_lists_sasl_mechanisms(server):
    """CAPA announces SASL PLAIN LOGIN where cleartext login is allowed."""
    client = server.pop()
    assert client.capa()["SASL"] == ["PLAIN", "LOGIN"]
    client.quit()


def test_auth_plain_with_initial_response(server):
    """AUTH PLAIN with the credentials on the command line logs in."""
    raw = _ready(server)
    reply = raw.command("AUTH PLAIN " + b64(b"\0alice\0" + USERS["alice"].encode()))
    assert reply == R.LOGIN_OK.encode()
    assert raw.command("STAT").startswith(b"+OK 3 ")
    raw.command("QUIT")


def test_auth_plain_with_challenge_and_long_response(server):
    """AUTH PLAIN, an empty challenge, then a response longer than 255 octets is accepted."""
    raw = _ready(server)
    assert raw.command("AUTH PLAIN") == b"+ "
    authzid = b"alice"  # same as the user: allowed
    response = b64(authzid + b"\0alice\0" + USERS["alice"].encode())
    assert raw.command(response) == R.LOGIN_OK.encode()
    raw.command("QUIT")
    raw = _ready(server)
    raw.command("AUTH PLAIN")
    assert raw.command(b64(b"\0alice\0" + b"x" * 300)) == R.NOT_ACCESSIBLE.format(user="alice").encode()


def test_auth_login_exchange(server):
    """AUTH LOGIN asks Username: then Password: in base64."""
    raw = _ready(server)
    assert raw.command("AUTH LOGIN") == b"+ " + b64(b"Username:").encode()
    assert raw.command(b64(b"bob")) == b"+ " + b64(b"Password:").encode()
    assert raw.command(b64(USERS["bob"].encode())) == R.LOGIN_OK.encode()
    raw.command("QUIT")


def test_auth_cancel_and_failures_count(server):
    """'*' cancels; wrong SASL credentials count toward the two attempts per connection."""
    raw = _ready(server)
    raw.command("AUTH LOGIN")
    assert raw.command("*") == R.SASL_CANCELLED.encode()
    assert raw.command("AUTH PLAIN " + b64(b"\0alice\0wrong")) == \
        R.NOT_ACCESSIBLE.format(user="alice").encode()
    assert raw.command("AUTH PLAIN " + b64(b"bob\0alice\0" + USERS["alice"].encode())) == \
        R.SASL_MALFORMED.encode()  # authzid names somebody else: no proxy logins
    assert raw.closed()


def test_auth_malformed_and_unknown(server):
    """Bad base64 and unknown mechanisms get -ERR with [AUTH]; AUTH alone lists mechanisms."""
    raw = _ready(server)
    assert raw.command("AUTH CRAM-MD5") == R.SASL_UNKNOWN.encode()
    assert raw.command("AUTH") == R.SASL_LIST.encode()
    assert raw.multiline() == [b"PLAIN", b"LOGIN"]
    assert raw.command("AUTH PLAIN !!notbase64") == R.SASL_MALFORMED.encode()
    raw.close()


def test_sasl_secrets_never_logged(server):
    """Neither the base64 response nor the password reaches the log, even at DEBUG."""
    raw = _ready(server)
    secret = b64(b"\0carol\0" + USERS["carol"].encode())
    raw.command("AUTH PLAIN " + secret)
    raw.command("QUIT")
    raw = _ready(server)
    raw.command("AUTH LOGIN")
    raw.command(b64(b"carol"))
    raw.command(b64(USERS["carol"].encode()))
    raw.command("QUIT")
    assert secret not in server.output
    assert USERS["carol"] not in server.output
    assert b64(USERS["carol"].encode()) not in server.output


def test_apop_off_by_default(server):
    """Without -apop the greeting has no timestamp and APOP is refused."""
    raw = server.raw()
    assert b"<" not in raw.line()
    assert raw.command("APOP alice " + "0" * 32) == R.APOP_UNAVAILABLE.encode()
    raw.close()


def test_apop_login(start_server):
    """With -apop the greeting carries a timestamp and APOP with the right digest logs in."""
    server = start_server("-apop")
    client = server.pop()
    assert re.search(rb" <\d+\.\d+\.\d+@\S+>$", client.getwelcome())
    client.apop("alice", USERS["alice"])
    assert client.stat()[0] == 3
    client.quit()
    other = server.pop()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        other.apop("alice", "wrong")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        other.apop("nosuchuser", "x")
