"""-daemon, -pidfile, readiness and -user: the server as a real detached service.

The daemon is not our child: tests find its processes by its process group (the supervisor
leads one) and by the log file all of them hold, and clean up only that group.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, USERS, sample, write_message
from processes import alive, ancestors, group_pids, holders, kill_group, stat, status, wait_until

READY = re.compile(r"iupop3: pid (\d+) listening on 127\.0\.0\.1:(\d+)")


class Site:
    """Users file, maildirs, log and pid file of one test server, under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.users = root / "users"
        self.mail = root / "mail"
        self.logfile = root / "log" / "iupop3.log"
        self.pidfile = root / "run" / "iupop3.pid"
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.users.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items()))
        for user in USERS:
            for n in (1, 2, 3):
                write_message(self.mail / user, f"{1700000000 + n}.M{n}.test", sample(n))
        self.started: list[int] = []

    def args(self, *extra: str, port: int = 0) -> list[str]:
        return ["-users", str(self.users), "-mail", f"maildir:{self.mail}/%u",
                "-listen", "127.0.0.1", "-port", str(port), "-workers", "2", "-log_flush", "0",
                "-loglevel", "THREAD", "-logfile", str(self.logfile), *extra]

    def run(self, *args: str, python: str = sys.executable,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the iupop3 command to completion (with -daemon it returns once listening)."""
        env = env or dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run([python, "-m", "supervisor", *args], capture_output=True, text=True,
                             env=env, timeout=90, stdin=subprocess.DEVNULL)
        if match := READY.search(out.stdout):
            self.started.append(int(match.group(1)))
        return out

    def log_text(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""

    def cleanup(self) -> None:
        for pid in self.started:
            kill_group(pid)


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.cleanup()


def _ready(out: subprocess.CompletedProcess) -> tuple[int, int]:
    match = READY.search(out.stdout)
    assert out.returncode == 0 and match, (out.returncode, out.stdout, out.stderr)
    return int(match.group(1)), int(match.group(2))


def _login(port: int, user: str = "alice") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user(user)
    client.pass_(USERS[user])
    return client


def _stop(pid: int, timeout: float = 30) -> None:
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(pid), timeout), "the supervisor did not exit"
    assert wait_until(lambda: not group_pids(pid), 10), f"left behind: {group_pids(pid)}"


def test_daemon_detaches_writes_pidfile_and_stops_cleanly(site):
    """-daemon returns once listening; the daemon is detached; SIGTERM leaves no process or pid file."""
    out = site.run("-daemon", "-pidfile", str(site.pidfile), *site.args())
    pid, port = _ready(out)
    assert site.pidfile.read_text() == f"{pid}\n"
    info = stat(pid)
    assert info["ppid"] == 1 or (info["ppid"] in ancestors(os.getpid())
                                 and info["ppid"] != os.getpid()), "not re-parented"
    assert info["session"] != os.getsid(0) and info["tty_nr"] == 0 and info["pgrp"] == pid
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == os.devnull
    assert wait_until(lambda: "worker 1 ready" in site.log_text()
                      and "worker 2 ready" in site.log_text(), 15)
    assert len(group_pids(pid)) == 3  # the supervisor and two workers
    client = _login(port)
    assert client.stat()[0] == 3
    client.quit()
    _stop(pid)
    assert not site.pidfile.exists()
    assert not holders(site.logfile)
    assert re.search(rf"supervisor - iupop3 supervisor {pid} exits", site.log_text())


def test_pidfile_of_a_live_server_refuses_a_second_start(site):
    """A stale pid file is taken over; one naming a running server makes a second start fail."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    site.pidfile.write_text(f"{dead.pid}\n")
    pid, _ = _ready(site.run("-daemon", "-pidfile", str(site.pidfile), *site.args()))
    assert site.pidfile.read_text() == f"{pid}\n"
    again = site.run("-daemon", "-pidfile", str(site.pidfile), *site.args())
    assert again.returncode == 2
    assert f"already running as pid {pid}" in again.stderr
    assert alive(pid) and site.pidfile.read_text() == f"{pid}\n"
    _stop(pid)


def test_daemon_reports_a_bind_failure_and_leaves_nothing(site):
    """When the port is taken, the command exits non-zero with the reason; no daemon remains."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = site.run("-daemon", "-pidfile", str(site.pidfile), *site.args(port=port))
    assert out.returncode == 2, out
    assert "127.0.0.1" in out.stderr and str(port) in out.stderr
    assert not site.pidfile.exists()
    assert wait_until(lambda: not holders(site.logfile), 5)


def test_daemon_needs_a_logfile(site):
    """-daemon without -logfile is refused before anything forks."""
    out = site.run("-daemon", "-users", str(site.users))
    assert out.returncode == 2 and "-daemon needs -logfile" in out.stderr


def test_foreground_server_tells_systemd_when_it_listens(start_server):
    """With $NOTIFY_SOCKET set, READY=1 (and the address) arrive once the server listens."""
    name = f"iupop3-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notify.settimeout(20)
        server = start_server(env={"NOTIFY_SOCKET": "@" + name})
        message = notify.recv(4096).decode()
    assert message.startswith("READY=1\n")
    assert f"STATUS=pid {server.proc.pid} listening on 127.0.0.1:{server.port}" in message


# -- -user: dropping root ---------------------------------------------------------------------
def _python_for(uid: int, gid: int) -> tuple[str, dict[str, str]] | None:
    """An interpreter the unprivileged user can run with our packages, and its environment.

    The test venv's interpreter may live under /root (mode 0700, as with pyenv); then the system
    Python of the same version, given the venv's site-packages, does (same binary wheels).
    """
    paths = sysconfig.get_paths()
    minor = f"python3.{sys.version_info.minor}"
    candidates = [(sys.executable, str(ROOT)),
                  (f"/usr/bin/{minor}", os.pathsep.join([str(ROOT), paths["purelib"],
                                                         paths["platlib"]]))]
    check = (f"import sys, gevent, setproctitle, passlib; "
             f"sys.exit(sys.version_info[:2] != {tuple(sys.version_info[:2])})")
    for python, pythonpath in candidates:
        if not os.path.exists(python):
            continue
        env = dict(os.environ, PYTHONPATH=pythonpath)
        try:
            ok = subprocess.run([python, "-c", check], user=uid, group=gid, extra_groups=[],
                                env=env, cwd="/", capture_output=True, timeout=60).returncode == 0
        except OSError:
            ok = False
        if ok:
            return python, env
    return None


@pytest.fixture
def nobody_site():
    """A site the user nobody can reach: users file readable, maildirs and log dir its own."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs the tests to run as root")
    import pwd

    nobody = pwd.getpwnam("nobody")
    found = _python_for(nobody.pw_uid, nobody.pw_gid)
    if found is None:
        pytest.skip("no Python with gevent that the user nobody can run")
    root = Path(tempfile.mkdtemp(prefix="iupop3-user-"))  # not under pytest's 0700 tmp
    try:
        root.chmod(0o755)
        site = Site(root)
        site.users.chmod(0o644)
        for path in [site.mail, *site.mail.rglob("*"), site.logfile.parent]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        yield site, found, nobody
    finally:
        site.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_user_nobody_leaves_no_root_and_no_capability(nobody_site):
    """-user nobody: every server process has nobody's ids and no capability; sessions work."""
    site, (python, env), nobody = nobody_site
    out = site.run("-daemon", "-pidfile", str(site.pidfile), "-user", "nobody", *site.args(),
                   python=python, env=env)
    pid, port = _ready(out)
    assert wait_until(lambda: "worker 1 ready" in site.log_text()
                      and "worker 2 ready" in site.log_text(), 20), site.log_text()
    pids = group_pids(pid)
    assert len(pids) == 3
    for each in pids:
        st = status(each)
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4, (each, st["Uid"])
        assert st["Gid"].split() == [str(nobody.pw_gid)] * 4, (each, st["Gid"])
        assert st["Groups"] == ""
        for cap in ("CapPrm", "CapEff", "CapAmb", "CapInh"):
            assert int(st[cap], 16) == 0, (each, cap, st[cap])
    client = _login(port)
    assert b"Subject: message 1" in client.retr(1)[1]
    client.dele(1)
    client.quit()
    assert len(list((site.mail / "alice" / "new").iterdir())) + len(
        list((site.mail / "alice" / "cur").iterdir())) == 2
    assert wait_until(lambda: re.search(r"THREAD worker-\d w\d+\.\d+ USER alice",
                                        site.log_text()), 5)
    _stop(pid)
    text = site.log_text()
    assert "running as user nobody" in text
    # The pid file stays root's in a root-owned directory: the init script removes it.
    assert "cannot remove pid file" in text
    assert site.logfile.stat().st_uid == nobody.pw_uid


def test_user_without_access_to_the_users_file_fails_at_start(nobody_site):
    """After the drop the server checks what nobody must read; a start that would fail says why."""
    site, (python, env), _ = nobody_site
    site.users.chmod(0o600)
    out = site.run("-daemon", "-pidfile", str(site.pidfile), "-user", "nobody", *site.args(),
                   python=python, env=env)
    assert out.returncode == 2
    assert f"as user nobody: cannot read the users file {site.users}" in out.stderr
    assert wait_until(lambda: not holders(site.logfile), 5)


@pytest.mark.parametrize("argv, message", [
    (["-group", "nogroup"], "-group needs -user"),
    (["-user", "no-such-user-here"], "no such user"),
    (["-user", "root"], "is root"),
    (["-user", "nobody", "-group", "no-such-group-here"], "no such group"),
])
def test_user_and_group_are_checked_before_anything_starts(argv, message):
    """Bad -user/-group combinations are one-line errors found before any fork or bind."""
    from shared import settings as S
    from supervisor import daemon

    settings = S.resolve(["-users", "/dev/null", *argv])[0]
    assert message in (daemon.check_settings(settings) or "")
