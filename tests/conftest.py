"""Fixtures that start the real server (supervisor and workers as processes) on loopback.

The server runs in its own process group with an ephemeral port that the test learns from the
server's own log line; its output is drained by a thread so the pipe never fills, and every test
can wait for a log line instead of sleeping.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USERS = {"alice": "wonderland", "bob": "builder pass", "carol": "c4r0l"}


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the long variants (full-size attack and fault tests)")
    parser.addoption("--system-accounts", action="store_true", default=False,
                     help="run the tests that create and delete real system users (as root; "
                          "on by default when CI is set)")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a full-size variant, run only with --long")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --long")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


def assert_healthy(server: "Server", errors_allowed: bool = False) -> None:
    """No traceback in the log (nor any ERROR line unless allowed) and no worker ever died."""
    text = server.output
    assert "Traceback" not in text, text[text.index("Traceback") - 300:][:3000]
    if not errors_allowed:
        bad = [line for line in text.splitlines() if " ERROR " in line]
        assert not bad, bad[:10]
    assert not re.search(r"worker \d+ \(pid \d+\) (killed|exited)", text)
    assert server.proc is not None and server.proc.poll() is None


def write_message(maildir: Path, name: str, text: bytes | str, sub: str = "new") -> Path:
    """Deliver one message into a Maildir the way an MDA does (tmp/ then rename)."""
    for folder in ("new", "cur", "tmp"):
        (maildir / folder).mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    tmp = maildir / "tmp" / name
    tmp.write_bytes(data)
    target = maildir / sub / name
    tmp.rename(target)
    return target


def sample(n: int, body: str = "") -> str:
    return (f"From: sender{n}@example.org\nTo: you@example.org\nSubject: message {n}\n"
            f"Message-ID: <{n}@example.org>\n\n{body or f'Body of message {n}.'}\n")


def make_cert(folder, name: str = "server", cn: str = "localhost"):
    """A self-signed certificate for 127.0.0.1 and localhost, made by the openssl command."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class Server:
    """A running iupop3 started by a test; ``stop`` ends it and its workers."""

    def __init__(self, root: Path, args: list[str], users: dict[str, str] | None = None,
                 env: dict[str, str] | None = None):
        self.root = root
        self.mail = root / "mail"
        self.users_file = root / "users"
        users = USERS if users is None else users
        if not self.users_file.exists():
            self.users_file.write_text(
                "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items()))
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.env = env
        self._drained = False

    def maildir(self, user: str) -> Path:
        return self.mail / user

    def start(self) -> "Server":
        cmd = [sys.executable, "-m", "supervisor", "-users", str(self.users_file),
               "-mail", f"maildir:{self.mail}/%u", "-listen", "127.0.0.1", "-port", "0",
               "-loglevel", "DEBUG", "-workers", "2", *self.args]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(self.env or {}))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        match = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.port = int(match.group(1))
        workers = int(self.args[self.args.index("-workers") + 1]) if "-workers" in self.args else 2
        for slot in range(1, workers + 1):
            self.wait_for(rf"worker {slot} ready")
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._drained = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match:
        """The first log line (from index ``start``) matching ``pattern``; fails on timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                exited = self.proc is not None and self.proc.poll() is not None
                if remaining <= 0 or (exited and self._drained):
                    tail = "\n".join(self.lines[-30:])
                    pytest.fail(f"no log line matching {pattern!r} in {timeout}s; log tail:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def pop(self, timeout: float = 10.0) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.port, timeout=timeout)

    def login(self, user: str = "alice") -> poplib.POP3:
        client = self.pop()
        client.user(user)
        client.pass_(USERS[user])
        return client

    def raw(self, timeout: float = 10.0) -> "RawClient":
        return RawClient(self.port, timeout)

    def worker_pids(self) -> dict[int, int]:
        """Slot -> pid of the newest worker started in each slot, from the log."""
        pids: dict[int, int] = {}
        for m in re.finditer(r"worker (\d+) started, pid (\d+)", self.output):
            pids[int(m.group(1))] = int(m.group(2))
        return pids

    def worker_of(self, client_port: int) -> int:
        """The worker slot serving the session whose client port is ``client_port``."""
        match = self.wait_for(rf"worker-(\d+) \S+ connect from 127\.0\.0\.1:{client_port}\b")
        return int(match.group(1))

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # only the group this test started
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


class RawClient:
    """A plain socket client for bad input: exact bytes in, exact lines out."""

    def __init__(self, port: int, timeout: float, source: str = "", host: str = "127.0.0.1"):
        # ``source``: another loopback address (127.0.0.2) stands for another client machine.
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def multiline(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def closed(self) -> bool:
        """True when the server has closed the connection (after any pending data)."""
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except (ConnectionResetError, socket.timeout):
            return False
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server(*args, users=...)`` starts a real server; all stop at teardown."""
    servers: list[Server] = []

    def start(*args: str, users: dict[str, str] | None = None, root: Path | None = None,
              env: dict[str, str] | None = None, deliver: bool = True) -> Server:
        where = root or tmp_path / f"server{len(servers)}"
        where.mkdir(parents=True, exist_ok=True)
        server = Server(where, list(args), users, env)
        if deliver:
            for user in (users or USERS):
                for n in (1, 2, 3):
                    write_message(server.maildir(user), f"{1700000000 + n}.M{n}.test",
                                  sample(n))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server):
    """A running server with users alice, bob and carol, three messages each."""
    return start_server()
