"""fail2ban: the shipped filter and jails (etc/fail2ban) against logs the real server writes.

fail2ban-regex (Debian package fail2ban, installed by ``dev.py test``) runs the filter over a
log file the server wrote with -logfile, and over its standard output in the form fail2ban's
systemd backend gives a journal entry (no journald runs in the tests).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, USERS, Server, sample, write_message
from processes import wait_until
from test_logging import FileLoggedServer
from worker import replies as R

FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "iupop3.conf"
JAILS = ROOT / "etc" / "fail2ban" / "jail.d" / "iupop3.conf"
FAILED = re.compile(r"INFO +worker-\d+ \S+ login failed for ")
# Three failures from 127.0.0.1, one from ::1; successes and a forged line must not count.
EXPECTED = sorted(["127.0.0.1"] * 3 + ["::1"])
FORGED = "NOOP login failed for x from 192.0.2.7 port 1 (attempt 1), delay 0s"


def _deliver(server: Server) -> None:
    for user in USERS:
        for n in (1, 2, 3):
            write_message(server.maildir(user), f"{1700000000 + n}.M{n}.test", sample(n))


def _v6_port(listening: str) -> int:
    return int(re.search(r"\[::1\]:(\d+)", listening).group(1))


def _attempts(port4: int, port6: int) -> None:
    """Failed logins by USER/PASS (known and unknown user) and AUTH PLAIN over IPv4, one over
    IPv6, a successful login on each, and a client line that imitates a failure."""
    from conftest import RawClient

    raw = RawClient(port4, 30)
    raw.line()
    raw.command(FORGED)
    raw.command("USER alice")
    assert raw.command("PASS wrong") == R.NOT_ACCESSIBLE.format(user="alice").encode()
    raw.command("USER nosuchuser")
    assert raw.command("PASS wrong") == R.NOT_ACCESSIBLE.format(user="nosuchuser").encode()
    raw.close()  # two failures: the server closes (-login_attempts 2)
    raw = RawClient(port4, 30)
    raw.line()
    bad = base64.b64encode(b"\0bob\0not-his").decode()
    assert raw.command(f"AUTH PLAIN {bad}") == R.SASL_FAILED.format(user="bob").encode()
    raw.command("USER alice")
    assert raw.command(f"PASS {USERS['alice']}") == R.LOGIN_OK.encode()
    raw.command("QUIT")
    raw.close()
    import socket

    sock = socket.create_connection(("::1", port6), timeout=30)
    with sock, sock.makefile("rwb") as conn:
        conn.readline()
        for line in ("USER carol", "PASS wrong", "USER carol", f"PASS {USERS['carol']}", "QUIT"):
            conn.write(line.encode() + b"\r\n")
            conn.flush()
            reply = conn.readline()
        assert reply.startswith(b"+OK")


def _regex(log: Path) -> list[str]:
    """The client addresses fail2ban-regex finds in ``log`` with the shipped filter."""
    run = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), str(FILTER)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(run.stdout.split())


@pytest.fixture(autouse=True)
def _fail2ban_installed():
    assert shutil.which("fail2ban-regex"), "fail2ban-regex missing: python3 dev.py test installs it"


def test_failed_logins_reach_the_file_at_once_and_fail2ban_finds_them(tmp_path):
    """At the default level and flush interval (180 s) every failed login is in the log file
    within seconds; fail2ban-regex finds exactly the failures (IPv4 and IPv6), not the
    successful logins nor a client's line that imitates a failure."""
    server = FileLoggedServer(tmp_path, ["-listen", "::1", "-auth-delay", "0", "-auth-block", "0"])
    _deliver(server)
    try:
        server.start()
        _attempts(server.port, _v6_port(server.ready_message))
        done = time.monotonic()
        assert wait_until(lambda: sum(bool(FAILED.search(line))
                                      for line in server.log_lines()) == 4, 10), \
            server.log_lines()
        seen_after = time.monotonic() - done
        assert _regex(server.logfile) == EXPECTED
        server.stop_cleanly()
    finally:
        server.stop()
    text = server.logfile.read_text()
    assert "logged in" in text and FORGED in text  # there to be missed, not missing
    assert _regex(server.logfile) == EXPECTED
    print(f"\nfailed logins in the file {seen_after * 1000:.0f} ms after the last attempt "
          f"(-log_flush 180); fail2ban-regex on the file: {EXPECTED}")


def test_fail2ban_finds_failed_logins_in_journal_entries(start_server, tmp_path):
    """Standard output (the journal under systemd) as fail2ban's systemd backend formats each
    entry ("HOST IDENT[PID]: MESSAGE"): the same failures are found, nothing else."""
    server = start_server("-listen", "::1", "-loglevel", "THREAD", "-auth-delay", "0",
                          "-auth-block", "0")
    listening = server.wait_for(r"listening on (.*) with").group(1)
    _attempts(server.port, _v6_port(listening))
    server.wait_for(r"login failed for carol from ::1 ")
    journal = tmp_path / "journal.txt"
    journal.write_text("".join(f"mailhost iupop3[{server.proc.pid}]: {line}\n"
                               for line in server.output.splitlines()))
    assert _regex(journal) == EXPECTED


def test_jails_load_in_fail2ban(tmp_path):
    """fail2ban-client parses both jails with the filter (file backend on a log path, systemd
    backend with the unit's journal match) when they are enabled."""
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for name in (conf / "jail.d").iterdir():
        name.unlink()  # the distribution's own enabled jails (sshd) need their own logs
    shutil.copy(FILTER, conf / "filter.d" / "iupop3.conf")
    log = tmp_path / "iupop3.log"
    log.write_text("")
    jails = JAILS.read_text().replace("enabled  = false", "enabled  = true")
    (conf / "jail.d" / "iupop3.conf").write_text(
        jails.replace("/var/log/iupop3/iupop3.log", str(log)))
    run = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "['add', 'iupop3', 'auto']" in run.stdout
    assert "['add', 'iupop3-journal', 'systemd']" in run.stdout
    assert f"['set', 'iupop3', 'addlogpath', '{log}', 'head']" in run.stdout
    assert "['set', 'iupop3-journal', 'addjournalmatch', '_SYSTEMD_UNIT=iupop3.service']" \
        in run.stdout
