"""Issue 15: an idle logged-in session parks without a greenlet (worker.parking) and loses
nothing by it: its next command, its idle timeout, a takeover and a shutdown all reach it
as they reach a session with a greenlet."""

from __future__ import annotations

import re
import signal

from conftest import USERS
from processes import wait_until
from worker import replies as R
from worker.parking import PARK_AFTER

PARKED = r"w\d+\.\d+ idle: parked without a greenlet"


def _logged_in(server, user: str = "alice"):
    raw = server.raw(timeout=30)
    assert raw.line().startswith(b"+OK")
    assert raw.command(f"USER {user}").startswith(b"+OK")
    assert raw.command(f"PASS {USERS[user]}") == R.LOGIN_OK.encode()
    return raw


def test_a_parked_session_serves_its_next_commands_and_applies_its_quit(start_server):
    """Parked after a DELE, the session answers NOOP, RETR and STAT at once and its QUIT
    deletes the message; it parks again between commands."""
    server = start_server("-workers", "1")
    raw = _logged_in(server)
    assert raw.command("DELE 1").startswith(b"+OK")
    server.wait_for(PARKED)
    parks = len(re.findall(PARKED, server.output))
    assert raw.command("NOOP") == R.NOOP.encode()
    assert raw.command("RETR 2").startswith(b"+OK")
    assert b"Subject: message 2" in b"\n".join(raw.multiline())
    # Nothing more to read after the RETR: it parks again (and maybe after the NOOP too).
    assert wait_until(lambda: len(re.findall(PARKED, server.output)) > parks)
    assert raw.command("STAT").startswith(b"+OK 2 ")
    assert raw.command("QUIT").startswith(b"+OK")
    folder = server.maildir("alice")
    assert wait_until(lambda: sorted(p.name for p in (folder / "new").iterdir())
                      + sorted(p.name for p in (folder / "cur").iterdir())
                      == ["1700000002.M2.test", "1700000003.M3.test"])


def test_pipelined_commands_after_parking_are_all_answered(start_server):
    """Three commands in one packet to a parked session: three answers, in order."""
    server = start_server("-workers", "1")
    raw = _logged_in(server)
    server.wait_for(PARKED)
    raw.send(b"NOOP\r\nSTAT\r\nNOOP\r\n")
    assert raw.line() == R.NOOP.encode()
    assert raw.line().startswith(b"+OK 3 ")
    assert raw.line() == R.NOOP.encode()


def test_a_parked_session_times_out_at_its_idle_deadline(start_server):
    """-timeout passes while parked: the client gets the timeout line, the lock goes (a new
    login of the same user succeeds at once)."""
    timeout = int(PARK_AFTER) + 3
    server = start_server("-workers", "1", "-timeout", str(timeout))
    raw = _logged_in(server)
    server.wait_for(PARKED)
    server.wait_for(rf"timeout after {timeout}s of silence", timeout=timeout + 15)
    assert raw.line() == R.TIMEOUT.format(seconds=timeout).encode()
    again = _logged_in(server)
    assert again.command("QUIT").startswith(b"+OK")


def test_a_parked_session_is_taken_over_by_a_new_login(start_server):
    """A new login of a parked session's user ends it (-takeover-idle 1): the old client is
    told, nothing it marked is deleted, the new one logs in."""
    server = start_server("-workers", "1", "-takeover-idle", "1", "-lock-wait", "10")
    old = _logged_in(server)
    assert old.command("DELE 1").startswith(b"+OK")
    server.wait_for(PARKED)
    new = _logged_in(server)
    assert old.line() == R.TAKEN_OVER.encode()
    assert new.command("STAT").startswith(b"+OK 3 ")
    assert new.command("QUIT").startswith(b"+OK")


def test_a_parked_session_is_closed_at_the_shutdown_deadline(start_server):
    """SIGTERM with -grace 1 and a parked session: the client gets the shutdown line and the
    server exits 0 without applying the session's DELE."""
    server = start_server("-workers", "1", "-grace", "1")
    raw = _logged_in(server)
    assert raw.command("DELE 1").startswith(b"+OK")
    server.wait_for(PARKED)
    server.signal(signal.SIGTERM)
    assert raw.line() == R.SHUTTING_DOWN.encode()
    assert server.wait_exit() == 0
    assert (server.maildir("alice") / "new" / "1700000001.M1.test").exists()
