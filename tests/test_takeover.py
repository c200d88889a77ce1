"""Lock takeover (issue 13 item 1) against the real server: an idle holder is ended unapplied
by a new login, from another worker or another node of this host; an active one makes the
login wait for -lock-wait; forged lock stamps and foreign requests end nothing."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.conftest import USERS
from tests.test_mbox import read_all, spool_of
from tests.test_mbox import sample as mbox_message
from worker import replies as R
from worker.takeover import (make_stamp, new_token, parse_answer, parse_stamp,
                             socket_address)

IDLE = "1"  # -takeover-idle in these tests: the holders are silent clients


TOKEN = "0123456789abcdef" * 2


def test_stamps_round_trip_and_junk_is_refused():
    """A lock stamp names host, pid, socket token and session; anything else a user may write
    (a version 1 stamp without token included) is None."""
    stamp = parse_stamp(make_stamp("w2.17", TOKEN, 4242))
    assert stamp is not None and (stamp.pid, stamp.token, stamp.session) == (4242, TOKEN,
                                                                            "w2.17")
    good = make_stamp("w1.1", TOKEN, 99)
    for junk in (b"", good[:-1], good + b"x", good.replace(b" 99 ", b" 0 "),
                 good.replace(b" 99 ", b" -9 "), good.replace(b" 99 ", b" 12345678901 "),
                 good.replace(b"w1.1", b"w" * 40), b"\x00" * 50, good.replace(b"2 ", b"1 ", 1),
                 good.replace(TOKEN.encode(), b"A" * 32), good.replace(TOKEN.encode(), b"0" * 31),
                 good.replace(f" {TOKEN}".encode(), b"")):
        assert parse_stamp(junk) is None, junk


def test_takeover_socket_names_are_not_predictable():
    """Two tokens differ and a socket name holds the token, not the pid."""
    assert new_token() != new_token() and len(new_token()) == 32
    assert socket_address(TOKEN) == b"\0iupop3-takeover-" + TOKEN.encode()


def test_answers_are_parsed_strictly():
    """A holder's answer is one of four words; anything else counts as no answer at all."""
    assert parse_answer("ENDED 12.5").word == "ENDED"
    assert parse_answer("ACTIVE 3.0").idle == 3.0
    assert parse_answer("UPDATE").word == "UPDATE"
    for junk in ("", "ended", "ENDED x", "ENDED 1e9", "OK", "ENDED 1.0 more"):
        assert parse_answer(junk).word == "UNREACHABLE", junk


def login(server, user: str = "alice"):
    """A raw client logged in (the +OK checked); its PASS took ``elapsed`` seconds."""
    client = server.raw()
    assert client.line().startswith(b"+OK")
    assert client.command(f"USER {user}").startswith(b"+OK")
    started = time.monotonic()
    reply = client.command(f"PASS {USERS[user]}")
    client.elapsed = time.monotonic() - started
    client.reply = reply
    return client


def ended_by_takeover(client) -> bool:
    """The client was told its session was taken over, and then the server closed it."""
    return client.line() == R.TAKEN_OVER.encode() and client.closed()


def messages_on_disk(server, user: str = "alice") -> int:
    return sum(len(os.listdir(server.maildir(user) / sub)) for sub in ("new", "cur"))


def test_silent_holder_is_taken_over_from_another_worker_and_its_deles_dropped(start_server):
    """A client that logs in, DELEs and goes silent (socket open) is ended by a second login
    on the other worker once idle -takeover-idle; its DELE is not applied."""
    server = start_server("-takeover-idle", IDLE)
    holder = login(server)
    assert holder.reply.startswith(b"+OK")
    assert holder.command("DELE 1").startswith(b"+OK")
    silent_since = time.monotonic()
    newcomer = login(server)
    assert newcomer.reply == R.LOGIN_OK.encode()  # not [IN-USE]: well within -lock-wait
    assert ended_by_takeover(holder)
    waited = time.monotonic() - silent_since
    assert newcomer.command("STAT").startswith(b"+OK 3 ")
    assert newcomer.command("QUIT").startswith(b"+OK")
    assert messages_on_disk(server) == 3
    assert server.worker_of(holder.local_port) != server.worker_of(newcomer.local_port)
    took = server.wait_for(r"took over session (\S+) of pid \d+, idle ([0-9.]+)s")
    server.wait_for(rf"{re.escape(took.group(1))} session taken over by a new login")
    print(f"\ntakeover: new login's PASS answered after {newcomer.elapsed * 1000:.0f} ms; "
          f"holder silent {waited:.2f}s when told; holder idle {took.group(2)}s at the end")


def test_active_holder_makes_the_login_wait_until_it_quits(start_server):
    """A login that finds an active session waits (no reply yet) and gets +OK once the
    holder QUITs, with the holder's DELE applied."""
    server = start_server()
    holder = login(server)
    assert holder.command("DELE 1").startswith(b"+OK")
    waiter = server.raw()
    waiter.line()
    waiter.command("USER alice")
    mark = server.mark()
    waiter.send(f"PASS {USERS['alice']}\r\n".encode())
    server.wait_for(r"maildrop of alice held by another session: waiting up to 5s", start=mark)
    assert holder.command("QUIT").startswith(b"+OK")
    assert waiter.line() == R.LOGIN_OK.encode()
    assert waiter.command("STAT").startswith(b"+OK 2 ")
    assert "took over" not in server.output


def test_active_holder_gives_in_use_after_lock_wait(start_server):
    """Held by an active session longer than -lock-wait: -ERR [IN-USE], the holder unharmed."""
    server = start_server("-lock-wait", "1")
    holder = login(server)
    assert holder.command("DELE 1").startswith(b"+OK")
    refused = login(server)
    assert refused.reply == R.IN_USE.encode()
    assert refused.elapsed >= 1.0  # it waited for -lock-wait first
    assert holder.command("NOOP") == b"+OK"
    assert holder.command("QUIT").startswith(b"+OK")
    assert messages_on_disk(server) == 2


def test_two_racing_logins_take_over_once(start_server):
    """Two logins racing for one idle holder: it is ended once, exactly one login wins, the
    other is answered [IN-USE] (-lock-wait 0), and nothing is applied."""
    server = start_server("-takeover-idle", IDLE, "-lock-wait", "0")
    holder = login(server)
    assert holder.command("DELE 2").startswith(b"+OK")
    racers = []
    for _ in range(2):
        racer = server.raw()
        racer.line()
        racer.command("USER alice")
        racers.append(racer)
    time.sleep(float(IDLE) + 0.2)  # a lower bound on the holder's idle time, not a hope
    started = time.monotonic()
    for racer in racers:
        racer.send(f"PASS {USERS['alice']}\r\n".encode())
    replies = sorted(racer.line() for racer in racers)
    answered = time.monotonic() - started
    assert replies == sorted([R.LOGIN_OK.encode(), R.IN_USE.encode()])
    assert ended_by_takeover(holder)
    told = time.monotonic() - started
    print(f"\nrace: both racers answered {answered * 1000:.0f} ms after their PASS; the idle"
          f" holder had its -ERR within {told * 1000:.0f} ms")
    assert server.output.count("session taken over by a new login") == 1
    assert messages_on_disk(server) == 3


def test_holder_on_another_node_of_this_host_is_taken_over(start_server):
    """Two server instances sharing one mail tree: a login on the second ends the idle
    session on the first."""
    first = start_server("-takeover-idle", IDLE)
    second = start_server("-takeover-idle", IDLE, root=first.root, deliver=False)
    holder = login(first)
    assert holder.command("DELE 3").startswith(b"+OK")
    newcomer = login(second)
    assert newcomer.reply == R.LOGIN_OK.encode()
    assert ended_by_takeover(holder)
    assert newcomer.command("STAT").startswith(b"+OK 3 ")
    first.wait_for(r"session taken over by a new login")
    second.wait_for(r"took over session")


def test_silent_holder_of_an_mbox_is_taken_over(start_server, tmp_path):
    """With -mail mbox: the session lock beside the spool is taken over the same way (here
    by a login on the holder's own worker), and the spool is left as it was."""
    root = tmp_path / "srv"
    (root / "spool").mkdir(parents=True)
    spool = root / "spool" / "alice"
    spool.write_bytes(spool_of([mbox_message(1), mbox_message(2)]))
    server = start_server("-mail", f"mbox:{root}/spool/%u", "-takeover-idle", IDLE,
                          "-workers", "1", root=root, deliver=False)  # both on one worker
    holder = login(server)
    assert holder.command("DELE 1").startswith(b"+OK")
    newcomer = login(server)
    assert newcomer.reply == R.LOGIN_OK.encode()
    assert ended_by_takeover(holder)
    assert newcomer.command("QUIT").startswith(b"+OK")
    assert read_all(spool) == [mbox_message(1), mbox_message(2)]
    assert parse_stamp((root / "spool" / ".alice.iupop3.lock").read_bytes()) is not None


def session_of(server, port: int) -> tuple[str, int]:
    """(session id, worker pid) of the session whose client port is ``port``."""
    match = server.wait_for(rf"worker-(\d+) (\S+) connect from 127\.0\.0\.1:{port}\b")
    return match.group(2), server.worker_pids()[int(match.group(1))]


def test_forged_stamp_cannot_end_another_users_session(start_server):
    """alice rewrites her held lock to name bob's idle session: her next login asks bob's
    worker, which refuses (bob holds another lock file), and waits out -lock-wait instead."""
    server = start_server("-takeover-idle", IDLE, "-lock-wait", "1")
    bob = login(server, "bob")
    alice = login(server)
    session, pid = session_of(server, bob.local_port)
    lock = server.maildir("alice") / ".iupop3.lock"
    token = token_of(server, "bob")  # as alice could learn it where bob's lock is readable
    # As alice could where she can write the file (it lies in her own Maildir): assume so.
    with open(lock, "r+b") as fh:
        fh.truncate(0)
        fh.write(make_stamp(session, token, pid))
    mark = server.mark()
    again = login(server)
    assert again.reply == R.IN_USE.encode()
    server.wait_for(rf"lock holder {re.escape(session)}: UNKNOWN", start=mark)  # bob's worker
    assert bob.command("NOOP") == b"+OK"
    assert alice.command("NOOP") == b"+OK"
    assert "taken over" not in server.output


NOBODY = 65534


def token_of(server, user: str) -> str:
    """The takeover socket token in the stamp of ``user``'s held lock."""
    stamp = parse_stamp((server.maildir(user) / ".iupop3.lock").read_bytes())
    assert stamp is not None
    return stamp.token


def run_as_nobody(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["/usr/bin/python3", "-c", code, *args], user=NOBODY,
                            group=NOBODY, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/")


REQUEST_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(b"\\0iupop3-takeover-" + sys.argv[1].encode())  # the token
try:
    s.sendall(sys.argv[2].encode() + b"\\n")
    print(s.recv(100))
except OSError:  # closed at once: the same refusal
    print(b"")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_request_from_another_user_ends_nothing(start_server):
    """A local user who connects to a worker's takeover socket with a request naming a real
    idle session and its lock file is refused by SO_PEERCRED: the session lives on."""
    server = start_server("-takeover-idle", IDLE)
    alice = login(server)
    session, _ = session_of(server, alice.local_port)
    st = os.stat(server.maildir("alice") / ".iupop3.lock")
    time.sleep(float(IDLE) + 0.2)  # idle long enough: only the sender's uid stops it
    probe = run_as_nobody(REQUEST_AS_NOBODY, token_of(server, "alice"),
                          f"TAKEOVER {session} {st.st_dev} {st.st_ino} mallory")
    out, err = probe.communicate(timeout=10)
    assert out.strip() == b"b''", (out, err)  # closed without an answer
    server.wait_for(rf"takeover request from pid {probe.pid} uid {NOBODY} refused")
    assert alice.command("NOOP") == b"+OK"


SQUATTER = """
import socket, sys, os
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\\0iupop3-takeover-" + sys.argv[1].encode())
s.listen(5)
print("ready", flush=True)
s.settimeout(8)
try:
    while True:
        c, _ = s.accept()
        c.sendall(b"ENDED 99.0\\n")
        c.close()
        print("asked", flush=True)
except socket.timeout:
    pass
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a listener as another user")
def test_stamp_naming_a_foreign_listener_is_not_believed(start_server):
    """A stamp naming the pid of a user's process that listens on that pid's takeover address
    and answers ENDED (pid reuse, or a planted stamp): the login sees it is not the server's
    user, does not count it as a takeover, and waits out -lock-wait."""
    server = start_server("-takeover-idle", IDLE, "-lock-wait", "1")
    alice = login(server)
    token = new_token()
    squatter = run_as_nobody(SQUATTER, token)
    try:
        assert squatter.stdout.readline() == b"ready\n"
        lock = server.maildir("alice") / ".iupop3.lock"
        with open(lock, "r+b") as fh:
            fh.truncate(0)
            fh.write(make_stamp("w1.1", token, squatter.pid))
        again = login(server)
        assert again.reply == R.IN_USE.encode()
        server.wait_for(r"lock holder w1\.1: UNREACHABLE .*is not a worker's")
        assert "took over" not in server.output
        assert alice.command("NOOP") == b"+OK"
    finally:
        squatter.kill()
        squatter.communicate()


SQUAT_NEXT_PIDS = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a descriptor per name
first, count = int(sys.argv[1]), int(sys.argv[2])
held = []
for pid in range(first, first + count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(b"\\0iupop3-takeover-%d" % pid)
    except OSError:
        s.close()
        continue
    held.append(s)
print("ready", len(held), flush=True)
sys.stdin.read()  # until the test closes our stdin
"""
SQUAT_COUNT = 3000  # pids taken ahead: far more than the machine starts while the server does


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the squatter as another user")
def test_squatted_pid_names_do_not_turn_takeover_off(start_server):
    """A local user binds the takeover socket names of the next few thousand pids before the
    server starts: its workers still listen (random names) and an idle holder is taken over."""
    with open("/proc/sys/kernel/ns_last_pid") as fh:
        first = int(fh.read()) + 1
    squatter = subprocess.Popen(["/usr/bin/python3", "-c", SQUAT_NEXT_PIDS, str(first),
                                 str(SQUAT_COUNT)], user=NOBODY, group=NOBODY,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
    try:
        assert squatter.stdout.readline().startswith(b"ready")
        server = start_server("-takeover-idle", IDLE)
        assert any(first <= pid < first + SQUAT_COUNT for pid in server.worker_pids().values())
        holder = login(server)
        assert holder.reply.startswith(b"+OK")
        newcomer = login(server)
        assert newcomer.reply == R.LOGIN_OK.encode()
        assert ended_by_takeover(holder)
        assert "lock takeover unavailable" not in server.output
    finally:
        squatter.stdin.close()
        squatter.wait(10)
