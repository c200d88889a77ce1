"""Attacks the server must survive (issue 5): slow and silent clients by the thousand,
connection floods past -maxclients, TLS on the plain port and plain text on the TLS port, and
user names that try to leave the mail root.

Each test prints its figures (connections held, latencies, memory, attempts) for the README's
Security section; run with ``pytest -s`` to see them, and with ``--long`` for the full sizes.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import re
import resource
import selectors
import shutil
import socket
import ssl
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import USERS, assert_healthy, write_message
from processes import wait_until
from shared import refusal
from shared.users import UsersFileError, parse_users
from worker import replies as R


# -- a crowd of clients held by one thread ------------------------------------------------------
@dataclass(eq=False)
class Peer:
    sock: socket.socket
    trickles: bool
    opened: float
    first_line_at: float | None = None
    closed_at: float | None = None
    error: str = ""
    data: bytearray = field(default_factory=bytearray)
    sent: int = 0

    @property
    def first_line(self) -> bytes:
        return bytes(self.data).partition(b"\r\n")[0]


class Crowd:
    """Thousands of client sockets in one thread with epoll: silent ones and tricklers.

    Every peer records when its first line arrived, what it was sent (the first 4 KiB) and when
    the server closed it. A trickler, once greeted, sends one byte of a line that never ends
    every ``interval`` seconds: the slowloris pattern.
    """

    CAP = 4096
    BATCH = 100  # connections opened per turn, so the listen backlog never overflows

    def __init__(self, port: int, interval: float = 1.0):
        self.port = port
        self.interval = interval
        self.peers: list[Peer] = []
        self._wanted: list[bool] = []  # queued opens: True = trickler
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def open(self, idle: int, trickle: int = 0) -> None:
        with self._lock:
            self._wanted += [False] * idle + [True] * trickle

    def _open_some(self) -> None:
        with self._lock:
            batch, self._wanted = self._wanted[:self.BATCH], self._wanted[self.BATCH:]
        for trickles in batch:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))  # EINPROGRESS: the greeting says when
            peer = Peer(sock, trickles, time.monotonic())
            self.peers.append(peer)
            self._selector.register(sock, selectors.EVENT_READ, peer)

    def _run(self) -> None:
        next_trickle = time.monotonic() + self.interval
        while not self._stop.is_set():  # ends when close() sets the event
            self._open_some()
            for key, _ in self._selector.select(0.05):
                self._read(key.data)
            now = time.monotonic()
            if now >= next_trickle:
                next_trickle = now + self.interval
                for peer in self.peers:
                    if peer.trickles and peer.first_line_at and peer.closed_at is None:
                        try:
                            peer.sock.send(b"x")  # a line that never ends
                            peer.sent += 1
                        except OSError:
                            pass  # the read side records the close

    def _read(self, peer: Peer) -> None:
        try:
            chunk = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            peer.error = exc.strerror or str(exc)
            chunk = b""
        now = time.monotonic()
        if chunk:
            if len(peer.data) < self.CAP:
                peer.data += chunk[:self.CAP - len(peer.data)]
            if peer.first_line_at is None and b"\n" in peer.data:
                peer.first_line_at = now
            return
        peer.closed_at = now
        self._selector.unregister(peer.sock)
        peer.sock.close()

    def count(self, predicate) -> int:
        return sum(1 for peer in list(self.peers) if predicate(peer))

    def wait(self, predicate, timeout: float) -> bool:
        return wait_until(predicate, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for peer in self.peers:
            if peer.closed_at is None:
                peer.sock.close()


# -- helpers for the garbage tests (test_fuzz.py imports them) ------------------------------
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def read_all(sock: socket.socket, limit: float = 15.0) -> bytes:
    """Everything the server sends until it closes (bounded by ``limit`` seconds)."""
    sock.settimeout(limit)
    chunks = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break  # a close with our junk unread: a close all the same
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def no_control_characters_logged(server) -> None:
    """A client's NUL, CR or escape bytes never reach the log raw (CWE-117)."""
    bad = [line for line in server.output.splitlines() if CONTROL.search(line)]
    assert not bad, bad[:5]


# -- measuring -----------------------------------------------------------------------------------
def raise_nofile(needed: int) -> None:
    """Let this process (and the server it starts) hold ``needed`` descriptors, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over the server's processes (smaps_rollup)."""
    rss = pss = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


def server_pids(server) -> list[int]:
    return [server.proc.pid, *server.worker_pids().values()]


def user_session(server, user: str = "alice", message: int = 4) -> float:
    """Seconds for a real user's whole session: connect, login, RETR of a 256 KiB message, QUIT."""
    started = time.monotonic()
    client = poplib.POP3("127.0.0.1", server.port, timeout=60)
    client.user(user)
    client.pass_(USERS[user])
    _, lines, _ = client.retr(message)
    client.quit()
    assert len(lines) > 4000
    return time.monotonic() - started


def latencies(server, rounds: int = 15) -> tuple[float, float]:
    """(median, worst) of ``rounds`` user sessions."""
    times = sorted(user_session(server) for _ in range(rounds))
    return statistics.median(times), times[-1]


def sessions_open(server) -> int:
    """Sessions the workers report in their process titles (updated every second)."""
    total = 0
    for pid in server.worker_pids().values():
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            found = re.search(rb"\[(\d+) sessions\]", fh.read())
        total += int(found.group(1)) if found else 0
    return total


def big_message() -> bytes:
    lines = [f"line {n:05d} of a message long enough to take a few sends".encode()
             for n in range(4500)]
    return b"From: big@example.org\nSubject: big\n\n" + b"\n".join(lines) + b"\n"


# -- slow and silent clients ---------------------------------------------------------------------
@pytest.mark.parametrize("idle, trickle, timeout, interval", [
    pytest.param(500, 500, 6, 1.0, id="ci"),
    pytest.param(2000, 2000, 20, 3.0, id="full", marks=pytest.mark.long),
])
def test_slow_and_silent_clients(start_server, idle, trickle, timeout, interval):
    """Thousands of silent and trickling clients: real users still log in and download with
    little added delay, every attacker is cut at -timeout, and memory returns to its level."""
    raise_nofile(2 * (idle + trickle) + 512)
    server = start_server("-timeout", str(timeout), "-maxclients", str(2 * (idle + trickle)),
                          "-max-per-address", "0", "-loglevel", "INFO")
    write_message(server.maildir("alice"), "1700000009.M9.big", big_message())
    user_session(server)  # warm up caches and imports
    pids = server_pids(server)
    before = latencies(server)
    mem_before = memory_kb(pids)
    print(f"\nslow clients: {idle} silent + {trickle} trickling (1 byte every {interval:g}s), "
          f"-timeout {timeout}")
    print(f"  before: session median {before[0] * 1000:.0f} ms, worst {before[1] * 1000:.0f} ms;"
          f" RSS {mem_before[0] / 1024:.1f} MiB, PSS {mem_before[1] / 1024:.1f} MiB")
    after_waves = []
    for wave in (1, 2):  # a second wave shows memory does not grow from attack to attack
        crowd = Crowd(server.port, interval)
        try:
            opened = time.monotonic()
            crowd.open(idle, trickle)
            assert crowd.wait(lambda: crowd.count(lambda p: p.first_line_at) == idle + trickle,
                              timeout / 2 + 30), _crowd_state(crowd)
            held_after = time.monotonic() - opened
            assert crowd.count(lambda p: p.first_line.startswith(b"+OK IUPOP3")) == idle + trickle
            during = latencies(server, 10)
            mem_during = memory_kb(pids)
            held = crowd.count(lambda p: p.closed_at is None)
            print(f"  wave {wave}: {held} connections held ({held_after:.1f}s to open);"
                  f" session median {during[0] * 1000:.0f} ms, worst {during[1] * 1000:.0f} ms;"
                  f" RSS {mem_during[0] / 1024:.1f} MiB, PSS {mem_during[1] / 1024:.1f} MiB"
                  f" ({(mem_during[1] - mem_before[1]) / held:.1f} KiB PSS a connection)")
            assert held == idle + trickle  # nobody was cut before the timeout
            assert during[0] < max(1.0, 10 * before[0]), (before, during)
            assert crowd.wait(lambda: crowd.count(lambda p: p.closed_at) == idle + trickle,
                              timeout + 30), _crowd_state(crowd)
        finally:
            crowd.close()
        _check_cut(crowd, timeout)
        assert crowd.wait(lambda: sessions_open(server) == 0, 10)
        mem_after = memory_kb(pids)
        after_waves.append(mem_after[1])
        print(f"  wave {wave} cut at the timeout; after: RSS {mem_after[0] / 1024:.1f} MiB,"
              f" PSS {mem_after[1] / 1024:.1f} MiB")
    assert after_waves[1] < after_waves[0] * 1.15 + 8 * 1024, after_waves
    assert user_session(server) < 5
    assert_healthy(server)


def _check_cut(crowd: Crowd, timeout: int) -> None:
    """Every peer was told and cut about ``timeout`` seconds after its last complete line."""
    lags = []
    for peer in crowd.peers:
        assert peer.closed_at is not None and peer.first_line_at is not None
        assert R.TIMEOUT.format(seconds=timeout).encode() in peer.data, bytes(peer.data)
        lags.append(peer.closed_at - peer.first_line_at)
    trickled = [p.sent for p in crowd.peers if p.trickles]
    print(f"  cut after {min(lags):.1f}-{max(lags):.1f}s of no complete line"
          f" (tricklers sent up to {max(trickled, default=0)} bytes each)")
    assert timeout - 0.5 <= min(lags) and max(lags) <= timeout + 15


def _crowd_state(crowd: Crowd) -> str:
    return (f"{len(crowd.peers)} opened, {crowd.count(lambda p: p.first_line_at)} greeted, "
            f"{crowd.count(lambda p: p.closed_at)} closed, errors: "
            f"{sorted({p.error for p in crowd.peers if p.error})}")


# -- floods --------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit, burst", [
    pytest.param(50, 400, id="ci"),
    pytest.param(500, 4000, id="full", marks=pytest.mark.long),
])
def test_connection_burst_past_maxclients(start_server, limit, burst):
    """A burst far past -maxclients: every extra connection gets the [SYS/TEMP] refusal and
    nothing else, the sessions inside the limit and the workers carry on."""
    raise_nofile(2 * burst + 512)
    server = start_server("-maxclients", str(limit), "-max-per-address", "0",
                          "-loglevel", "INFO")
    inside = server.login("bob")
    crowd = Crowd(server.port)
    try:
        started = time.monotonic()
        crowd.open(burst)
        assert crowd.wait(lambda: crowd.count(lambda p: p.first_line_at) == burst, 60), \
            _crowd_state(crowd)
        refused = [p for p in crowd.peers if p.first_line + b"\r\n" == refusal.TOO_MANY_SESSIONS]
        greeted = [p for p in crowd.peers if p.first_line.startswith(b"+OK IUPOP3")]
        assert crowd.wait(lambda: all(p.closed_at for p in refused), 10)
        elapsed = time.monotonic() - started
        print(f"\nburst: {burst} connections against -maxclients {limit}: {len(greeted)} served,"
              f" {len(refused)} refused in {elapsed:.1f}s")
        assert len(greeted) + len(refused) == burst
        assert len(greeted) == limit - 1  # bob's session holds one slot
        assert all(bytes(p.data) == refusal.TOO_MANY_SESSIONS for p in refused)
        assert all(p.closed_at is None for p in greeted)
        assert inside.stat()[0] == 3
    finally:
        crowd.close()
    inside.quit()
    served: list[poplib.POP3] = []

    def carol_served() -> bool:
        try:
            served.append(server.login("carol"))
        except poplib.error_proto:
            return False
        return True

    assert wait_until(carol_served, 10)  # the slots free once the workers have seen the closes
    client = served[0]
    assert client.stat()[0] == 3
    client.quit()
    assert_healthy(server)


# -- the wrong protocol on a port ---------------------------------------------------------------
def client_hello() -> bytes:
    """The first flight of a real TLS client, made by the ssl module into memory."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_handshake_on_the_plain_port(server):
    """A TLS ClientHello on the plain port is just bad lines: -ERR replies, then QUIT works."""
    hello = client_hello()
    raw = server.raw()
    raw.line()
    raw.send(hello + b"\r\nQUIT\r\n")
    replies = read_all(raw.sock).split(b"\r\n")[:-1]
    assert replies[-1].startswith(b"+OK") and b"signing off" in replies[-1]
    assert all(r.startswith(b"-ERR") for r in replies[:-1]), replies
    print(f"\nClientHello on the plain port: {len(hello)} octets, {len(replies) - 1} -ERR replies")
    assert_healthy(server)
    no_control_characters_logged(server)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_plain_text_on_the_tls_port(start_server, tmp_path):
    """Plain POP3 or random bytes on the implicit-TLS port end the connection (TLS failed); a
    handshake that stalls or trickles is cut at -timeout; real TLS clients are unaffected."""
    from test_tls import client_context, make_cert

    cert, key = make_cert(tmp_path)
    server = start_server("-tls-cert", str(cert), "-tls-key", str(key), "-timeout", "2")
    port = int(server.wait_for(r"implicit TLS listening on 127\.0\.0\.1:(\d+)").group(1))
    for junk in (b"USER alice\r\nPASS wonderland\r\n", bytes(range(256)) * 4, b"\r\n" * 100):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(junk)
        started = time.monotonic()
        answer = read_all(sock, 10)
        assert time.monotonic() - started < 5
        assert b"+OK" not in answer and b"USER" not in answer
        sock.close()
    hello = client_hello()
    for trickle in (False, True):  # half a ClientHello, then silence or one byte a second
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(hello[:len(hello) // 2])
        started = time.monotonic()
        sock.settimeout(0.9)
        closed = False
        for n in range(12):  # bounded: the server must close long before
            if trickle:
                try:
                    sock.sendall(hello[len(hello) // 2 + n:len(hello) // 2 + n + 1])
                except OSError:
                    closed = True
                    break
            try:
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        waited = time.monotonic() - started
        sock.close()
        assert closed and waited < 6, (trickle, waited)
    good = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = client_context(cert).wrap_socket(good, server_hostname="localhost")
    assert tls.recv(4096).startswith(b"+OK IUPOP3")
    tls.close()
    assert server.output.count("TLS failed") >= 3
    print("\nplain text on the TLS port: 3 kinds of junk refused, stalled and trickled"
          " handshakes cut at -timeout 2")
    assert_healthy(server)


# -- user names that try to leave the mail root ------------------------------------------------
BAD_NAMES = ["..", "../escape", "../../etc/passwd", "/tmp/abs", "sub/dir", ".hidden",
             "a\x00b", "\x00", "ctl\x01x", "tab\tname", "esc\x1b[0m", "del\x7f",
             "x" * 65, "y" * 200, "%2e%2e", "~root", "a\\b", "\u212a../x", "\u212aelvin",
             "caf\u00e9"]
# Names that try to leave the mail root, also as users-file entries (refused at load).
ESCAPING_USERS = {"..": "pw", "../escape": "pw", "../../etc/passwd": "pw", "/tmp/abs": "pw",
                  "sub/dir": "pw", ".hidden": "pw", "%2e%2e": "pw", "~root": "pw",
                  "a\\b": "pw", "x" * 65: "pw"}


def _tree(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _attempt(server, path: str, name: str, password: str) -> list[bytes]:
    """One login attempt through ``path``; the server's replies after the greeting."""
    raw = server.raw()
    greeting = raw.line()
    raw_name = name.encode("utf-8", "surrogateescape")
    replies = []
    try:
        if path == "USER":
            raw.send(b"USER " + raw_name + b"\r\n")
            replies.append(raw.line())
            if replies[-1].startswith(b"+OK"):
                replies.append(raw.command(f"PASS {password}"))
        elif path == "APOP":
            stamp = re.search(rb"<[^>]+>", greeting).group(0)
            digest = hashlib.md5(stamp + password.encode()).hexdigest()
            raw.send(b"APOP " + raw_name + b" " + digest.encode() + b"\r\n")
            replies.append(raw.line())
        elif path == "AUTH PLAIN":
            replies.append(raw.command("AUTH PLAIN " + _b64(b"\0" + raw_name + b"\0"
                                                            + password.encode())))
        else:  # AUTH LOGIN
            replies.append(raw.command("AUTH LOGIN"))
            replies.append(raw.command(_b64(raw_name)))
            if replies[-1].startswith(b"+ "):
                replies.append(raw.command(_b64(password.encode())))
    finally:
        raw.close()
    return replies


@pytest.mark.parametrize("path", ["USER", "APOP", "AUTH PLAIN", "AUTH LOGIN"])
def test_user_names_never_leave_the_mail_root(start_server, tmp_path, path):
    """Names with .., /, NUL, control characters or over 64 octets are refused on every login
    path before any file is touched; a users file cannot hold such an account either (it is
    refused at load, so the wire check is not the only layer)."""
    root = tmp_path / "srv"
    mail = root / "mail"
    mail.mkdir(parents=True)
    for name in ESCAPING_USERS:
        with pytest.raises(UsersFileError, match="cannot log in"):
            parse_users(f"{name}:{{PLAIN}}pw::::::\n")
    (root / "users").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in USERS.items()))
    server = start_server("-apop", "-auth-delay", "0", "-auth-block", "0", root=root,
                          users=USERS)
    before = _tree(tmp_path)
    expected = {"USER": R.BAD_USER_NAME, "APOP": R.BAD_USER_NAME,
                "AUTH PLAIN": R.SASL_MALFORMED, "AUTH LOGIN": R.SASL_MALFORMED}[path].encode()
    # A space-like character splits the name into two arguments, and an AUTH line with a long
    # initial response passes RFC 5034's 255 octets: refused as such.
    refusals = (expected, R.BAD_ARGUMENTS.format(verb=path).encode(), R.LINE_TOO_LONG.encode())
    for name in BAD_NAMES:
        replies = _attempt(server, path, name, ESCAPING_USERS.get(name, "pw"))
        assert replies[-1] in refusals, (name, replies)
        assert not any(r == R.LOGIN_OK.encode() for r in replies)
    after = _tree(tmp_path)
    assert after == before, sorted(after ^ before)
    # The same path works for a good name, and only that creates files (the maildrop lock).
    assert _attempt(server, path, "alice", USERS["alice"])[-1] == R.LOGIN_OK.encode()
    created = _tree(tmp_path) - before
    assert all(p.startswith("srv/mail/alice") for p in created), created
    print(f"\n{path}: {len(BAD_NAMES)} hostile names refused, tree unchanged "
          f"({len(before)} paths watched)")
    assert_healthy(server)
