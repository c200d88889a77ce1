"""Logging: the four levels, the line format, masking, the flush interval, midnight rotation.

Integration tests run the real server with -logfile and learn its port from the readiness
message it sends to $NOTIFY_SOCKET (the log file may be buffered, so it cannot tell them).
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, USERS, Server, sample, write_message
from processes import all_pids, stat, wait_until
from shared import logsetup
from worker import replies as R
from supervisor.rotation import MidnightRotation

_LEVEL_FIELD = "|".join(f"{name:<6}" for name in logsetup.LEVEL_NAMES)  # padded as logged
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (" + _LEVEL_FIELD + ") "
                  r"(supervisor|worker-\d+) (-|w\d+\.\d+) (.*)$")


# -- a server that logs to a file --------------------------------------------------------------
class FileLoggedServer(Server):
    """The real server with -logfile; port and pid come from its sd_notify readiness message."""

    def __init__(self, root: Path, args: list[str], env: dict[str, str] | None = None):
        super().__init__(root, args, None, env)
        self.logfile = root / "log" / "iupop3.log"
        self.pid = 0

    def start(self) -> "FileLoggedServer":
        self.logfile.parent.mkdir(exist_ok=True)
        name = f"iupop3-test-{uuid.uuid4().hex}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind("\0" + name)  # abstract: no path length limit, nothing to clean up
        notify.settimeout(20)
        cmd = [sys.executable, "-m", "supervisor", "-users", str(self.users_file),
               "-mail", f"maildir:{self.mail}/%u", "-listen", "127.0.0.1", "-port", "0",
               "-workers", "2", "-logfile", str(self.logfile), *self.args]
        env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET="@" + name,
                   **(self.env or {}))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            message = notify.recv(4096).decode()
        except socket.timeout:
            pytest.fail(f"no readiness message; output:\n{self.output}")
        finally:
            notify.close()
        self.ready_message = message  # "listening on" every address, e.g. [::1]:PORT too
        match = re.search(r"STATUS=pid (\d+) listening on 127\.0\.0\.1:(\d+)", message)
        assert match and "READY=1" in message, message
        self.pid, self.port = int(match.group(1)), int(match.group(2))
        return self

    def log_lines(self, path: Path | None = None) -> list[str]:
        path = path or self.logfile
        return path.read_text().splitlines() if path.exists() else []

    def log_has(self, pattern: str, path: Path | None = None, timeout: float = 10.0) -> bool:
        regex = re.compile(pattern)
        return wait_until(lambda: any(regex.search(l) for l in self.log_lines(path)), timeout)

    def stop_cleanly(self) -> None:
        self.signal(signal.SIGTERM)
        assert self.wait_exit(30) == 0


@pytest.fixture
def logged_server(tmp_path):
    """Factory: ``logged_server(*args, env=...)`` starts a server logging to a file."""
    servers: list[FileLoggedServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> FileLoggedServer:
        root = tmp_path / f"server{len(servers)}"
        root.mkdir()
        server = FileLoggedServer(root, list(args), env)
        for user in USERS:
            for n in (1, 2, 3):
                write_message(server.maildir(user), f"{1700000000 + n}.M{n}.test", sample(n))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def _worker_titles(supervisor_pid: int) -> dict[int, str]:
    """Worker pid -> process title, for the children of the supervisor."""
    titles = {}
    for pid in all_pids():
        info = stat(pid)
        if info is not None and info["ppid"] == supervisor_pid:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    titles[pid] = fh.read().rstrip(b"\0").decode()
            except OSError:
                continue
    return titles


# -- pure logic ---------------------------------------------------------------------------------
@pytest.mark.parametrize("line, shown", [
    (b"PASS wonder land", "PASS ********"),
    (b"pass x", "pass ********"),
    (b"PASS", "PASS"),
    (b"PASS\tHunter2", "PASS ********"),       # any whitespace ends the verb (issue 10)
    (b" PASS x", "PASS ********"),             # so does leading whitespace
    (b"PASS\x0bHunter2 two", "PASS ********"),
    (b"APOP carol c4a0d0f2e8b6a4c2", "APOP carol ********"),
    (b"AUTH PLAIN AGNhcm9sAGM0cjBs", "AUTH PLAIN ********"),
    (b"AUTH\tPLAIN\tAGNhcm9sAGM0cjBs", "AUTH PLAIN ********"),
    (b"AUTH PLAIN", "AUTH PLAIN"),
    (b"USER alice", "USER alice"),
    (b"RETR 1", "RETR 1"),
    (b"NOOP\x1b[2J", "NOOP\\x1b[2J"),
])
def test_masked_line_hides_secrets(line, shown):
    """PASS, APOP and AUTH lines keep their verb (and user or mechanism), never the secret,
    whatever whitespace separates the words."""
    assert logsetup.masked_line(line) == shown


def test_masked_sasl_response_and_length_limit():
    """A line answering an AUTH challenge is all secret; other lines are cut at 100 characters."""
    assert logsetup.masked_line(b"AGNhcm9sAGM0cjBs", sasl_response=True) == "********"
    assert logsetup.masked_line(b"NOOP " + b"x" * 300) == "NOOP " + "x" * 95


def test_formatter_escapes_every_argument():
    """A file name (or any text) passed as an argument cannot start a line of its own or carry
    an escape sequence; numbers still format with %d."""
    formatter = logsetup.LineFormatter("worker-1")
    name = "1700000009.M9.x\n2030-01-01 00:00:00.000 ERROR  supervisor - forged\x1b[2J"
    record = logging.LogRecord("iupop3", logsetup.THREAD, __file__, 1, "RETR %d uid %s: %s",
                               (3, name, OSError(f"bad\r{name}")), None)
    record.session = "w1.2"
    text = formatter.format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert text.endswith("RETR 3 uid 1700000009.M9.x\\n2030-01-01 00:00:00.000 ERROR  "
                         "supervisor - forged\\x1b[2J: bad\\r1700000009.M9.x\\n2030-01-01 "
                         "00:00:00.000 ERROR  supervisor - forged\\x1b[2J")


def test_formatter_prefixes_every_line_of_a_traceback():
    """A traceback keeps time, level, role and session on each line, so grep finds all of it."""
    formatter = logsetup.LineFormatter("worker-3")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("iupop3", logging.ERROR, __file__, 1, "error in %s", ("RETR",),
                                   sys.exc_info())
    record.session = "w3.9"
    lines = formatter.format(record).splitlines()
    assert len(lines) > 2
    for line in lines:
        match = LINE.match(line)
        assert match and match.group(3, 4) == ("worker-3", "w3.9"), line
    assert lines[0].endswith("error in RETR") and lines[-1].endswith("ValueError: boom")


def test_file_handler_buffers_until_interval_or_error(tmp_path):
    """Lines wait in the buffer; an ERROR line takes them all to the disk at once."""
    path = tmp_path / "x.log"
    handler = logsetup.LogFileHandler(str(path), flush_seconds=3600)
    handler.setFormatter(logsetup.LineFormatter("supervisor"))
    make = lambda level, text: logging.LogRecord("iupop3", level, "", 0, text, (), None)
    handler.handle(make(logsetup.THREAD, "first"))
    handler.flush_if_due()
    assert path.read_text() == ""
    handler.handle(make(logging.ERROR, "bad"))
    assert [l.split()[-1] for l in path.read_text().splitlines()] == ["first", "bad"]
    handler.flush_seconds = 0.2
    handler.handle(make(logging.INFO, "later"))
    time.sleep(0.25)
    handler.flush_if_due()  # the loops call this every second
    assert path.read_text().splitlines()[-1].endswith("later")
    handler.close()


def test_file_handler_writes_whole_lines_and_reopens(tmp_path):
    """A full buffer is written before a line that would not fit; reopen continues in a new file."""
    path = tmp_path / "x.log"
    handler = logsetup.LogFileHandler(str(path), flush_seconds=3600)
    handler.setFormatter(logsetup.LineFormatter("supervisor"))
    for n in range(2000):
        handler.handle(logging.LogRecord("iupop3", logging.INFO, "", 0, f"line {n:05d} " + "x" * 80,
                                         (), None))
        text = path.read_text()
        assert text == "" or text.endswith("\n")
    handler.flush()
    assert len(path.read_text().splitlines()) == 2000
    os.rename(path, tmp_path / "x.log.old")
    handler.reopen()
    handler.handle(logging.LogRecord("iupop3", logging.ERROR, "", 0, "after", (), None))
    assert path.read_text().rstrip().endswith("after")
    handler.close()


def test_rotation_clock(tmp_path):
    """Due only once the local day advances; the file takes the ended day's name, never clobbering."""
    now = [time.mktime((2030, 6, 14, 23, 59, 58, 0, 0, -1))]
    path = tmp_path / "iupop3.log"
    path.write_text("old\n")
    rotation = MidnightRotation(str(path), clock=lambda: now[0])
    assert not rotation.due()
    now[0] += 3
    assert rotation.due()
    (tmp_path / "iupop3.log.2030-06-14").write_text("taken\n")
    assert rotation.rotate() == str(tmp_path / "iupop3.log.2030-06-14.1")
    assert not path.exists() and (tmp_path / "iupop3.log.2030-06-14.1").read_text() == "old\n"
    assert not rotation.due()
    now[0] -= 86400  # the clock is set back a day: no rotation, the file now belongs to that day
    assert not rotation.due()
    assert rotation.day == datetime.date(2030, 6, 14)


def test_rotation_of_a_file_left_from_an_earlier_day(tmp_path):
    """A log last written before today (server stopped overnight) is recognised at start."""
    path = tmp_path / "iupop3.log"
    path.write_text("yesterday\n")
    stamp = time.time() - 2 * 86400
    os.utime(path, (stamp, stamp))
    rotation = MidnightRotation(str(path))
    assert rotation.left_from_before() == datetime.date.fromtimestamp(stamp)
    os.utime(path)
    assert rotation.left_from_before() is None


# -- the real server ------------------------------------------------------------------------------
def test_line_format_and_one_session_by_grep(logged_server):
    """Every line has time, level, role and session id; grep of an id gives the whole session."""
    server = logged_server("-loglevel", "THREAD", "-log_flush", "0")
    client = server.login("alice")
    client.retr(1)
    client.quit()
    server.stop_cleanly()
    lines = server.log_lines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [l for l, m in zip(lines, parsed) if not m]
    assert {m.group(2).strip() for m in parsed} <= {"ERROR", "INFO", "THREAD"}  # no DEBUG
    assert {m.group(3) for m in parsed} >= {"supervisor", "worker-1", "worker-2"}
    session = next(m.group(4) for m in parsed if "USER alice" in m.group(5))
    texts = [m.group(5) for m in parsed if m.group(4) == session]
    assert texts[0].startswith("connect from 127.0.0.1:")
    assert "USER alice" in texts and "PASS ********" in texts and "RETR 1" in texts
    assert any(t.startswith("user alice logged in") for t in texts)
    assert "QUIT" in texts and any(t.startswith("update:") for t in texts)
    assert not any(t.startswith("S: ") for t in texts)  # the server's half is DEBUG only


def test_info_level_keeps_startup_and_hides_sessions(logged_server):
    """At INFO the log has startup and shutdown lines, and nothing of the sessions."""
    server = logged_server("-loglevel", "INFO", "-log_flush", "0")
    client = server.login("bob")
    client.quit()
    server.stop_cleanly()
    text = "\n".join(server.log_lines())
    assert "listening on 127.0.0.1:" in text and "worker 1 ready" in text and " exits" in text
    assert "USER bob" not in text and "connect from" not in text
    assert not re.search(r" (THREAD|DEBUG) ", text)


def test_no_password_in_any_log_at_debug(logged_server):
    """At DEBUG, PASS, APOP and AUTH secrets reach neither the file nor standard output."""
    server = logged_server("-loglevel", "DEBUG", "-log_flush", "0")
    client = server.login("alice")
    client.retr(1)
    client.quit()
    client = server.pop()
    client.user("bob")
    with pytest.raises(Exception):
        client.pass_("not-the-builder-secret")
    client.user("bob")
    client.pass_(USERS["bob"])  # with a space in it
    client.quit()
    plain = base64.b64encode(b"\0carol\0" + USERS["carol"].encode()).decode()
    raw = server.raw()
    raw.line()
    raw.command("APOP carol 0123456789abcdef0123456789abcdef")
    raw.command(f"AUTH PLAIN {plain}")
    raw.command("QUIT")
    raw.close()
    raw = server.raw()  # RFC 5034: the credentials may also come as the answer to a challenge
    raw.line()
    if raw.command("AUTH PLAIN").startswith(b"+"):
        raw.command(plain)
    raw.command("QUIT")
    raw.close()
    server.stop_cleanly()
    text = "\n".join(server.log_lines()) + "\n" + server.output
    for secret in (*USERS.values(), "builder", "not-the-builder-secret", plain,
                   "0123456789abcdef"):
        assert secret not in text, secret
    assert "PASS ********" in text and "APOP carol ********" in text
    assert "AUTH PLAIN ********" in text
    assert re.search(r" DEBUG  worker-\d w\d+\.\d+ S: \+OK", text)  # DEBUG is verbose indeed


def test_no_password_in_the_log_however_the_line_is_spaced(logged_server):
    """Tab- or space-led PASS lines and every line of an AUTH exchange (challenge answers, and a
    response sent without waiting for "+") are masked at DEBUG; the server's refusals stand."""
    server = logged_server("-loglevel", "DEBUG", "-log_flush", "0", "-max-bad-commands", "50")
    plain = base64.b64encode(b"\0carol\0" + USERS["carol"].encode()).decode()
    secrets = ["Hunter2", "hunter3", "Tabbed4", USERS["alice"], USERS["carol"], plain,
               base64.b64encode(USERS["alice"].encode()).decode()]
    raw = server.raw()
    raw.line()
    assert raw.command("USER alice").startswith(b"+OK")
    assert raw.command("PASS\tHunter2") == R.UNKNOWN_COMMAND.encode()
    assert raw.command(" PASS hunter3") == R.UNKNOWN_COMMAND.encode()
    assert raw.command("AUTH\tPLAIN\tTabbed4") == R.UNKNOWN_COMMAND.encode()
    assert raw.command("AUTH XOAUTH9") == R.SASL_UNKNOWN.encode()
    assert raw.command(plain) == R.UNKNOWN_COMMAND.encode()  # a response sent blind
    assert raw.command("AUTH LOGIN").startswith(b"+ ")
    assert raw.command(base64.b64encode(b"alice").decode()).startswith(b"+ ")
    assert raw.command(base64.b64encode(USERS["alice"].encode()).decode()) == R.LOGIN_OK.encode()
    raw.command("QUIT")
    raw.close()
    server.stop_cleanly()
    text = "\n".join(server.log_lines()) + "\n" + server.output
    for secret in secrets:  # in any case: the old log upper-cased "PASS\tHunter2" as a verb
        assert secret.lower() not in text.lower(), secret
    assert text.count("PASS ********") == 2 and "AUTH PLAIN ********" in text
    assert text.count(" ********") >= 5  # the blind response and both challenge answers


def test_maildir_file_name_with_a_newline_is_escaped_in_the_log(logged_server):
    """A message file whose name holds a newline and an escape sequence (a local user can make
    one) forges no log line: its UIDL is a digest, and any text that reaches a log line as an
    argument is escaped by the formatter (test_formatter_escapes_every_argument)."""
    server = logged_server("-loglevel", "THREAD", "-log_flush", "0")
    forged = "2030-01-01 00:00:00.000 ERROR  supervisor - forged"
    write_message(server.maildir("alice"), f"1700000010.M10.evil\n{forged}\x1b[2J", sample(10))
    client = server.login("alice")
    count = client.stat()[0]
    client.retr(count)  # the newest: the evil one
    client.quit()
    server.stop_cleanly()
    lines = server.log_lines()
    assert not any(line.startswith(forged[:10]) for line in lines)
    assert not any("\x1b" in line for line in lines)
    assert any(re.search(rf"RETR {count} uid H[0-9a-f]{{40}}, ", line) for line in lines), lines


def test_error_lines_go_out_at_once_others_wait_for_the_interval(logged_server):
    """With the 3-minute default, lines wait in the buffer; an ERROR line is written at once."""
    server = logged_server("-loglevel", "THREAD")
    client = server.login("alice")  # held open: its worker must live on
    assert wait_until(lambda: sum("[1 sessions]" in t
                                  for t in _worker_titles(server.pid).values()) == 1, 10)
    time.sleep(1.5)  # two turns of both loops: nothing is due yet
    text = server.logfile.read_text()
    assert "listening on" not in text and "USER alice" not in text
    idle = next(pid for pid, title in _worker_titles(server.pid).items()
                if "[0 sessions]" in title)
    os.kill(idle, signal.SIGKILL)
    assert server.log_has(rf"ERROR  supervisor - worker \d \(pid {idle}\) killed by signal 9",
                          timeout=5)
    text = server.logfile.read_text()
    assert "listening on" in text  # the ERROR took the supervisor's earlier lines with it
    assert "USER alice" not in text  # still in the serving worker's buffer
    client.quit()
    server.stop_cleanly()
    assert "USER alice" in server.logfile.read_text()  # a clean exit writes every buffer


def test_short_flush_interval_reaches_the_disk(logged_server):
    """-log_flush 1: a session's lines are in the file within seconds, while it is still open."""
    server = logged_server("-loglevel", "THREAD", "-log_flush", "1")
    client = server.login("carol")
    # within seconds (-log_flush 1), not after the default 180 s: a wide margin either way
    assert server.log_has(r"THREAD worker-\d w\d+\.\d+ PASS \*{8}", timeout=30)
    client.quit()


def test_midnight_rotation_with_a_controlled_clock(logged_server):
    """Just after midnight the supervisor renames the log to the ended day; all processes go on
    in a new file."""
    midnight = time.mktime((2030, 6, 15, 0, 0, 0, 0, 0, -1))
    margin = 8.0  # seconds of the old day left when the server starts
    offset = midnight - margin - time.time()
    server = logged_server("-loglevel", "THREAD", "-log_flush", "0",
                           env={logsetup.CLOCK_OFFSET_ENV: repr(offset)})
    old = server.logfile.with_name("iupop3.log.2030-06-14")
    client = server.login("alice")
    client.stat()
    client.quit()
    assert server.log_has(r"user alice logged in")
    assert time.time() + offset < midnight - 0.5 and not old.exists(), "server started too slowly"
    assert wait_until(old.exists, margin + 10)
    assert server.log_has(r"INFO   supervisor - new log file; the lines before are in "
                          + re.escape(str(old)))
    # Two sessions at once go to both workers (least loaded first).
    first, second = server.login("bob"), server.login("carol")
    first.quit()
    second.quit()
    for role in ("supervisor", "worker-1", "worker-2"):
        assert server.log_has(rf" {role} "), role
    assert server.log_has(r"USER bob") and server.log_has(r"USER carol")
    assert server.log_has(r"THREAD worker-1 w1\.\d+ connect from")
    assert server.log_has(r"THREAD worker-2 w2\.\d+ connect from")
    server.stop_cleanly()
    before, after = server.log_lines(old), server.log_lines()
    assert before[0].startswith("2030-06-14 ") and all(l.startswith("2030-06-15 ") for l in after)
    old_text, new_text = "\n".join(before), "\n".join(after)
    assert "listening on 127.0.0.1:" in old_text and "USER alice" in old_text
    assert "a new day: the log continues" in old_text
    assert "USER bob" not in old_text and "USER alice" not in new_text
    assert not set(before) & set(after)
    assert re.search(r"supervisor - iupop3 supervisor \d+ exits", new_text)
