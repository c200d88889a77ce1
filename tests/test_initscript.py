"""etc/init.d/iupop3 run for real (with and without start-stop-daemon), and etc/iupop3.service.

The init script takes its paths from the environment, so the test points it at this venv's
iupop3 command, a temporary pid file, log and /etc/default file.
"""

from __future__ import annotations

import configparser
import os
import poplib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, USERS, sample, write_message
from processes import alive, group_pids, holders, kill_group, wait_until

SCRIPT = ROOT / "etc" / "init.d" / "iupop3"
UNIT = ROOT / "etc" / "iupop3.service"
IUPOP3 = Path(sys.executable).parent / "iupop3"


class InitScript:
    def __init__(self, root: Path, use_ssd: str):
        self.pidfile = root / "run" / "iupop3.pid"
        self.logfile = root / "log" / "iupop3.log"
        users = root / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items()))
        for n in (1, 2):
            write_message(root / "mail" / "alice", f"{1700000000 + n}.M{n}.test", sample(n))
        defaults = root / "default"
        defaults.write_text(
            f'DAEMON_OPTS="-users {users} -mail maildir:{root}/mail/%u -listen 127.0.0.1 '
            f'-port 0 -workers 2 -log_flush 0 -loglevel INFO"\n')
        self.env = dict(os.environ, DAEMON=str(IUPOP3), PIDFILE=str(self.pidfile),
                        LOGFILE=str(self.logfile), IUPOP3_DEFAULTS=str(defaults),
                        USE_START_STOP_DAEMON=use_ssd, STOP_TIMEOUT="30",
                        PYTHONPATH=str(ROOT))
        self.started: set[int] = set()

    def __call__(self, action: str) -> subprocess.CompletedProcess:
        out = subprocess.run(["sh", str(SCRIPT), action], env=self.env, capture_output=True,
                             text=True, timeout=90, stdin=subprocess.DEVNULL)
        if match := re.search(r"pid (\d+) listening", out.stdout):
            self.started.add(int(match.group(1)))
        return out

    def pid(self) -> int:
        return int(self.pidfile.read_text())


@pytest.fixture(params=["yes", "no"], ids=["start-stop-daemon", "plain-sh"])
def initscript(request, tmp_path):
    if not IUPOP3.exists():
        pytest.skip(f"{IUPOP3} is not installed (pip install -e .)")
    if request.param == "yes" and shutil.which("start-stop-daemon") is None:
        pytest.skip("start-stop-daemon is not installed")
    script = InitScript(tmp_path, request.param)
    yield script
    for pid in script.started:
        kill_group(pid)


def test_start_status_reload_stop(initscript):
    """start waits for the port, status and reload use the pid file, stop leaves nothing behind."""
    out = initscript("status")
    assert out.returncode == 3 and "not running" in out.stdout
    out = initscript("start")
    assert out.returncode == 0, out
    match = re.search(r"iupop3: pid (\d+) listening on 127\.0\.0\.1:(\d+)", out.stdout)
    assert match, out.stdout
    pid, port = int(match.group(1)), int(match.group(2))
    assert initscript.pid() == pid and alive(pid)

    again = initscript("start")
    assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    assert initscript.pid() == pid

    out = initscript("status")
    assert out.returncode == 0 and f"iupop3 is running (pid {pid})" in out.stdout
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("alice")
    client.pass_(USERS["alice"])
    assert client.stat()[0] == 2
    client.quit()

    assert initscript("reload").returncode == 0
    assert wait_until(lambda: "SIGHUP" in initscript.logfile.read_text(), 10)
    assert alive(pid)

    assert wait_until(lambda: len(group_pids(pid)) == 3, 10)  # supervisor and two workers
    out = initscript("stop")
    assert out.returncode == 0, out
    assert not alive(pid) and not group_pids(pid)
    assert not initscript.pidfile.exists()
    assert not holders(initscript.logfile)
    assert initscript("status").returncode == 3
    assert initscript("stop").returncode == 0  # stopping a stopped server is fine
    assert initscript("reload").returncode == 7


def test_status_with_a_stale_pid_file(initscript):
    """A pid file naming no iupop3 process: status says so (1), start takes over."""
    initscript.pidfile.parent.mkdir(parents=True, exist_ok=True)
    other = subprocess.Popen(["sleep", "60"])  # alive, but not an iupop3
    try:
        initscript.pidfile.write_text(f"{other.pid}\n")
        out = initscript("status")
        assert out.returncode == 1 and "not running" in out.stdout
        out = initscript("start")
        assert out.returncode == 0, out
        pid = initscript.pid()
        assert pid != other.pid and alive(pid)
        assert initscript("stop").returncode == 0 and not alive(pid)
        assert other.poll() is None  # stop never touched the stranger
    finally:
        other.kill()
        other.wait()


def test_init_script_header_and_syntax():
    """The LSB header is complete and the script is POSIX sh (checked by dash's parser)."""
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(re.findall(r"^# ([A-Z][\w-]+):\s+(.*)$", header, re.M))
    for key in ("Provides", "Required-Start", "Required-Stop", "Default-Start", "Default-Stop",
                "Short-Description"):
        assert fields.get(key), key
    assert fields["Provides"] == "iupop3" and fields["Default-Start"] == "2 3 4 5"
    assert os.access(SCRIPT, os.X_OK)
    shell = shutil.which("dash") or "sh"
    assert subprocess.run([shell, "-n", str(SCRIPT)]).returncode == 0


def test_systemd_unit(tmp_path):
    """The unit reloads with SIGHUP, is hardened, and passes systemd-analyze verify if present."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    # all: the new supervisor of an upgrade (SIGUSR2) reports MAINPID= (issue 14).
    assert service["Type"] == "notify" and service["NotifyAccess"] == "all"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "-daemon" not in service["ExecStart"] and "-user" in service["ExecStart"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] in ("full", "strict")
    assert "CAP_NET_BIND_SERVICE" in service["CapabilityBoundingSet"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None or not IUPOP3.exists():
        return
    # verify wants ExecStart's program to exist: point it at this venv's iupop3.
    unit = tmp_path / "iupop3.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/iupop3", str(IUPOP3)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "iupop3.service" not in out.stderr, out.stderr


@pytest.mark.parametrize("plant", ["symlink", "hardlink"])
def test_link_planted_in_the_service_users_log_directory_is_refused(tmp_path, plant):
    """Init script with RUN_AS=nobody (it gives the log directory to that user): a symlink or
    hard link planted at the log path makes start fail with one line; the target is unchanged."""
    if os.geteuid() != 0:
        pytest.skip("RUN_AS needs root")
    if not IUPOP3.exists():
        pytest.skip(f"{IUPOP3} is not installed (pip install -e .)")
    script = InitScript(tmp_path, "no")
    script.env["RUN_AS"] = "nobody"
    target = tmp_path / "shadow"
    target.write_text("root:secret\n")
    os.chmod(target, 0o600)
    before = target.stat()
    script.logfile.parent.mkdir(parents=True)
    if plant == "symlink":
        script.logfile.symlink_to(target)
    else:
        os.link(target, script.logfile)
    out = script("start")
    for pid in script.started:
        kill_group(pid)
    assert out.returncode != 0, out
    reason = "symbolic link" if plant == "symlink" else "2 links"
    assert len(out.stderr.strip().splitlines()) == 1 and reason in out.stderr, out.stderr
    after = target.stat()
    assert target.read_text() == "root:secret\n"
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
