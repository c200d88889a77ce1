"""A real HAProxy (Debian ``haproxy``) in front of iupop3 (issue 14 items 1 and 3).

First what HAProxy really sends (send-proxy, send-proxy-v2, send-proxy-v2-ssl, the health
check's LOCAL header), captured on loopback and parsed; then etc/haproxy/iupop3.cfg as shipped,
only its addresses swapped, in front of two nodes serving one mail tree. HAProxy binds
listening sockets the test made (``bind fd@N``), so no port is guessed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, RawClient, make_cert, sample, write_message
from processes import wait_until
from shared import refusal
from shared.proxyprotocol import ProxyError, header_length, parse
from shared.statsreport import NAME_WIDTH
from worker import replies as R

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(not os.path.exists(HAPROXY),
                                reason="needs Debian's haproxy (python3 dev.py test installs it)")
SHIPPED = ROOT / "etc" / "haproxy" / "iupop3.cfg"
USERS = {f"u{n}": f"pw{n}" for n in range(1, 7)} | {"admin": "adminpw"}


class Haproxy:
    """A private HAProxy (``-db``: foreground) on listening sockets handed to it."""

    def __init__(self, config: str, folder: Path, fds: list[int]):
        path = folder / "haproxy.cfg"
        path.write_text(config)
        check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True,
                               pass_fds=fds)
        assert check.returncode == 0, check.stdout + check.stderr
        self.lines: list[str] = []
        self.proc = subprocess.Popen([HAPROXY, "-f", str(path), "-db"], pass_fds=fds,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def saw(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # only the group this test started
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def _pem(tmp_path: Path) -> tuple[Path, Path, Path]:
    cert, key = make_cert(tmp_path)
    pem = tmp_path / "haproxy.pem"
    pem.write_text(cert.read_text() + key.read_text())
    return cert, key, pem


def _tls_client(port: int, cert: Path, source: str) -> RawClient:
    client = RawClient(port, 10, source=source)
    context = ssl.create_default_context(cafile=str(cert))
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    return client


# -- what HAProxy sends --------------------------------------------------------------------------
class Capture:
    """A fake backend that keeps each connection's PROXY header and greets like POP3."""

    def __init__(self):
        self.sock = _listener()
        self.headers: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            while (length := header_length(data)) is None:
                chunk = conn.recv(1)  # one byte at a time: never past the header
                if not chunk:
                    return
                data += chunk
            self.headers.append(data[:length])
            conn.sendall(b"+OK captured\r\n")
            conn.recv(100)
        except ProxyError:
            self.headers.append(b"BAD " + data)
        except OSError:
            pass  # a health check hangs up once it has read the greeting
        finally:
            conn.close()

    def header_from(self, port: int, timeout: float = 10):
        found = []

        def seen():
            found[:] = [parse(h) for h in self.headers
                        if not h.startswith(b"BAD") and not parse(h).local
                        and parse(h).source[1] == port]
            return bool(found)
        assert wait_until(seen, timeout), self.headers
        return found[0]


def test_headers_haproxy_really_sends(tmp_path):
    """send-proxy (v1), send-proxy-v2, send-proxy-v2-ssl behind a TLS-terminating frontend, and
    the health check's v2 LOCAL: each parses, with the client's own address and port."""
    cert, _, pem = _pem(tmp_path)
    capture = Capture()
    fronts = [_listener() for _ in range(3)]
    backend = f"127.0.0.1:{capture.sock.getsockname()[1]}"
    config = f"""
global
    log stdout format raw local0
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend v1
    bind fd@{fronts[0].fileno()}
    default_backend v1
backend v1
    server s {backend} send-proxy
frontend v2
    bind fd@{fronts[1].fileno()}
    default_backend v2
backend v2
    server s {backend} send-proxy-v2
frontend terminated
    bind fd@{fronts[2].fileno()} ssl crt {pem}
    default_backend v2ssl
backend v2ssl
    server s {backend} send-proxy-v2-ssl
backend checked
    option tcp-check
    tcp-check expect string +OK
    server s {backend} send-proxy-v2 check inter 200ms
"""
    haproxy = Haproxy(config, tmp_path, [s.fileno() for s in fronts])
    try:
        for front, version in ((fronts[0], 1), (fronts[1], 2)):
            client = RawClient(front.getsockname()[1], 10, source="127.0.0.2")
            assert client.line() == b"+OK captured"
            header = capture.header_from(client.local_port)
            assert header.version == version and header.source == ("127.0.0.2",
                                                                   client.local_port)
            assert header.destination == front.getsockname() and not header.tls
            client.close()
        client = _tls_client(fronts[2].getsockname()[1], cert, "127.0.0.3")
        assert client.line() == b"+OK captured"
        header = capture.header_from(client.local_port)
        assert header.source == ("127.0.0.3", client.local_port)
        assert header.tls and header.tls_version.startswith("TLSv1.")
        client.close()
        assert wait_until(lambda: any(h == parse(h).raw and parse(h).local and len(h) == 16
                                      for h in capture.headers if not h.startswith(b"BAD")))
        assert not [h for h in capture.headers if h.startswith(b"BAD")]
    finally:
        haproxy.stop()
        capture.sock.close()


# -- the shipped configuration in front of two nodes ---------------------------------------------
def test_shipped_timeouts_are_not_shorter_than_the_server():
    """HAProxy's client and server timeouts are at least -timeout and -login-timeout's
    defaults, or HAProxy would cut sessions (and lose their deletions) before the node."""
    from shared.settings import BY_NAME

    text = SHIPPED.read_text()
    units = {"s": 1, "m": 60, "h": 3600}
    for which in ("client", "server"):
        value, unit = re.search(rf"^\s*timeout {which} (\d+)([smh])$", text, re.M).groups()
        seconds = int(value) * units[unit]
        assert seconds >= BY_NAME["timeout"].default
        assert seconds >= BY_NAME["login_timeout"].default


def _render(nodes, fds: list[int], pem: Path) -> str:
    """The shipped file with the test's addresses, the TLS-terminating frontend switched on."""
    text = SHIPPED.read_text()
    begin, end = text.index("# BEGIN terminate-tls"), text.index("# END terminate-tls")
    block = re.sub(r"^# ?((frontend|backend| {4}).*|)$", r"\1", text[begin:end], flags=re.M)
    text = text[:begin] + block + text[end:]
    text = text.replace("log /dev/log local0", "log stdout format raw local0")
    text = text.replace("/etc/haproxy/pop3.pem", str(pem))
    fd_iter = iter(fds)
    text = re.sub(r"bind :(110|995)", lambda m: f"bind fd@{next(fd_iter)}", text)
    for number, node in enumerate(nodes, 1):
        text = text.replace(f"192.0.2.1{number}:10110", f"127.0.0.1:{node.proxy_port}")
        text = text.replace(f"192.0.2.1{number}:10995", f"127.0.0.1:{node.proxy_tls_port}")
    assert "192.0.2." not in text.split("# -trusted-networks")[-1]
    return text


def _start_nodes(start_server, tmp_path, cert, key):
    mail = tmp_path / "shared-mail"
    for user in USERS:
        for n in (1, 2):
            write_message(mail / user, f"{1700000000 + n}.M{n}.node", sample(n))
    auth = tmp_path / "pop_xtnd.dat"
    auth.write_text("stats admin\n")
    nodes = []
    for number in (1, 2):
        node = start_server("-mail", f"maildir:{mail}/%u", "-proxy-listen", "127.0.0.1:0",
                            "-proxy-tls-listen", "127.0.0.1:0", "-trusted-networks", "127.0.0.1",
                            "-tls-cert", str(cert), "-tls-key", str(key), "-cleartext-auth",
                            "NEVER", "-max-per-address", "3", "-xtnd", str(auth),
                            "-loglevel", "THREAD", users=USERS, deliver=False,
                            root=tmp_path / f"node{number}")
        ports = node.wait_for(r"PROXY protocol header expected on 127\.0\.0\.1:(\d+), "
                              r"127\.0\.0\.1:(\d+) from 127\.0\.0\.1/32")
        node.proxy_port, node.proxy_tls_port = int(ports.group(1)), int(ports.group(2))
        nodes.append(node)
    return nodes


def _node_of(nodes, client_port: int, source: str) -> int:
    """Which node (0 or 1) logged this client's own address and port."""
    pattern = rf"connect from {re.escape(source)}:{client_port}\b"
    assert wait_until(lambda: any(re.search(pattern, n.output) for n in nodes), 10), pattern
    return next(i for i, n in enumerate(nodes) if re.search(pattern, n.output))


def _login(client: RawClient, user: str) -> bytes:
    assert client.line().startswith(b"+OK")
    assert client.command(f"USER {user}").startswith(b"+OK")
    return client.command(f"PASS {USERS[user]}")


def test_two_nodes_behind_the_shipped_haproxy(start_server, tmp_path):
    """Logins spread over both nodes, which log the clients' own addresses and apply
    -max-per-address to them; a maildrop locked on one node is locked on the other; the
    health checks are clean sessions; iupop3-xtnd sums both nodes' STATS; a killed node is
    taken out and new sessions go to the other."""
    cert, key, pem = _pem(tmp_path)
    nodes = _start_nodes(start_server, tmp_path, cert, key)
    plain, passthrough, terminated = (_listener() for _ in range(3))
    fds = [plain.fileno(), passthrough.fileno(), terminated.fileno()]
    haproxy = Haproxy(_render(nodes, fds, pem), tmp_path, fds)
    front = {"plain": plain.getsockname()[1], "tls": terminated.getsockname()[1],
             "passthrough": passthrough.getsockname()[1]}
    try:
        _spread_lock_and_limit(nodes, front, cert)
        _stats_summed(nodes, cert)
        _failover(nodes, front, cert, haproxy)
    except BaseException:
        print("haproxy:", *haproxy.lines[-40:], sep="\n")  # shown with the failure
        raise
    finally:
        haproxy.stop()


def _spread_lock_and_limit(nodes, front, cert) -> None:
    held = []
    for user in ("u1", "u2", "u3", "u4"):
        client = _tls_client(front["tls"], cert, "127.0.0.2")  # TLS ends at HAProxy
        assert _login(client, user).startswith(b"+OK")
        held.append((user, client, _node_of(nodes, client.local_port, "127.0.0.2")))
    assert {node for _, _, node in held} == {0, 1}, "leastconn spreads logins"
    for node in nodes:
        node.wait_for(r"PROXY v2 client 127\.0\.0\.2:\d+, TLS TLSv1\.\d from 127\.0\.0\.1:")
    # The same maildrop through the other node: locked there too.
    u1_node = held[0][2]
    extra = []
    for _ in range(4):
        client = _tls_client(front["tls"], cert, "127.0.0.3")
        extra.append(client)
        if _node_of(nodes, client.local_port, "127.0.0.3") != u1_node:
            assert _login(client, "u1").startswith(b"-ERR [IN-USE]")
            break
    else:
        pytest.fail("leastconn never chose the other node")
    # Through the plain frontend the node knows the client used no TLS (-cleartext-auth NEVER).
    bare = RawClient(front["plain"], 10, source="127.0.0.3")
    bare.line()
    assert bare.command("USER u5") == R.CLEARTEXT_REFUSED.encode()
    # -max-per-address 3 counts 127.0.0.4 on each node, not HAProxy's 127.0.0.1.
    crowd = [RawClient(front["plain"], 10, source="127.0.0.4") for _ in range(8)]
    answers = [c.line() + b"\r\n" for c in crowd]
    assert answers.count(refusal.TOO_MANY_FROM_ADDRESS) >= 2
    assert all(a.startswith(b"+OK") or a == refusal.TOO_MANY_FROM_ADDRESS for a in answers)
    for node in nodes:
        assert len(re.findall(r"connect from 127\.0\.0\.4:", node.output)) <= 3
    newcomer = RawClient(front["plain"], 10, source="127.0.0.5")
    assert newcomer.line().startswith(b"+OK")
    for client in [c for _, c, _ in held] + extra + [bare, newcomer] + [
            c for c, a in zip(crowd, answers) if a.startswith(b"+OK")]:
        assert client.command("QUIT").startswith(b"+OK")
    passthrough = _tls_client(front["passthrough"], cert, "127.0.0.6")  # TLS ends at the node
    assert _login(passthrough, "u6").startswith(b"+OK")
    _node_of(nodes, passthrough.local_port, "127.0.0.6")
    assert passthrough.command("QUIT").startswith(b"+OK")


def _stats_summed(nodes, cert) -> None:
    """iupop3-xtnd over both nodes' direct ports: the total column adds up; no health check
    (greeting, QUIT, sign-off) and no client session ended abnormally."""
    names = " ".join(f"127.0.0.1:{n.port}" for n in nodes)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "shared.adminclient", "--cafile", str(cert),
                             names, "admin", USERS["admin"], "stats"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.splitlines()
    table = table[table.index("== 2 nodes ==") + 2:]
    rows = {line[:NAME_WIDTH].strip(): line[NAME_WIDTH:].split() for line in table}
    rows = {name: [int(v) for v in values] for name, values in rows.items()
            if name in ("Total Threads", "Normal Disconnects", "Abnormal Disconnects")}
    total = rows["Total Threads"]
    assert total[0] + total[1] == total[2] and total[0] > 4 and total[1] > 4
    assert rows["Abnormal Disconnects"] == [0, 0, 0], result.stdout
    assert rows["Normal Disconnects"][2] > 8  # our sessions and the health checks


def _failover(nodes, front, cert, haproxy) -> None:
    os.killpg(nodes[1].proc.pid, signal.SIGKILL)  # node 2 and its workers, all at once
    assert wait_until(lambda: haproxy.saw(r"pop3_nodes/node2 is DOWN"), 15), haproxy.lines
    mark = nodes[0].mark()
    for user in ("u1", "u2", "u3"):
        client = _tls_client(front["tls"], cert, "127.0.0.7")
        assert _login(client, user).startswith(b"+OK")
        assert _node_of(nodes[:1], client.local_port, "127.0.0.7") == 0
        assert client.command("QUIT").startswith(b"+OK")
    nodes[0].wait_for(r"connect from 127\.0\.0\.7", start=mark)
