"""Reload on change: the users file and the TLS certificate are re-read by every worker when
they change on disk (watchdog, as the XTND file), and a bad file keeps the one in use."""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import socket
import ssl
from pathlib import Path

import pytest

from conftest import USERS, make_cert
from processes import wait_until


def _replace(path: Path, data: bytes) -> None:
    """Save the way editors do: write a temporary file, rename it over the old one."""
    tmp = path.with_name(path.name + ".tmp~")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _both_workers(server, pattern: str, mark: int, level: str = "INFO") -> None:
    for slot in (1, 2):
        server.wait_for(rf"{level} +worker-{slot} - .*{pattern}", start=mark)


def _login_ok(server, user: str, password: str) -> bool:
    client = server.pop()
    try:
        client.user(user)
        client.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        client.close()
    return True


def test_editing_the_users_file_reloads_it_in_every_worker(start_server):
    """A users file saved by rename is re-read by both workers: a new account and a changed
    password work at once, the old password no longer does; no SIGHUP needed."""
    server = start_server("-auth-delay", "0")
    mark = server.mark()
    text = "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items() if u != "alice")
    _replace(server.users_file, (text + "alice:{PLAIN}n3w-secret::::::\n"
                                 "dave:{PLAIN}d4ve::::::\n").encode())
    _both_workers(server, r"users file reloaded: 4 accounts \(file changed\)", mark)
    for _ in range(2):  # least-loaded routing alternates the two workers
        assert _login_ok(server, "dave", "d4ve")
        assert _login_ok(server, "alice", "n3w-secret")
    assert not _login_ok(server, "alice", USERS["alice"])


def test_a_bad_users_file_on_change_keeps_the_accounts_in_use(start_server):
    """A users file that fails to parse after an edit logs ERROR with its line; logins go on
    against the accounts loaded before."""
    server = start_server()
    mark = server.mark()
    with open(server.users_file, "w") as fh:  # in place, as `echo ... > file` does
        fh.write("broken line without a password field\n")
    _both_workers(server, r"line 1.*keeping the previous users", mark, "ERROR")
    assert _login_ok(server, "alice", USERS["alice"])


def _served_certificate(port: int) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_replacing_the_certificate_reloads_it_and_a_bad_one_is_kept_out(start_server, tmp_path):
    """New certificate and key saved by rename are served to new sessions by both workers
    without SIGHUP; a broken certificate then logs ERROR and the good one stays in use."""
    folder = tmp_path / "tls"
    folder.mkdir()
    cert, key = make_cert(folder)
    server = start_server("-tls-cert", str(cert), "-tls-key", str(key))
    port = int(server.wait_for(r"implicit TLS listening on 127\.0\.0\.1:(\d+)").group(1))
    fresh_cert, fresh_key = make_cert(tmp_path, "fresh", cn="fresh")
    fresh = ssl.PEM_cert_to_DER_cert(fresh_cert.read_text())
    assert _served_certificate(port) != fresh
    mark = server.mark()
    _replace(key, fresh_key.read_bytes())
    _replace(cert, fresh_cert.read_bytes())
    _both_workers(server, r"TLS certificate reloaded \(file changed\)", mark)
    assert all(_served_certificate(port) == fresh for _ in range(4))  # both workers
    mark = server.mark()
    _replace(cert, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    _both_workers(server, r"keeping the previous certificate", mark, "ERROR")
    assert wait_until(lambda: _served_certificate(port) == fresh, timeout=5)


def test_a_slow_reload_does_not_stop_the_worker_taking_connections(start_server):
    """SIGHUP with a costly hash class in the users file: while a worker measures it in the
    pool, a new client is greeted by that worker (the RELOAD frame used to hold the receiver)."""
    from passlib.hash import sha512_crypt
    server = start_server()
    slow = sha512_crypt.using(rounds=400_000).hash("slow secret")  # about a second here
    text = "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items())
    _replace(server.users_file, (text + f"slow:{{SHA512-CRYPT}}{slow}::::::\n").encode())
    _both_workers(server, r"users file reloaded: 4 accounts \(file changed\)", server.mark())
    mark = server.mark()
    server.signal(signal.SIGHUP)
    _both_workers(server, r"reload requested", mark)
    client = server.raw()
    assert client.line().startswith(b"+OK")
    greeted = server.mark()
    slot = server.worker_of(client.local_port)
    # The reload of the worker that greeted us ends after the greeting, not before it.
    server.wait_for(rf"worker-{slot} - users file reloaded: 4 accounts \(reload request\)",
                    start=greeted, timeout=60)
    client.close()
