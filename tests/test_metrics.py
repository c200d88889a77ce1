"""-metrics: the Prometheus endpoint, checked by promtool, against XTND STATS, and scraped by a
real Prometheus on loopback (Debian ``prometheus``; ``python3 dev.py test`` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import statsreport
from shared.stats import Counter, StatsArea
from supervisor import metrics
from tests.conftest import ROOT, USERS, assert_healthy
from tests.processes import wait_until

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("promtool") and shutil.which("prometheus")),
    reason="needs Debian's prometheus package (python3 dev.py test installs it)")
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _metrics_server(start_server, tmp_path, *args):
    auth = tmp_path / "pop_xtnd.dat"
    auth.write_text("stats alice\n")
    server = start_server("-metrics", "127.0.0.1:0", "-xtnd", str(auth), "-auth-delay", "0",
                          *args)
    server.metrics_port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/").group(1))
    return server


def _scrape(server, accept: str = "") -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                     headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def _samples(text: str) -> dict[str, float]:
    """name{labels} -> value, labels written k=v sorted."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _stats(server) -> dict[str, str]:
    client = server.raw()
    client.line()
    client.command("USER alice")
    assert client.command(f"PASS {USERS['alice']}").startswith(b"+OK")
    assert client.command("XTND STATS") == statsreport.HEADER.encode()
    values, _ = statsreport.parse([line.decode() for line in client.multiline()])
    client.command("QUIT")
    client.close()
    return values


def _known_load(server) -> None:
    """Three sessions that RETR, one failed login, one session left open (returned)."""
    for user in ("alice", "bob", "carol"):
        client = server.login(user)
        client.retr(1)
        client.retr(2)
        client.quit()
    bad = server.pop()
    bad.user("bob")
    with pytest.raises(Exception):
        bad.pass_("wrong")
    bad.quit()


def test_families_follow_the_figures():
    """The collector's families are a pure function of the figures: names, types, labels."""
    totals = {c: 0 for c in Counter} | {Counter.TOTAL: 7, Counter.ADDRESS_REFUSED: 2,
                                        Counter.HUNG_KILLED: 1, Counter.TRUNCATED: 3,
                                        Counter.FATAL_SLOTS: 1, Counter.RETR_OCTETS: 900}
    figures = statsreport.Figures("9.9", "INFO", 0.0, 1700000000.0, 1.5, totals, ("a", "b"))
    found = {f.name: f for f in metrics.families(figures, {"running": 2, "fatal": 1})}
    assert found["iupop3_sessions"].type == "counter"
    assert found["iupop3_sessions"].samples[0].value == 7
    refused = {s.labels["reason"]: s.value for s in found["iupop3_sessions_refused"].samples}
    assert refused == {"maxclients": 0, "max_per_address": 2}
    assert found["iupop3_workers_hung_killed"].samples[0].value == 1
    assert found["iupop3_handoffs_lost"].samples[0].value == 3
    assert found["iupop3_worker_slots_fatal"].samples[0].value == 1
    assert found["iupop3_users_current"].samples[0].value == 2
    states = {s.labels["state"]: s.value for s in found["iupop3_workers"].samples}
    assert states["running"] == 2 and states["fatal"] == 1 and states["hung"] == 0
    assert found["iupop3_build_info"].samples[0].labels == {"version": "9.9"}
    assert not any("user" in s.labels for f in found.values() for s in f.samples)


@needs_prometheus
def test_scrape_equals_xtnd_stats_and_passes_promtool(start_server, tmp_path):
    """After a known load a scrape shows XTND STATS' figures, and promtool accepts it."""
    server = _metrics_server(start_server, tmp_path)
    _known_load(server)
    held = server.login("carol")  # one session open while both are read
    # Sessions end asynchronously: read once only carol's and the STATS session are open.
    assert wait_until(lambda: _stats(server)["Current Threads"] == "2")
    stats = _stats(server)
    # ...and scrape once the STATS session's own end is counted too.
    assert wait_until(lambda: _samples(_scrape(server)[1])["iupop3_sessions_current"] == 1)
    content_type, text = _scrape(server)
    assert content_type.startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    got = _samples(text)
    assert got["iupop3_sessions_total"] == int(stats["Total Threads"])
    assert got["iupop3_retrieved_messages_total"] == int(stats["Retrieved Messages"]) == 6
    assert got["iupop3_retrieved_bytes_total"] == int(stats["Retrieved Octets"])
    assert got["iupop3_logins_failed_total"] == int(stats["Auth Failures"]) == 1
    assert got["iupop3_disconnects_total{how=normal}"] == int(stats["Normal Disconnects"]) + 1
    assert got["iupop3_sessions_current"] == 1  # carol's
    assert got["iupop3_users_current"] == 1
    assert got["iupop3_workers{state=running}"] == 2
    assert got["iupop3_retrieved_message_max_bytes"] == int(stats["Maximum Octets"])
    held.quit()
    assert_healthy(server)


def test_openmetrics_when_the_scraper_asks(start_server, tmp_path):
    """Accept: application/openmetrics-text gets OpenMetrics (ending in # EOF); others 404."""
    server = _metrics_server(start_server, tmp_path)
    content_type, text = _scrape(server, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert "# TYPE iupop3_sessions counter" in text and "iupop3_sessions_total 0" in text
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/other", timeout=10)
    assert error.value.code == 404


def test_a_stuck_scraper_does_not_hold_up_pop3(start_server, tmp_path):
    """A scraper that connects and sends nothing: POP3 logins go on being served at once."""
    server = _metrics_server(start_server, tmp_path)
    stuck = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
    try:
        for _ in range(3):
            client = server.login("alice")
            client.quit()
    finally:
        stuck.close()


class Trickler(threading.Thread):
    """A slow-loris scraper: a request line, then one header byte every ``pause`` seconds
    until told to stop, cut off by the server, or ``limit`` seconds have passed."""

    def __init__(self, port: int, pause: float = 0.5, limit: float = 40.0):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pause, self.limit = pause, limit
        self.sent = 0
        self.cut = threading.Event()   # the server closed or reset the connection
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            for _ in range(int(self.limit / self.pause)):
                if self.done.wait(self.pause):
                    return
                self.sock.sendall(b"a")
                self.sent += 1
                self.sock.setblocking(False)  # (a timeout socket would wait in recv)
                try:
                    if self.sock.recv(1) == b"":
                        self.cut.set()
                        return
                except BlockingIOError:
                    pass
                finally:
                    self.sock.settimeout(10)
        except OSError:
            self.cut.set()
        finally:
            self.sock.close()


@pytest.fixture
def bare_metrics():
    """Factory: a MetricsServer on a real loopback socket over a real statistics area;
    returns (server, port)."""
    area = StatsArea.create(3, int(time.time()))
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    servers = []

    def start(**options) -> tuple[metrics.MetricsServer, int]:
        servers.append(metrics.MetricsServer(sock, area, lambda: {"running": 1},
                                             **options).start())
        return servers[-1], sock.getsockname()[1]

    yield start
    for server in servers:
        server.stop()
    sock.close()
    area.close()


def test_a_trickling_scraper_holds_up_neither_scrapes_nor_stop(bare_metrics):
    """A client sending a byte every half second: a concurrent scrape is answered, and stop()
    (called from the supervisor's loop) returns at once, not when the trickle ends (40 s)."""
    server, port = bare_metrics()
    trickler = Trickler(port)
    trickler.start()
    try:
        assert wait_until(lambda: trickler.sent >= 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert "iupop3_build_info" in reply.read().decode()
        assert not trickler.cut.is_set()  # still trickling: the scrape did not wait for it
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        assert took < 3.0, f"stop() took {took:.1f}s"  # the trickle would end after 40 s
    finally:
        trickler.done.set()
        trickler.join(10)


def test_every_scrape_has_a_deadline_for_the_whole_request(bare_metrics):
    """However steadily a client trickles, it is cut off once the request deadline passes."""
    _, port = bare_metrics(deadline=1.0)
    trickler = Trickler(port, pause=0.2)
    trickler.start()
    try:
        assert wait_until(trickler.cut.is_set, timeout=20), f"still open, {trickler.sent} sent"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
    finally:
        trickler.done.set()
        trickler.join(10)


def test_scrapes_in_progress_are_bounded(bare_metrics):
    """MAX_SCRAPES silent clients hold a thread each; one more is closed at once, not queued
    behind them with a thread of its own."""
    before = sum(t.name == "metrics-request" for t in threading.enumerate())
    _, port = bare_metrics()
    stuck = [socket.create_connection(("127.0.0.1", port), timeout=10)
             for _ in range(metrics.MAX_SCRAPES + 1)]
    try:
        def closed(sock: socket.socket) -> bool:
            sock.setblocking(False)  # a timeout socket would wait in recv despite DONTWAIT
            try:
                return sock.recv(1) == b""
            except BlockingIOError:
                return False
        assert wait_until(lambda: any(closed(s) for s in stuck), timeout=5)
        assert sum(closed(s) for s in stuck) == 1
        requests = sum(t.name == "metrics-request" for t in threading.enumerate())
        assert requests <= metrics.MAX_SCRAPES + before  # (earlier tests' may still end)
    finally:
        for sock in stuck:
            sock.close()


def test_bad_metrics_address_is_one_line_and_exit_2(tmp_path):
    """-metrics without a port is refused before anything starts."""
    result = subprocess.run([sys.executable, "-m", "supervisor", "-users", "/dev/null",
                             "-metrics", "localhost"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "-metrics wants" in result.stderr


def _start_prometheus(tmp_path, target_port: int) -> tuple[subprocess.Popen, int, list[str]]:
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
                      f"scrape_configs:\n  - job_name: iupop3\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{target_port}']\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             "--web.listen-address=127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    port = 0
    watchdog = threading.Timer(30, proc.kill)  # a Prometheus that never says it is ready
    watchdog.start()
    # Bounded: Prometheus logs its port, then that it is ready, within its first lines (its
    # API answers 503 before that).
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)', line)
        port = int(match.group(1)) if match else port
        if port and "Server is ready to receive web requests" in line:
            watchdog.cancel()
            return proc, port, lines
        if len(lines) > 200:
            break
    proc.kill()
    raise AssertionError("prometheus did not say where it listens:\n" + "".join(lines))


def _query(port: int, expression: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.request.quote(expression)}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)["data"]["result"]


@needs_prometheus
def test_real_prometheus_records_the_figures(start_server, tmp_path):
    """Prometheus 2 scrapes the endpoint on loopback and stores what XTND STATS shows."""
    server = _metrics_server(start_server, tmp_path)
    _known_load(server)
    proc, port, _ = _start_prometheus(tmp_path, server.metrics_port)
    try:
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain its log
        assert wait_until(lambda: _query(port, "iupop3_retrieved_messages_total"), timeout=30)
        retrieved = _query(port, "iupop3_retrieved_messages_total")[0]
        assert retrieved["metric"]["job"] == "iupop3" and retrieved["value"][1] == "6"
        assert _query(port, "iupop3_logins_failed_total")[0]["value"][1] == "1"
        up = _query(port, "up")[0]
        assert up["value"][1] == "1"
        info = _query(port, "iupop3_build_info")[0]["metric"]
        assert info["version"] == _stats(server)["Version Number"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9110", ("127.0.0.1", 9110)), ("[::1]:0", ("::1", 0)),
    ("9110", None), ("localhost:9110", None), ("::1:9110", None), ("127.0.0.1:70000", None),
    ("127.0.0.1:", None)])
def test_metrics_address_form(text, expected):
    """-metrics wants ADDRESS:PORT with an IP address (IPv6 in brackets), nothing looser."""
    from shared import netaddr
    if expected is None:
        with pytest.raises(ValueError):
            netaddr.host_port(text)
    else:
        assert netaddr.host_port(text) == expected
