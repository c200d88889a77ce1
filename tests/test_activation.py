"""systemd socket activation: the supervisor serves on LISTEN_FDS sockets instead of binding.

The test binds the sockets itself (an ephemeral loopback port, learned without a race) and keeps
its copies, as systemd keeps a .socket unit's; ``systemd-socket-activate`` (Debian ``systemd``)
or tests/listenfds.py passes them on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from shared.proxyprotocol import v2_header
from tests.conftest import ROOT, USERS, Server, sample, write_message
from tests.processes import wait_until

needs_activate = pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                                    reason="needs systemd-socket-activate (Debian systemd)")
LAUNCHER = str(ROOT / "tests" / "listenfds.py")


class ActivatedServer(Server):
    """A server started with LISTEN_FDS; ``start(wait=False)`` for one that starts only on
    the first connection (systemd-socket-activate)."""

    def __init__(self, root, sockets: list[socket.socket], args: list[str],
                 names: str = "-", via_systemd: bool = False):
        super().__init__(root, args)
        self.sockets = sockets
        self.names = names
        self.via_systemd = via_systemd
        for n in (1, 2):
            write_message(self.maildir("alice"), f"17000000{n}.M{n}.test", sample(n))

    def start(self, wait: bool = True) -> "ActivatedServer":
        fds = [s.fileno() for s in self.sockets]
        via = ["systemd-socket-activate"] + (
            [f"--fdname={self.names}"] if self.names != "-" else []) if self.via_systemd else []
        cmd = [sys.executable, LAUNCHER, ",".join(map(str, fds)), self.names, *via,
               sys.executable, "-m", "supervisor", "-users", str(self.users_file),
               "-mail", f"maildir:{self.mail}/%u", "-loglevel", "DEBUG", "-workers", "2",
               *self.args]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                     start_new_session=True, pass_fds=fds)
        threading.Thread(target=self._drain, daemon=True).start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, start: int = 0) -> None:
        self.wait_for(r"listening on .* \(sockets passed with LISTEN_FDS\)", start=start)
        for slot in (1, 2):
            self.wait_for(rf"worker {slot} ready", start=start)


@pytest.fixture
def activated(tmp_path):
    servers: list[ActivatedServer] = []

    def start(sockets, *args, names="-", via_systemd=False, wait=True) -> ActivatedServer:
        root = tmp_path / f"server{len(servers)}"
        root.mkdir()
        server = ActivatedServer(root, sockets, list(args), names, via_systemd)
        servers.append(server)
        return server.start(wait)

    yield start
    for server in servers:
        server.stop()


def _listener(family=socket.AF_INET, host="127.0.0.1", v6only: int | None = None,
              kind=socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(family, kind)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    return sock


def _login(host: str, port: int) -> bytes:
    """A whole session: greeting, USER/PASS, STAT, QUIT; returns the STAT reply."""
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK"), "no greeting"
        sock.sendall(f"USER alice\r\nPASS {USERS['alice']}\r\nSTAT\r\nQUIT\r\n".encode())
        replies = [reader.readline() for _ in range(4)]
    assert all(r.startswith(b"+OK") for r in replies), replies
    return replies[2]


def _inode(sock: socket.socket) -> str:
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


def _holders(link: str, pids: list[int]) -> list[int]:
    holders = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    holders.append(pid)
            except FileNotFoundError:
                pass
    return holders


@needs_activate
def test_systemd_socket_activate_starts_it_on_the_first_connection(activated):
    """systemd-socket-activate execs the server on the first connection; the queued client
    gets its greeting and logs in; workers never hold the listener (close-on-exec)."""
    sock = _listener()
    port = sock.getsockname()[1]
    server = activated([sock], names="pop3", via_systemd=True, wait=False)
    first = socket.create_connection(("127.0.0.1", port), timeout=20)  # starts the server
    try:
        server.wait_ready()
        assert first.makefile("rb").readline().startswith(b"+OK")
    finally:
        first.close()
    assert _login("127.0.0.1", port).startswith(b"+OK 2 ")
    assert server.wait_for(rf"listening on 127\.0\.0\.1:{port} ")
    workers = list(server.worker_pids().values())
    assert len(workers) == 2 and _holders(_inode(sock), workers) == []
    assert _holders(_inode(sock), [server.proc.pid]) == [server.proc.pid]


def test_metrics_not_among_the_given_sockets_is_bound_by_the_server(activated):
    """-metrics with only a POP3 socket passed: the server binds the metrics port itself."""
    import urllib.request
    sock = _listener()
    server = activated([sock], "-metrics", "127.0.0.1:0")
    port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert b"iupop3_build_info" in reply.read()


def test_separate_ipv4_ipv6_and_dual_stack_sockets_all_serve(activated):
    """An IPv4, an IPv6-only and a dual-stack IPv6 socket passed together: each serves, and
    no worker holds any of them."""
    ipv4 = _listener()
    ipv6 = _listener(socket.AF_INET6, "::1", v6only=1)
    # Dual-stack, yet loopback only: IPv4 clients reach it as ::ffff:127.0.0.1.
    dual = _listener(socket.AF_INET6, "::ffff:127.0.0.1", v6only=0)
    server = activated([ipv4, ipv6, dual])
    assert server.wait_for(r"\(dual-stack\)")
    for host, sock in (("127.0.0.1", ipv4), ("::1", ipv6), ("127.0.0.1", dual)):
        assert _login(host, sock.getsockname()[1]).startswith(b"+OK 2 ")
    assert server.wait_for(r"connect from 127\.0\.0\.1:\d+")
    workers = list(server.worker_pids().values())  # descriptors 3-5: close-on-exec matters
    assert [_holders(_inode(s), workers) for s in (ipv4, ipv6, dual)] == [[], [], []]


@pytest.mark.parametrize("kind", ["udp", "not listening"])
def test_a_socket_we_cannot_serve_is_one_line_and_exit_2(activated, kind):
    """A datagram or a non-listening socket in LISTEN_FDS: one line on stderr, exit 2."""
    if kind == "udp":
        sock = _listener(kind=socket.SOCK_DGRAM)
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    server = activated([sock], wait=False)
    assert server.wait_exit(30) == 2
    errors = [line for line in server.output.splitlines() if line.startswith("iupop3:")]
    expected = "is not a stream (TCP) socket" if kind == "udp" else "is not listening"
    assert len(errors) == 1 and expected in errors[0], server.output


def test_a_restart_refuses_no_connection(activated):
    """SIGTERM: the old server stops accepting at once and leaves the queue; a client that
    connects meanwhile is greeted by the next server, not refused; a session open before the
    stop finishes normally."""
    sock = _listener()
    port = sock.getsockname()[1]
    first = activated([sock])
    open_session = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = open_session.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    first.signal(signal.SIGTERM)
    first.wait_for(r"the queue of new connections is left to systemd")
    waiting = socket.create_connection(("127.0.0.1", port), timeout=20)  # queued, not refused
    open_session.sendall(f"USER alice\r\nPASS {USERS['alice']}\r\nQUIT\r\n".encode())
    assert [reader.readline()[:3] for _ in range(3)] == [b"+OK"] * 3
    open_session.close()
    assert first.wait_exit(30) == 0
    second = activated([sock])
    try:
        assert waiting.makefile("rb").readline().startswith(b"+OK")  # the new one's greeting
    finally:
        waiting.close()
    assert wait_until(lambda: second.proc.poll() is None)


def test_socket_unit_beside_the_service_unit(tmp_path):
    """etc/iupop3.socket leaves accepting to the server (Accept=no) and passes systemd-analyze
    verify together with etc/iupop3.service when systemd-analyze is there."""
    import configparser
    text = (ROOT / "etc" / "iupop3.socket").read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    assert parser["Socket"]["ListenStream"] == "110" and parser["Socket"]["Accept"] == "no"
    assert parser["Install"]["WantedBy"] == "sockets.target"
    iupop3 = ROOT / ".venv" / "bin" / "iupop3"
    if shutil.which("systemd-analyze") is None or not iupop3.exists():
        return
    service = (ROOT / "etc" / "iupop3.service").read_text()
    (tmp_path / "iupop3.service").write_text(service.replace("/usr/local/bin/iupop3",
                                                             str(iupop3)))
    (tmp_path / "iupop3.socket").write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "iupop3.socket"),
                          str(tmp_path / "iupop3.service")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "iupop3.s" not in out.stderr, out.stderr


def _settings(*args: str):
    from shared import settings as settings_mod
    return settings_mod.resolve(["-users", "/dev/null", *args])[0]


def test_roles_by_name_then_by_port():
    """LISTEN_FDNAMES pop3/pop3s/metrics decide; unnamed sockets go by -tls-port and -metrics."""
    from supervisor import activation
    socks = [_listener() for _ in range(4)]
    ports = [s.getsockname()[1] for s in socks]
    settings = _settings("-tls-cert", "/dev/null", "-tls-port", str(ports[1]),
                         "-metrics", f"127.0.0.1:{ports[2]}")
    try:
        by_port = activation.classify([("iupop3.socket", s) for s in socks], settings)
        assert by_port.plain == [socks[0], socks[3]] and by_port.tls == [socks[1]]
        assert by_port.metrics is socks[2] and by_port.inherited
        by_name = activation.classify(
            [("metrics", socks[0]), ("pop3", socks[1]), ("pop3s", socks[3])], settings)
        assert by_name.metrics is socks[0] and by_name.plain == [socks[1]]
        assert by_name.tls == [socks[3]]
    finally:
        for sock in socks:
            sock.close()


def test_proxy_roles_by_port_or_name_and_a_missing_one_is_an_error():
    """A -proxy-listen / -proxy-tls-listen port, or FileDescriptorName pop3-proxy / pop3s-proxy,
    makes a socket expect PROXY headers; a proxy endpoint with no inherited socket is one
    line naming the setting and the FileDescriptorName."""
    from supervisor import activation
    socks = [_listener() for _ in range(4)]
    ports = [s.getsockname()[1] for s in socks]
    settings = _settings("-tls-cert", "/dev/null", "-trusted-networks", "127.0.0.1",
                         "-proxy-listen", f"127.0.0.1:{ports[1]}",
                         "-proxy-tls-listen", f"127.0.0.1:{ports[2]}")
    try:
        by_port = activation.classify([("iupop3.socket", s) for s in socks[:3]], settings)
        assert by_port.plain == [socks[0]] and by_port.proxy_plain == [socks[1]]
        assert by_port.proxy_tls == [socks[2]] and not by_port.tls
        by_name = activation.classify([("pop3", socks[0]), ("pop3-proxy", socks[3]),
                                       ("pop3s-proxy", socks[2])], _settings())
        assert by_name.proxy_plain == [socks[3]] and by_name.proxy_tls == [socks[2]]
        with pytest.raises(activation.ActivationError) as missing:
            activation.classify([("iupop3.socket", s) for s in (socks[0], socks[2])], settings)
        text = str(missing.value)
        assert f"-proxy-listen 127.0.0.1:{ports[1]}" in text and "pop3-proxy" in text
        assert "\n" not in text
    finally:
        for sock in socks:
            sock.close()


def test_activated_proxy_port_takes_headers(activated):
    """Under socket activation the -proxy-listen port reads a PROXY header before the
    greeting and the session has the client's address; the POP3 port stays direct."""
    pop3, proxy = _listener(), _listener()
    proxy_port = proxy.getsockname()[1]
    server = activated([pop3, proxy], "-trusted-networks", "127.0.0.1",
                       "-proxy-listen", f"127.0.0.1:{proxy_port}")
    server.wait_for(rf"PROXY protocol header expected on 127\.0\.0\.1:{proxy_port}")
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(v2_header(("192.0.2.7", 5555)))
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        server.wait_for(r"connect from 192\.0\.2\.7:5555")
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"+OK")
    assert _login("127.0.0.1", pop3.getsockname()[1]).startswith(b"+OK 2 ")


def test_a_proxy_endpoint_missing_from_the_given_sockets_is_exit_2(activated):
    """-proxy-listen names a port systemd did not pass: one line on stderr and exit 2, not
    a node that silently listens on no proxy port."""
    pop3 = _listener()
    server = activated([pop3], "-trusted-networks", "127.0.0.1",
                       "-proxy-listen", "127.0.0.1:10110", wait=False)
    assert server.wait_exit(30) == 2
    errors = [line for line in server.output.splitlines() if line.startswith("iupop3:")]
    assert len(errors) == 1 and "-proxy-listen 127.0.0.1:10110" in errors[0], server.output


def test_environment_meant_for_another_process_is_ignored_and_removed():
    """LISTEN_PID of another process: nothing is adopted, and the variables are gone (so the
    workers, which inherit the environment, never see them)."""
    from supervisor import activation
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "pop3"}
    assert activation.inherited_sockets(environ) is None and environ == {}


def test_upgrade_handover_variable_is_strict():
    """IUPOP3_UPGRADE is parsed whole or not at all (and removed from the environment)."""
    from supervisor.upgrade import Handover
    good = {"IUPOP3_UPGRADE": "ready=4,stats=5,pidfile=-1,from=77,held=1"}
    assert Handover.from_environ(good) == Handover(4, -1, 5, 77, True) and good == {}
    assert Handover.from_environ({"IUPOP3_UPGRADE": "ready=4,stats=x"}) is None
    assert Handover.from_environ({}) is None
