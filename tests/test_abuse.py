"""Abuse the server must shrug off: guessing passwords, hogging slots from one address."""

from __future__ import annotations

import poplib
import re
import time

import pytest

from conftest import USERS, RawClient
from processes import wait_until
from shared import refusal
from worker import replies as R


def _fail_login(server, user: str = "alice", password: str = "wrong") -> tuple[bytes, float]:
    raw = server.raw(timeout=30)
    raw.line()
    raw.command(f"USER {user}")
    started = time.monotonic()
    reply = raw.command(f"PASS {password}")
    elapsed = time.monotonic() - started
    raw.close()
    return reply, elapsed


def test_per_address_session_limit(start_server):
    """One address holds at most -max-per-address sessions; the excess gets [SYS/TEMP]."""
    server = start_server("-max-per-address", "2")
    held = [server.pop(), server.pop()]
    raw = server.raw()
    assert raw.line() + b"\r\n" == refusal.TOO_MANY_FROM_ADDRESS
    held[0].quit()
    admitted: list[poplib.POP3] = []

    def admitted_again() -> bool:
        try:
            admitted.append(server.pop())
        except poplib.error_proto:
            return False
        return True

    assert wait_until(admitted_again, 10)  # the slot frees once the worker reports the close
    admitted[0].quit()
    held[1].quit()


def test_failed_login_delay_grows(start_server):
    """After a failure every login from the address waits before it is checked: none for the
    first, then 1s, then 2s (the failure itself is answered as soon as it is checked)."""
    server = start_server("-auth-delay", "1", "-auth-delay-max", "8")
    reply, first = _fail_login(server)
    assert reply == R.NOT_ACCESSIBLE.format(user="alice").encode()
    _, second = _fail_login(server, "nosuchuser")
    _, third = _fail_login(server, "bob")
    # At least the penalty, however fast the machine: the first failure waited for nothing.
    assert second >= 0.9 and third >= 1.9


def test_delay_blocks_no_other_session(start_server):
    """While one login waits out its penalty, another session on the same worker (from another
    address, so without a penalty of its own) runs."""
    server = start_server("-workers", "1", "-auth-delay", "3")
    raw = server.raw(timeout=30)
    raw.line()
    raw.command("USER alice")
    assert raw.command("PASS wrong") == R.NOT_ACCESSIBLE.format(user="alice").encode()
    raw.command("USER alice")
    mark = server.mark()
    raw.send(b"PASS wrong\r\n")  # now waits 3 s inside the worker before it is checked
    server.wait_for(r"login for alice waits 3\.0s", start=mark)
    bob = RawClient(server.port, 10, source="127.0.0.2")
    assert bob.line().startswith(b"+OK")
    assert bob.command("USER bob").startswith(b"+OK")
    assert bob.command(f"PASS {USERS['bob']}") == R.LOGIN_OK.encode()
    assert bob.command("STAT").startswith(b"+OK 3 ")
    bob.close()
    raw.sock.setblocking(False)  # bob's whole session fit inside alice's wait
    with pytest.raises(BlockingIOError):
        raw.sock.recv(1)
    raw.sock.settimeout(30)
    assert raw.line() == R.NOT_ACCESSIBLE.format(user="alice").encode()


def test_address_blocked_after_failures_across_connections_and_workers(start_server):
    """Failures from one address add up over connections and workers; then logins are refused."""
    server = start_server("-auth-delay", "0", "-auth-block", "3")
    for _ in range(3):
        reply, _ = _fail_login(server)
        assert reply == R.NOT_ACCESSIBLE.format(user="alice").encode()
    reply, _ = _fail_login(server, "bob", USERS["bob"])  # even the right password
    assert reply == R.ADDRESS_BLOCKED.encode()
    assert server.output.count("connect from") >= 4
    assert {int(s) for s in __import__("re").findall(r"worker-(\d) \S+ connect from", server.output)} == {1, 2}


def test_block_expires_after_window(start_server):
    """A blocked address may log in again once its failures are -auth-window seconds old."""
    server = start_server("-auth-delay", "0", "-auth-block", "2", "-auth-window", "2")
    _fail_login(server)
    _fail_login(server)
    assert _fail_login(server, "bob", USERS["bob"])[0] == R.ADDRESS_BLOCKED.encode()
    time.sleep(2.5)
    client = server.login("bob")
    client.quit()


def test_unknown_user_checked_against_a_hash_of_the_same_cost(start_server, tmp_path):
    """Unknown users are verified against a dummy of the site's scheme and cost, so a wrong
    password and an unknown name cost alike (the timing check is loose: machines are noisy)."""
    from shared.passwords import cost_of, hash_password
    from shared.users import parse_users

    stored = hash_password("secret", "SHA512-CRYPT")
    users = parse_users(f"alice:{stored}::::::\n")
    assert cost_of(users.dummy) == cost_of(stored)
    root = tmp_path / "hashed"
    root.mkdir()
    (root / "users").write_text(f"alice:{stored}::::::\n")
    server = start_server("-auth-delay", "0", "-auth-block", "0", root=root,
                          users={"alice": "secret"})
    count = 8
    known = sorted(_fail_login(server, "alice")[1] for _ in range(count))
    unknown = sorted(_fail_login(server, "nobody")[1] for _ in range(count))
    median_known, median_unknown = known[count // 2], unknown[count // 2]
    assert 0.25 < median_unknown / median_known < 4, (known, unknown)


# -- pre-login limits (issue 10: pre-login slots can be held forever) ------------------------------
def _answer(raw, until: bytes = b".") -> list[bytes]:
    """Lines up to ``until`` (a multi-line answer) or a connection-closing -ERR."""
    lines = []
    while (line := raw.line()) != until:
        lines.append(line)
        if line.startswith(b"-ERR"):
            break
    return lines


def test_login_deadline_cuts_a_client_that_keeps_talking(start_server):
    """A client that sends CAPA every half second (each line resets the idle timer) is cut at
    -login-timeout from connect with its own -ERR; a client that logs in in time is not."""
    import select

    server = start_server("-login-timeout", "3", "-timeout", "60")
    raw = server.raw(timeout=30)
    raw.line()
    connected = time.monotonic()
    answered = 0
    cut = False
    for _ in range(60):  # at most 30 s; the cut comes after 3
        if select.select([raw.sock], [], [], 0.5)[0]:  # the server spoke unasked: the cut
            assert raw.line() == R.LOGIN_TIMEOUT.format(seconds=3).encode()
            cut = True
            break
        raw.send(b"CAPA\r\n")
        answer = _answer(raw)
        if answer[0] == R.LOGIN_TIMEOUT.format(seconds=3).encode():
            cut = True  # it raced our CAPA
            break
        assert answer[0] == R.CAPA.encode()
        answered += 1
    elapsed = time.monotonic() - connected
    assert cut and raw.closed()
    assert answered >= 2 and elapsed >= 2.9, (answered, elapsed)
    server.wait_for(r"no login within 3s of connect")
    client = server.login()  # a prompt login is untouched by the deadline
    assert client.stat()[0] == 3
    client.quit()
    print(f"\nCAPA client: {answered} CAPAs answered, cut after {elapsed:.1f}s (-login-timeout 3)")


def test_login_deadline_paused_during_a_failed_login_penalty(start_server):
    """The penalty a failed login waits does not count against -login-timeout: after a 4 s
    penalty a client with a 3 s deadline can still log in."""
    server = start_server("-login-timeout", "3", "-auth-delay", "4", "-auth-delay-max", "4",
                          "-auth-block", "0")
    raw = server.raw(timeout=30)
    raw.line()
    raw.command("USER alice")
    assert raw.command("PASS wrong") == R.NOT_ACCESSIBLE.format(user="alice").encode()
    assert raw.command("USER alice") == R.PASSWORD_REQUIRED.format(user="alice").encode()
    assert raw.command(f"PASS {USERS['alice']}") == R.LOGIN_OK.encode()
    assert raw.command("STAT").startswith(b"+OK 3 ")
    raw.command("QUIT")
    raw.close()


def test_eleventh_bad_command_closes(start_server):
    """Unknown commands and commands in the wrong state count; with -max-bad-commands 10 the
    11th is answered with -ERR and the connection closed; a repeated line is logged 3 times."""
    server = start_server()
    raw = server.raw()
    raw.line()
    port = raw.local_port
    for n in range(10):
        command, expected = ("STAT", R.WRONG_STATE) if n % 2 else ("FOO", R.UNKNOWN_COMMAND)
        assert raw.command(command) == expected.encode(), n
    assert raw.command("FOO") == R.TOO_MANY_BAD_COMMANDS.encode()
    assert raw.closed()
    slot = server.worker_of(port)
    match = server.wait_for(rf"worker-{slot} (\S+) connect from 127\.0\.0\.1:{port}\b")
    session = match.group(1)
    server.wait_for(rf"{re.escape(session)} closing .* after 11 bad commands")
    server.wait_for(rf"{re.escape(session)} 5 repeated log lines were not written")
    foo_lines = [line for line in server.output.splitlines()
                 if f" {session} " in line and line.endswith(" FOO")]
    assert len(foo_lines) == 3, foo_lines
