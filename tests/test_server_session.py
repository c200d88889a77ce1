"""End-to-end POP3 sessions against the real server (RFC 1939 and the IUPOP3 transcript)."""

from __future__ import annotations

import poplib
import re
import threading

import pytest

from conftest import USERS, sample, write_message
from processes import wait_until
from worker import replies as R


def test_greeting_matches_iupop3_transcript(server):
    """The greeting reads like IUPOP3's: version, host and start time."""
    client = server.pop()
    welcome = client.getwelcome().decode()
    assert re.fullmatch(r"\+OK IUPOP3 server V\S+ at \S+, up since "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", welcome), welcome
    client.quit()


def test_whole_session_user_pass_stat_list_retr_dele_rset_noop_quit(server):
    """A full session: every RFC 1939 verb answers as specified, deletion applies at QUIT."""
    client = server.pop()
    assert client.user("ALICE") == R.PASSWORD_REQUIRED.format(user="alice").encode()
    assert client.pass_(USERS["alice"]) == R.LOGIN_OK.encode()
    count, octets = client.stat()
    assert count == 3
    resp, listing, _ = client.list()
    sizes = {int(a): int(b) for a, b in (line.split() for line in listing)}
    assert sum(sizes.values()) == octets
    resp, lines, got = client.retr(1)
    assert resp == R.RETR.format(octets=sizes[1]).encode()
    body = b"\r\n".join(lines) + b"\r\n"
    assert len(body) == sizes[1]
    # The server adds X-POP3-Server/X-POP3-ID lines (IUPOP3 1.8 README): all else is stored bytes.
    served = re.sub(rb"X-POP3-(?:Server|ID): [^\r]*\r\n", b"", body)
    assert served == sample(1).replace("\n", "\r\n").encode()
    assert client.dele(2) == R.DELE.format(n=2).encode()
    with pytest.raises(poplib.error_proto, match="already deleted"):
        client.retr(2)
    assert client.stat()[0] == 2
    client.rset()
    assert client.stat()[0] == 3
    client.noop()
    client.dele(3)
    assert client.quit() == R.SIGNING_OFF.format(host=_host(server)).encode()
    remaining = sorted(p.name for p in (server.maildir("alice") / "new").iterdir())
    assert remaining == ["1700000001.M1.test", "1700000002.M2.test"]
    assert len(list((server.maildir("alice") / ".Trash" / "cur").iterdir())) == 1


def _host(server) -> str:
    return re.search(r"at (\S+), up since", server.pop().getwelcome().decode()).group(1)


def test_crlf_and_dot_stuffing_and_octet_count(server):
    """LF-only files go out with CRLF, leading dots are stuffed, LIST octets == RETR octets."""
    text = "Subject: dots\n\n.starts with a dot\n..two dots\nend\n"
    write_message(server.maildir("bob"), "1600000000.M9.test", text)
    raw = server.raw()
    raw.line()
    raw.command("USER bob")
    assert raw.command(f"PASS {USERS['bob']}").startswith(b"+OK")
    one = raw.command("LIST 1").split()
    assert raw.command("RETR 1") == f"+OK {one[2].decode()} octets".encode()
    lines = raw.multiline()
    assert lines[-3:] == [b"..starts with a dot", b"...two dots", b"end"]
    unstuffed = [l[1:] if l.startswith(b".") else l for l in lines]
    assert len(b"\r\n".join(unstuffed) + b"\r\n") == int(one[2])
    raw.command("QUIT")


def test_wrong_state_unknown_and_bad_arguments(server):
    """Commands in the wrong state, unknown verbs and bad numbers get -ERR, the session goes on."""
    raw = server.raw()
    raw.line()
    assert raw.command("STAT") == R.WRONG_STATE.encode()
    assert raw.command("PASS nouser") == R.USER_FIRST.encode()
    assert raw.command("FROB") == R.UNKNOWN_COMMAND.encode()
    raw.command("USER alice")
    raw.command(f"PASS {USERS['alice']}")
    assert raw.command("USER alice") == R.WRONG_STATE.encode()
    assert raw.command("RETR 99") == R.NO_SUCH_MESSAGE.encode()
    assert raw.command("RETR x") == R.NO_SUCH_MESSAGE.encode()
    assert raw.command("RETR") == R.BAD_ARGUMENTS.format(verb="RETR").encode()
    assert raw.command("DELE 0") == R.NO_SUCH_MESSAGE.encode()
    assert raw.command("NOOP") == b"+OK"
    raw.command("QUIT")
    assert "Traceback" not in server.output


def test_over_long_line_gets_err_and_session_continues(server):
    """A line over 255 octets gets one -ERR; the next command works (RFC 2449 limit)."""
    raw = server.raw()
    raw.line()
    raw.send(b"NOOP " + b"x" * 5000 + b"\r\n")
    assert raw.line() == R.LINE_TOO_LONG.encode()
    assert raw.command("USER alice").startswith(b"+OK")
    raw.send(b"X" * 300 + b"\r\nNOOP\r\n")
    assert raw.line() == R.LINE_TOO_LONG.encode()
    assert raw.line() == R.WRONG_STATE.encode()
    raw.command("QUIT")


def test_bare_lf_commands_accepted(server):
    """A telnet or nc user typing LF-only lines is understood (the README's method 3)."""
    raw = server.raw()
    raw.line()
    raw.send(b"USER alice\n")
    assert raw.line() == R.PASSWORD_REQUIRED.format(user="alice").encode()
    raw.send(f"PASS {USERS['alice']}\n".encode())
    assert raw.line() == R.LOGIN_OK.encode()
    raw.send(b"QUIT\n")
    assert raw.line().startswith(b"+OK")


def test_password_with_spaces(server):
    """PASS takes the rest of the line verbatim, spaces included."""
    client = server.login("bob")  # bob's password contains a space
    assert client.stat()[0] == 3
    client.quit()


def test_two_failed_logins_close_connection_and_no_enumeration(server):
    """Unknown user and wrong password read the same; the second failure closes the line."""
    raw = server.raw()
    raw.line()
    raw.command("USER nosuchuser")
    assert raw.command("PASS x") == R.NOT_ACCESSIBLE.format(user="nosuchuser").encode()
    raw.command("USER alice")
    assert raw.command("PASS wrong") == R.NOT_ACCESSIBLE.format(user="alice").encode()
    assert raw.closed()


def test_two_sessions_of_same_user_in_use(server):
    """A second session of a user whose maildrop is open gets [IN-USE], whatever the worker."""
    first = server.login("alice")
    second = server.pop()
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(USERS["alice"])
    first.quit()
    second.user("alice")
    second.pass_(USERS["alice"])  # the lock went with the first session
    second.quit()


def test_dropped_connection_deletes_nothing(server):
    """DELE then a dropped connection (no QUIT) leaves every message in place."""
    client = server.login("carol")
    client.dele(1)
    client.dele(2)
    client.close()  # drop the connection without QUIT
    again = _retry_login(server, "carol")
    assert again.stat()[0] == 3
    again.quit()


def _retry_login(server, user: str, timeout: float = 5.0) -> poplib.POP3:
    """Log in, retrying while the previous session's lock is being released."""
    logged_in: list[poplib.POP3] = []

    def attempt() -> bool:
        client = server.pop()
        client.user(user)
        try:
            client.pass_(USERS[user])
        except poplib.error_proto as exc:
            client.close()
            if b"IN-USE" not in exc.args[0]:
                raise
            return False
        logged_in.append(client)
        return True

    assert wait_until(attempt, timeout, step=0.1), "maildrop stayed locked"
    return logged_in[0]


def test_mail_delivered_during_session_not_shown_not_lost(server):
    """A message delivered mid-session is not in this session and survives its QUIT."""
    client = server.login("alice")
    write_message(server.maildir("alice"), "1800000000.M99.test", sample(99))
    assert client.stat()[0] == 3
    client.dele(1)
    client.quit()
    again = server.login("alice")
    assert again.stat()[0] == 3  # 2 old + the new one
    assert b"Subject: message 99" in b"\n".join(again.retr(3)[1])
    again.quit()


def test_user_without_maildir_has_empty_maildrop(start_server):
    """A user who never received mail logs in to an empty maildrop, not an error."""
    server = start_server(deliver=False)
    client = server.login("alice")
    assert client.stat() == (0, 0)
    assert client.list()[1] == []
    client.quit()


def test_concurrent_sessions_of_different_users_across_workers(server):
    """Parallel sessions of different users on both workers each get their own mail right."""
    errors: list[str] = []
    clients = {user: server.login(user) for user in USERS}
    slots = {server.worker_of(c.sock.getsockname()[1]) for c in clients.values()}
    assert slots == {1, 2}

    def fetch(user: str) -> None:
        try:
            client = clients[user]
            for n in (1, 2, 3):
                lines = client.retr(n)[1]
                if f"Subject: message {n}".encode() not in lines:
                    errors.append(f"{user} {n}")
            client.quit()
        except Exception as exc:  # reported below
            errors.append(f"{user}: {exc!r}")

    threads = [threading.Thread(target=fetch, args=(u,)) for u in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_disconnect_mid_retr_leaves_worker_healthy(server):
    """A client that vanishes in the middle of a big RETR costs nothing but its session."""
    write_message(server.maildir("bob"), "1500000000.M1.big", "Subject: big\n\n" +
                  ("x" * 1000 + "\n") * 8000)
    raw = server.raw()
    raw.line()
    raw.command("USER bob")
    raw.command(f"PASS {USERS['bob']}")
    raw.send(b"RETR 1\r\n")
    raw.sock.recv(1000)
    raw.close()
    pids = server.worker_pids()
    client = server.login("alice")
    assert client.stat()[0] == 3
    client.quit()
    again = _retry_login(server, "bob")
    assert again.stat()[0] == 4
    again.quit()
    assert server.worker_pids() == pids
    assert "Traceback" not in server.output


def test_pipelined_batch_gets_every_reply_in_order(server):
    """RFC 2449 PIPELINING: a batch sent in one write gets one reply per command, in order."""
    raw = server.raw()
    raw.line()
    batch = ["USER alice", f"PASS {USERS['alice']}"] + ["NOOP", "STAT", "LIST 1"] * 40 + ["UIDL 2"]
    raw.send(("\r\n".join(batch) + "\r\n").encode())
    assert raw.line() == R.PASSWORD_REQUIRED.format(user="alice").encode()
    assert raw.line() == R.LOGIN_OK.encode()
    for _ in range(40):
        assert raw.line() == b"+OK"
        assert raw.line().startswith(b"+OK 3 ")
        assert raw.line().startswith(b"+OK 1 ")
    assert raw.line().startswith(b"+OK 2 ")
    assert raw.command("QUIT").startswith(b"+OK")
