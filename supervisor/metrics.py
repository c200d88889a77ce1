"""Prometheus figures (``-metrics ADDR:PORT``), read from the shared statistics area.

The figures are the ones XTND STATS shows (shared/statsreport.collect on the same slots), so the
two always agree. A small HTTP server answers ``GET /metrics`` from one thread of the supervisor:
it only reads shared memory and a snapshot of the worker states, so a slow or stuck scraper never
holds up the loop that accepts connections. prometheus-client renders the exposition: its text
format by default, OpenMetrics when the scraper's Accept header asks for it. No multiprocess
directory (it piles up a file per worker ever started): the slots are the multiprocess store.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from shared import statsreport
from shared.logsetup import log
from shared.stats import Counter, StatsArea
from shared.version import VERSION

REQUEST_TIMEOUT_SECONDS = 5.0  # a scraper that stops sending is dropped after this long
# Every state a worker slot can be in (supervisor/workers.py WorkerState values), so each
# iupop3_workers{state} series exists from the first scrape on.
WORKER_STATES = ("starting", "running", "draining", "hung", "exited", "backoff", "fatal")

# (name, help, counter) of plain counters; names follow Prometheus' conventions (_total).
COUNTERS: tuple[tuple[str, str, Counter], ...] = (
    ("iupop3_sessions", "Sessions served (XTND STATS Total Threads).", Counter.TOTAL),
    ("iupop3_client_timeouts", "Sessions closed for client inactivity (-timeout, "
     "-login-timeout).", Counter.TIMEOUTS),
    ("iupop3_blocked_sockets", "Writes that found a client socket full (Blocked Socket "
     "Count).", Counter.BLOCKED),
    ("iupop3_retrieved_messages", "Messages sent by RETR.", Counter.RETR_MESSAGES),
    ("iupop3_retrieved_bytes", "Octets of messages sent by RETR.", Counter.RETR_OCTETS),
    ("iupop3_logins_failed", "Failed logins (XTND STATS Auth Failures).",
     Counter.AUTH_FAILURES),
    ("iupop3_workers_hung_killed", "Workers the watchdog killed for a missed heartbeat.",
     Counter.HUNG_KILLED),
    ("iupop3_handoffs_lost", "Connections lost because the kernel dropped their descriptor "
     "in the handoff (a truncated frame).", Counter.TRUNCATED),
    ("iupop3_proxy_headers_refused", "Connections closed for a missing, malformed or "
     "untrusted PROXY header (XTND STATS Proxy Refusals).", Counter.PROXY_REFUSED),
    ("iupop3_takeovers", "Idle sessions ended so a new login of their maildrop could take "
     "its lock (XTND STATS Takeovers).", Counter.TAKEOVERS),
)
# (name, help, label, {label value: counter}) of counters split by one label.
LABELLED: tuple[tuple[str, str, str, Mapping[str, Counter]], ...] = (
    ("iupop3_sessions_refused", "Connections refused before a session started.", "reason",
     {"maxclients": Counter.REFUSED, "max_per_address": Counter.ADDRESS_REFUSED}),
    ("iupop3_logins_refused", "Logins refused without a password check.", "reason",
     {"auth_block": Counter.ADDRESS_BLOCKED, "login_delay": Counter.LOGIN_DELAYED}),
    ("iupop3_disconnects", "Sessions ended, by how (Normal/Abnormal Disconnects).", "how",
     {"normal": Counter.NORMAL, "abnormal": Counter.ABNORMAL}),
)
GAUGES: tuple[tuple[str, str, Counter], ...] = (
    ("iupop3_sessions_current", "Sessions open now (Current Threads).", Counter.CURRENT),
    ("iupop3_sessions_max", "Most sessions open at once since the start (Max Threads).",
     Counter.MAX_CONCURRENT),
    ("iupop3_retrieved_message_min_bytes", "Smallest message sent by RETR (0 = none yet).",
     Counter.RETR_MIN),
    ("iupop3_retrieved_message_max_bytes", "Largest message sent by RETR.", Counter.RETR_MAX),
    ("iupop3_worker_slots_fatal", "Worker slots given up on (FATAL) now.", Counter.FATAL_SLOTS),
    ("iupop3_worker_slots_dead", "Worker slots held by a process that survived SIGKILL.",
     Counter.DEAD_SLOTS),
)


class StatsCollector:
    """A prometheus-client custom collector over one statistics area (no per-user labels)."""

    def __init__(self, area: StatsArea, worker_states: Callable[[], Mapping[str, int]]):
        self.area = area
        self.worker_states = worker_states

    def collect(self) -> Iterator[Metric]:
        figures = statsreport.collect(self.area, VERSION, "")
        yield from families(figures, self.worker_states())


def families(figures: statsreport.Figures, states: Mapping[str, int]) -> Iterator[Metric]:
    """The metric families of one set of figures: a pure function, unit-tested."""
    t = figures.totals
    for name, text, counter in COUNTERS:
        yield CounterMetricFamily(name, text, value=t.get(counter, 0))
    for name, text, label, parts in LABELLED:
        family = CounterMetricFamily(name, text, labels=[label])
        for value, counter in parts.items():
            family.add_metric([value], t.get(counter, 0))
        yield family
    for name, text, counter in GAUGES:
        yield GaugeMetricFamily(name, text, value=t.get(counter, 0))
    yield GaugeMetricFamily("iupop3_users_current", "Users logged in now (Current Users).",
                            value=len(figures.users))
    workers = GaugeMetricFamily("iupop3_workers", "Worker slots by state.", labels=["state"])
    for state in WORKER_STATES:
        workers.add_metric([state], states.get(state, 0))
    yield workers
    yield CounterMetricFamily("iupop3_cpu_seconds", "CPU time of the supervisor and every "
                              "worker, live and reaped (CPU Seconds).", value=figures.cpu_seconds)
    yield GaugeMetricFamily("iupop3_start_time_seconds", "When this server generation started, "
                            "in seconds since the epoch.", value=figures.start)
    info = GaugeMetricFamily("iupop3_build_info", "The running version; always 1.",
                             labels=["version"])
    info.add_metric([figures.version], 1)
    yield info


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics (and /) answers the exposition; anything else 404 or 405."""

    timeout = REQUEST_TIMEOUT_SECONDS
    server_version = f"iupop3/{VERSION}"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.partition("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        encoder, content_type = exposition.choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # a scrape every 15 s is not worth a log line


class _Server(http.server.HTTPServer):
    """HTTPServer on a socket bound (or inherited) elsewhere; one request at a time."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry):
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.registry = registry

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request from %s failed", client_address[0])


class MetricsServer:
    """The serving thread. ``stop`` ends it; the socket itself belongs to the caller."""

    def __init__(self, sock: socket.socket, area: StatsArea,
                 worker_states: Callable[[], Mapping[str, int]]):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(area, worker_states))
        # The socket stays non-blocking: during an upgrade two supervisors share it, and the
        # one that loses the race for a connection must not wait in accept().
        self.server = _Server(sock, registry)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.5,),
                                       name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (the thread ends within half a second)."""
        if self.thread.is_alive():
            self.server.shutdown()
