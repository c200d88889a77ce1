"""The process architecture under real conditions: handoff, crashes, limits, timeouts, stops."""

from __future__ import annotations

import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, USERS
from processes import alive, wait_until
from shared import refusal
from worker import replies as R


def test_connection_is_served_by_a_worker_not_the_supervisor(server):
    """The session runs in a worker process; the supervisor keeps accepting meanwhile."""
    first = server.login("alice")
    slot = server.worker_of(first.sock.getsockname()[1])
    pid = server.worker_pids()[slot]
    assert pid != server.proc.pid
    # The supervisor process holds no connected socket of the client's port; the worker does.
    port = first.sock.getsockname()[1]
    assert _owns_connection(pid, port)
    assert not _owns_connection(server.proc.pid, port)
    others = [server.login(u) for u in ("bob", "carol")]
    for other in others:
        other.quit()
    assert first.stat()[0] == 3
    first.quit()


def _owns_connection(pid: int, client_port: int) -> bool:
    """Whether process ``pid`` has a descriptor for the server side of that connection."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/tcp") as fh:
        rows = fh.read().splitlines()[1:]
    for row in rows:
        cols = row.split()
        remote_port = int(cols[2].split(":")[1], 16)
        if remote_port == client_port and cols[9] in inodes:
            return True
    return False


def test_worker_killed_mid_session(server):
    """kill -9 of a worker: its session ends unapplied, the other worker's goes on, a new one starts."""
    a = server.login("alice")
    b = server.login("bob")
    slot_a = server.worker_of(a.sock.getsockname()[1])
    slot_b = server.worker_of(b.sock.getsockname()[1])
    assert slot_a != slot_b
    old_pid = server.worker_pids()[slot_a]
    a.dele(1)
    a.dele(2)
    mark = server.mark()
    os.kill(old_pid, signal.SIGKILL)
    server.wait_for(rf"worker {slot_a} \(pid {old_pid}\) killed by signal 9; 1 sessions lost",
                    start=mark)
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        a.stat()
    assert b.stat()[0] == 3  # untouched
    b.quit()
    new = server.wait_for(rf"worker {slot_a} started, pid (\d+)", start=mark)
    assert int(new.group(1)) != old_pid
    server.wait_for(rf"worker {slot_a} ready", start=mark)
    again = server.login("alice")
    assert again.stat()[0] == 3  # the killed session's deletions were not applied
    again.quit()


def test_maxclients_refusal(start_server):
    """Past -maxclients the supervisor answers [SYS/TEMP] itself and closes."""
    server = start_server("-maxclients", "2")
    held = [server.pop(), server.pop()]
    raw = server.raw()
    assert raw.line() + b"\r\n" == refusal.TOO_MANY_SESSIONS
    assert raw.closed()
    for client in held:
        client.quit()
    assert wait_until(lambda: _greets(server))


def _greets(server) -> bool:
    try:
        client = server.pop()
    except poplib.error_proto:
        return False
    client.quit()
    return True


def test_idle_timeout(start_server):
    """A silent client is told and cut off after -timeout seconds."""
    server = start_server("-timeout", "1")
    raw = server.raw()
    raw.line()
    started = time.monotonic()
    assert raw.line() == R.TIMEOUT.format(seconds=1).encode()
    assert raw.closed()
    assert time.monotonic() - started < 5


def test_sigterm_lets_open_session_finish(server):
    """SIGTERM: new connections are refused, the open session finishes and its QUIT applies."""
    client = server.login("alice")
    client.dele(1)
    mark = server.mark()
    server.signal(signal.SIGTERM)
    server.wait_for("worker 1 draining", start=mark)
    server.wait_for("worker 2 draining", start=mark)
    raw = server.raw()
    assert raw.line() + b"\r\n" == refusal.SHUTTING_DOWN
    assert client.stat()[0] == 2
    client.quit()
    assert server.wait_exit(20) == 0
    assert len(list((server.maildir("alice") / "new").iterdir())) == 2


def test_sigterm_grace_expires_without_applying(start_server):
    """A session still open when -grace runs out is closed and its deletions dropped."""
    server = start_server("-grace", "1")
    client = server.login("alice")
    client.dele(1)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0
    assert len(list((server.maildir("alice") / "new").iterdir())) == 3


def test_supervisor_death_workers_finish_and_exit(server):
    """If the supervisor dies, workers finish their sessions and exit; nothing is orphaned."""
    client = server.login("alice")
    pids = list(server.worker_pids().values())
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(5)
    assert client.stat()[0] == 3
    client.dele(1)
    client.quit()
    assert wait_until(lambda: not any(alive(p) for p in pids), 10)
    assert len(list((server.maildir("alice") / "new").iterdir())) == 2


def test_process_titles(server):
    """ps shows what each process is and how loaded it is."""
    with open(f"/proc/{server.proc.pid}/cmdline", "rb") as fh:
        assert fh.read().rstrip(b"\0").startswith(
            f"iupop3: supervisor [{server.port}] 2 workers".encode())
    client = server.login("alice")
    slot = server.worker_of(client.sock.getsockname()[1])
    pid = server.worker_pids()[slot]

    def title() -> bytes:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().rstrip(b"\0")

    assert wait_until(lambda: title() == f"iupop3: worker {slot} [1 sessions]".encode(), 5)
    client.quit()


def test_sighup_is_logged_and_server_keeps_serving(server):
    """SIGHUP is received and logged; sessions are not disturbed."""
    client = server.login("alice")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for("SIGHUP", start=mark)
    assert client.stat()[0] == 3
    client.quit()


def test_supervisor_never_imports_gevent_or_worker():
    """The supervisor side of the import rule: no gevent, no worker.* in its process."""
    code = ("import sys, supervisor.main, supervisor.arbiter; "
            "bad = [m for m in sys.modules if m == 'gevent' or m.startswith(('gevent.', 'worker'))]; "
            "print(supervisor.__file__); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(ROOT / "supervisor"))


def test_worker_never_imports_supervisor():
    """The worker side of the import rule: no supervisor.* in a worker's modules."""
    code = ("import sys, worker.main; "
            "sys.exit(1 if any(m.startswith('supervisor') for m in sys.modules) else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr


def test_ipv6_and_ipv4_on_one_port(start_server):
    """Listening on 127.0.0.1 and ::1 binds both on the same port."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = start_server("-listen", "::1")
    six = poplib.POP3("::1", server.port, timeout=10)
    six.user("alice")
    six.pass_(USERS["alice"])
    six.quit()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_quick_start_with_curl(tmp_path):
    """The embedded demo serves its first sample message to curl, as the README promises."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "-demo", "-port", "0",
                             "-listen", "127.0.0.1", "-loglevel", "INFO"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    try:
        port = None
        deadline = time.monotonic() + 15
        banner = b""
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            banner += line
            if b"listening on 127.0.0.1:" in line:
                port = int(line.split(b"127.0.0.1:")[1].split()[0])
        assert port, banner.decode()
        assert b"user demo, password demo" in banner
        out = subprocess.run(["curl", "-s", "-u", "demo:demo", f"pop3://127.0.0.1:{port}/1"],
                             capture_output=True, timeout=20)
        assert b"Subject: Welcome to iupop3" in out.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_sighup_reloads_users_file_and_keeps_it_on_error(server):
    """SIGHUP re-reads the users file; a broken file keeps the accounts in use."""
    with open(server.users_file, "a") as fh:
        fh.write("dave:{PLAIN}d4ve::::::\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for("worker-1 .*users file reloaded: 4 accounts", start=mark)
    server.wait_for("worker-2 .*users file reloaded: 4 accounts", start=mark)
    for _ in range(2):  # both workers
        client = server.pop()
        client.user("dave")
        client.pass_("d4ve")
        client.quit()
    server.users_file.write_text("broken line without a password field\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"ERROR .*line 1.*keeping the previous users", start=mark)
    client = server.login("alice")
    client.quit()


def test_worker_draining_on_its_own_gets_no_new_sessions(server):
    """SIGTERM to one worker: it finishes its session, the supervisor routes new ones elsewhere,
    and the worker is replaced once it has exited."""
    client = server.login("alice")
    slot = server.worker_of(client.sock.getsockname()[1])
    other = 2 if slot == 1 else 1
    pid = server.worker_pids()[slot]
    mark = server.mark()
    os.kill(pid, signal.SIGTERM)
    server.wait_for(rf"worker {slot} is draining: no new sessions go to it", start=mark)
    for _ in range(3):
        newcomer = server.login("bob")
        assert server.worker_of(newcomer.sock.getsockname()[1]) == other
        newcomer.quit()
    assert client.stat()[0] == 3  # its own session goes on
    client.quit()
    server.wait_for(rf"worker {slot} started, pid (?!{pid}\b)\d+", start=mark)
