"""SIGUSR2: a new supervisor takes the listening sockets over; the old one drains and exits.

A client logs in continuously through the upgrade: no connection is refused, reset or left
unanswered, and the pid serving (the pid file, systemd's MAINPID=) changes.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import threading
import time
import urllib.request

import pytest

from tests.conftest import USERS
from tests.processes import alive, wait_until
from worker import replies as R

LOOP_LIMIT_SECONDS = 120.0  # the client loop's own bound, far above what a run needs


class LoginLoop(threading.Thread):
    """Whole POP3 sessions back to back; every failure is kept, by kind."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.logins = 0
        self.failures: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + LOOP_LIMIT_SECONDS
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                self.session()
                self.logins += 1
            except (OSError, poplib.error_proto, AssertionError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def session(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            greeting = reader.readline()
            assert greeting.startswith(b"+OK"), greeting
            sock.sendall(f"USER alice\r\nPASS {USERS['alice']}\r\nSTAT\r\nQUIT\r\n".encode())
            answers = [reader.readline() for _ in range(4)]
            assert all(a.startswith(b"+OK") for a in answers), answers

    def wait_logins(self, more: int, timeout: float = 30.0) -> None:
        target = self.logins + more
        assert wait_until(lambda: self.logins >= target or bool(self.failures), timeout)
        assert not self.failures, self.failures[:5]


@pytest.fixture
def notify_socket():
    """A stand-in for systemd's $NOTIFY_SOCKET (abstract, so no path length limit)."""
    name = f"@iupop3-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(30)
    yield name, sock
    sock.close()


def _stop_new_generation(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    wait_until(lambda: not alive(pid), timeout=30)


def test_upgrade_refuses_no_connection(start_server, tmp_path, notify_socket):
    """Logins back to back through SIGUSR2: none refused, reset or unanswered; a session open
    across it finishes and its deletion is applied; the pid file and systemd's MAINPID= name
    the new supervisor; the old one exits 0 after draining."""
    name, notify = notify_socket
    pidfile = tmp_path / "iupop3.pid"
    server = start_server("-pidfile", str(pidfile), "-metrics", "127.0.0.1:0",
                          env={"NOTIFY_SOCKET": name})
    metrics_port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
    old = server.proc.pid
    assert pidfile.read_text().strip() == str(old)
    loop = LoginLoop(server.port)
    loop.start()
    new = 0
    try:
        loop.wait_logins(5)
        held = server.login("bob")  # a session of the old generation, open across the upgrade
        server.signal(signal.SIGUSR2)
        new = int(server.wait_for(r"upgrade: new supervisor (\d+) serves", 60).group(1))
        assert new != old and pidfile.read_text().strip() == str(new)
        assert held.stat()[0] == 3 and held.dele(1).startswith(b"+OK")
        held.quit()  # the old generation applies it, then has nothing left to drain
        assert server.wait_exit(60) == 0  # drained: the old generation is gone
        assert len(list((server.maildir("bob") / "cur").iterdir())
                   + list((server.maildir("bob") / "new").iterdir())) == 2
        loop.wait_logins(20)  # served by the new generation alone
        messages = [notify.recv(4096).decode()]  # the first start's READY=1
        for _ in range(10):  # bounded: a handful of notices, each within the socket timeout
            if f"MAINPID={new}" in messages[-1]:
                break
            messages.append(notify.recv(4096).decode())
        assert f"MAINPID={new}" in messages[-1] and "READY=1" in messages[-1], messages
    finally:
        loop.done.set()
        loop.join(30)
        assert not loop.failures, loop.failures[:5]
        assert loop.logins > 25
    # The new generation serves -metrics on the same (inherited) port, and the title says so.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        figures = r.read().decode()
    assert re.search(r"^iupop3_sessions_total [1-9]", figures, re.M)
    assert alive(new)
    assert re.search(rf"iupop3 supervisor {old} exits", server.output)
    assert "Traceback" not in server.output
    _stop_new_generation(new)
    assert wait_until(lambda: not pidfile.exists())  # the new one removes it as it stops


def test_failed_login_penalties_survive_an_upgrade(start_server, tmp_path):
    """An address blocked for failed logins stays blocked in the new generation."""
    server = start_server("-auth-delay", "0", "-auth-block", "2")
    for _ in range(2):
        client = server.pop()
        client.user("alice")
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        client.quit()
    server.signal(signal.SIGUSR2)
    new = int(server.wait_for(r"upgrade: new supervisor (\d+) serves", 60).group(1))
    assert server.wait_exit(60) == 0
    try:
        raw = server.raw()
        assert raw.line().startswith(b"+OK")
        raw.command("USER alice")
        assert raw.command(f"PASS {USERS['alice']}") == R.ADDRESS_BLOCKED.encode()
        raw.close()
    finally:
        _stop_new_generation(new)


def test_failed_upgrade_keeps_the_old_supervisor_serving(start_server, tmp_path):
    """A new supervisor that cannot start (the config file broke meanwhile): the old one
    logs why and serves on with its pid file; a second try works once the file is fixed."""
    config = tmp_path / "iupop3.toml"
    config.write_text("grace = 5\n")
    pidfile = tmp_path / "iupop3.pid"
    server = start_server("-config", str(config), "-pidfile", str(pidfile))
    old = server.proc.pid
    config.write_text("grace = 5\nno_such_setting = 1\n")
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(r"upgrade failed: new supervisor \d+: .*no_such_setting", 60, start=mark)
    client = server.login("alice")  # still served by the old generation
    client.quit()
    assert pidfile.read_text().strip() == str(old) and server.proc.poll() is None
    config.write_text("grace = 5\n")
    server.signal(signal.SIGUSR2)
    new = int(server.wait_for(r"upgrade: new supervisor (\d+) serves", 60, start=mark).group(1))
    assert server.wait_exit(60) == 0
    _stop_new_generation(new)


def _fds_naming(pid: int, path: str) -> list[str]:
    """The descriptors of process ``pid`` that are open on ``path``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                found.append(fd)
        except FileNotFoundError:
            pass
    return found


def test_new_generation_workers_inherit_no_handover_descriptor(start_server, tmp_path):
    """After an upgrade with -pidfile and -metrics, no worker of the new generation holds the
    pid file (its flock would outlive the supervisor) or the old one's ready pipe."""
    pidfile = tmp_path / "iupop3.pid"
    server = start_server("-pidfile", str(pidfile), "-metrics", "127.0.0.1:0", "-workers", "2")
    old_workers = set(server.worker_pids().values())
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    new = int(server.wait_for(r"upgrade: new supervisor (\d+) serves", 60, start=mark).group(1))
    try:
        workers = set(server.worker_pids().values()) - old_workers
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        pipes = []
        for pid in workers:
            assert _fds_naming(pid, str(pidfile)) == [], f"worker {pid} holds the pid file"
            links = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}")
                     for fd in os.listdir(f"/proc/{pid}/fd")}
            stdio = {links.get(fd) for fd in (0, 1, 2)}
            pipes.append({link for link in links.values()
                          if link.startswith("pipe:") and link not in stdio})
        # A worker's own pipes are its own; one both hold came from the supervisor's exec.
        assert not set.intersection(*pipes), f"pipes both workers hold: {pipes}"
        assert _fds_naming(new, str(pidfile)) != []  # the new supervisor took it over
    finally:
        _stop_new_generation(new)


def test_successor_killed_before_ready_is_settled_by_its_reap(start_server, tmp_path):
    """A new supervisor killed before it is ready: the old one learns how it died from its
    own reap (so it never signals that pid afterwards), keeps serving and its pid file."""
    pidfile = tmp_path / "iupop3.pid"
    server = start_server("-pidfile", str(pidfile), "-metrics", "127.0.0.1:0")
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    new = int(server.wait_for(r"new supervisor pid (\d+) started", 60, start=mark).group(1))
    os.kill(new, signal.SIGKILL)
    server.wait_for(rf"upgrade failed: new supervisor {new}: killed by signal 9 before it was"
                    " ready; this one serves on", 60, start=mark)
    client = server.login("alice")
    client.quit()
    assert pidfile.read_text().strip() == str(server.proc.pid)


def test_trickling_scraper_does_not_stall_the_hand_over(start_server, tmp_path):
    """A metrics client sending a byte every half second during an upgrade: the old
    supervisor still hands over and drains (its loop never waits on the scrape)."""
    from tests.test_metrics import Trickler

    server = start_server("-metrics", "127.0.0.1:0")
    port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
    trickler = Trickler(port, limit=90.0)
    trickler.start()
    new = 0
    try:
        assert wait_until(lambda: trickler.sent >= 2)
        server.signal(signal.SIGUSR2)
        new = int(server.wait_for(r"upgrade: new supervisor (\d+) serves", 60).group(1))
        assert server.wait_exit(60) == 0
    finally:
        trickler.done.set()
        trickler.join(10)
        if new:
            _stop_new_generation(new)


class SlowProxyClients(threading.Thread):
    """Opens a connection every ``every`` seconds whose PROXY v1 header arrives in two parts,
    ``hold`` seconds apart (well within the 3 s header deadline); keeps every greeting."""

    def __init__(self, port: int, every: float = 0.25, hold: float = 1.2):
        super().__init__(daemon=True)
        self.port, self.every, self.hold = port, every, hold
        self.done = threading.Event()
        self.greetings: list[bytes] = []
        self.clients: list[threading.Thread] = []

    def run(self) -> None:
        for _ in range(int(LOOP_LIMIT_SECONDS / self.every)):
            if self.done.wait(self.every):
                break
            client = threading.Thread(target=self.session, daemon=True)
            client.start()
            self.clients.append(client)
        for client in self.clients:
            client.join(30)

    def session(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 ")
                time.sleep(self.hold)  # the header is still in flight at the hand-over
                sock.sendall(b"110\r\n")
                greeting = sock.makefile("rb").readline()
                if greeting.startswith(b"+OK"):
                    sock.sendall(b"QUIT\r\n")
                self.greetings.append(greeting)
        except OSError as exc:
            self.greetings.append(f"{type(exc).__name__}: {exc}".encode())


def test_upgrade_hands_connections_with_a_header_in_flight_to_workers(start_server):
    """-proxy-protocol: connections the old supervisor accepted whose PROXY header is still
    arriving at the hand-over are served by its workers, not answered "shutting down"."""
    server = start_server("-proxy-protocol", "-trusted-networks", "127.0.0.0/8")
    clients = SlowProxyClients(server.port)
    clients.start()
    new = 0
    try:
        assert wait_until(lambda: len(clients.greetings) >= 3, timeout=30)
        server.signal(signal.SIGUSR2)
        new = int(server.wait_for(r"upgrade: new supervisor (\d+) serves", 60).group(1))
        count = len(clients.clients)
        assert wait_until(lambda: len(clients.greetings) >= count + 8, timeout=60)
    finally:
        clients.done.set()
        clients.join(60)
        if new:
            _stop_new_generation(new)
    refused = [g for g in clients.greetings if not g.startswith(b"+OK")]
    assert not refused, refused[:5]
    assert server.wait_exit(60) == 0
