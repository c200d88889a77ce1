"""TLS: STLS (RFC 2595) and implicit TLS (RFC 8314), the cleartext policy, certificate reload."""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT, USERS, make_cert
from processes import wait_until
from worker import replies as R

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def client_context(cert) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


@pytest.fixture
def tls_server(start_server, tmp_path):
    cert, key = make_cert(tmp_path)
    server = start_server("-tls-cert", str(cert), "-tls-key", str(key))
    server.tls_port = int(server.wait_for(r"implicit TLS listening on 127\.0\.0\.1:(\d+)").group(1))
    server.cert = cert
    return server


def test_implicit_tls_session(tls_server):
    """POP3 over implicit TLS on its own port: greeting, login and RETR all inside TLS."""
    client = poplib.POP3_SSL("127.0.0.1", tls_server.tls_port, context=client_context(tls_server.cert),
                             timeout=10)
    assert client.getwelcome().startswith(b"+OK IUPOP3 server")
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    client.user("alice")
    client.pass_(USERS["alice"])
    assert b"Subject: message 1" in client.retr(1)[1]
    client.quit()


def test_stls_then_login(tls_server):
    """CAPA offers STLS before TLS only; after STLS the session starts over and logs in."""
    client = tls_server.pop()
    assert "STLS" in client.capa()
    client.stls(client_context(tls_server.cert))
    assert "STLS" not in client.capa()
    client.user("alice")
    client.pass_(USERS["alice"])
    assert client.stat()[0] == 3
    client.quit()


def test_stls_pipelined_commands_are_discarded(tls_server):
    """STLS\\r\\nCAPA\\r\\n in one packet: nothing sent before the handshake is answered after it."""
    raw = socket.create_connection(("127.0.0.1", tls_server.port), timeout=10)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"STLS\r\nCAPA\r\n")
    assert f.readline() == (R.STLS + "\r\n").encode()
    tls = client_context(tls_server.cert).wrap_socket(raw, server_hostname="127.0.0.1")
    tls.settimeout(1.0)
    with pytest.raises(socket.timeout):
        tls.recv(100)  # no reply to the injected CAPA
    tls.settimeout(10)
    tls.sendall(b"NOOP\r\n")
    assert tls.recv(100) == R.WRONG_STATE.encode() + b"\r\n"
    tls.close()


def test_cleartext_policy_never(start_server, tmp_path):
    """With -cleartext-auth NEVER, USER needs TLS first and CAPA does not offer USER."""
    cert, key = make_cert(tmp_path)
    server = start_server("-tls-cert", str(cert), "-tls-key", str(key),
                          "-cleartext-auth", "never")
    client = server.pop()
    assert "USER" not in client.capa()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.user("alice")
    client.stls(client_context(cert))
    assert "USER" in client.capa()
    client.user("alice")
    client.pass_(USERS["alice"])
    client.quit()


def test_old_tls_versions_refused(tls_server):
    """A client limited to TLS 1.1 cannot complete a handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point here
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw).recv(10)


def test_plaintext_on_tls_port_and_tls_on_plain_port(tls_server):
    """Cross-talk is refused cleanly: no traceback, no dead worker, next sessions fine."""
    pids = tls_server.worker_pids()
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as raw:
        raw.sendall(b"USER alice\r\nPASS x\r\n")
        raw.settimeout(10)
        try:
            while raw.recv(4096):
                pass
        except ConnectionResetError:
            pass
    raw = tls_server.raw()
    raw.line()
    hello = bytes.fromhex("160301002e0100002a0303") + os.urandom(32) + b"\x00\x00\x02\x00\x2f\x01\x00"
    raw.send(hello + b"\r\n")
    assert raw.line().startswith(b"-ERR")
    raw.close()
    client = tls_server.login("bob")
    client.quit()
    assert tls_server.worker_pids() == pids
    assert "Traceback" not in tls_server.output


def test_certificate_reload_on_sighup_keeps_sessions(tls_server, tmp_path):
    """SIGHUP loads a new certificate for new sessions; a session in TLS goes on."""
    old_session = poplib.POP3_SSL("127.0.0.1", tls_server.tls_port,
                                  context=client_context(tls_server.cert), timeout=10)
    old_session.user("alice")
    old_session.pass_(USERS["alice"])
    new_cert, new_key = make_cert(tmp_path, "fresh", cn="fresh")
    shutil.copy(new_cert, tls_server.cert)
    shutil.copy(new_key, tls_server.cert.with_suffix(".key"))
    mark = tls_server.mark()
    tls_server.signal(signal.SIGHUP)
    tls_server.wait_for("worker 1 .*reload|reload requested", start=mark)

    def new_certificate_served() -> bool:
        raw = socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(raw)
        der = tls.getpeercert(binary_form=True)
        tls.close()
        return der == ssl.PEM_cert_to_DER_cert(new_cert.read_text())

    assert wait_until(new_certificate_served, 10, step=0.2), "new certificate not served"
    assert old_session.stat()[0] == 3
    old_session.quit()


def test_bad_certificate_fails_fast(tmp_path):
    """A certificate that cannot be loaded is a one-line error and exit status 2."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    users = tmp_path / "users"
    users.write_text("a:{PLAIN}b::::::\n")
    out = subprocess.run([sys.executable, "-m", "supervisor", "-users", str(users), "-tls-cert",
                          str(bad), "-port", "0", "-listen", "127.0.0.1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2
    assert "TLS: cannot load certificate" in out.stderr


def test_apop_after_stls_uses_the_greeting_timestamp(start_server, tmp_path):
    """After STLS the session starts over but keeps the APOP timestamp the greeting announced."""
    cert, key = make_cert(tmp_path)
    server = start_server("-tls-cert", str(cert), "-tls-key", str(key), "-apop")
    client = server.pop()
    client.stls(client_context(cert))
    client.apop("alice", USERS["alice"])
    assert client.stat()[0] == 3
    client.quit()
