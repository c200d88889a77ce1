"""Prometheus figures (``-metrics ADDR:PORT``), read from the shared statistics area.

The figures are the ones XTND STATS shows (shared/statsreport.collect on the same slots), so the
two always agree. A small HTTP server answers ``GET /metrics`` from threads of the supervisor
(MetricsServer): they only read shared memory and a snapshot of the worker states, so a slow or
stuck scraper holds up neither the loop that accepts connections nor the other scrapes.
prometheus-client renders the exposition: its text format by default, OpenMetrics when the
scraper's Accept header asks for it. No multiprocess directory (it piles up a file per worker
ever started): the slots are the multiprocess store.
"""

from __future__ import annotations

import http.server
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from shared import statsreport
from shared.logsetup import log
from shared.stats import Counter, StatsArea
from shared.version import VERSION

REQUEST_TIMEOUT_SECONDS = 5.0    # a scraper that stops sending is dropped after this long...
REQUEST_DEADLINE_SECONDS = 10.0  # ...and every scrape after this long, however it trickles
MAX_SCRAPES = 8                  # requests served at once (a thread each); more are closed
POLL_SECONDS = 0.25              # the accepting thread looks at stop() and deadlines this often
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


class MetricsServer:
    """The accepting thread and one short-lived thread per scrape (at most ``MAX_SCRAPES``).

    Every request has a deadline for the whole exchange (``REQUEST_DEADLINE_SECONDS``, not per
    read): a client that trickles a byte a second is cut off by the accepting thread, so it can
    neither hold the other scrapes up nor keep a thread for long. ``stop``
    only sets a flag: it never waits for a request in progress, because it runs in the
    supervisor's loop (upgrade hand-over, stop under socket activation).
    """

    def __init__(self, sock: socket.socket, area: StatsArea,
                 worker_states: Callable[[], Mapping[str, int]],
                 deadline: float = REQUEST_DEADLINE_SECONDS):
        self.registry = CollectorRegistry(auto_describe=False)  # read by _Handler as server
        self.registry.register(StatsCollector(area, worker_states))
        # Our own descriptor: the caller closes its copy right after stop(), while this thread
        # may still be polling; a number reused meanwhile is never ours. It stays non-blocking:
        # during an upgrade two supervisors share it, and the loser of a race must not wait.
        self.sock = sock.dup()
        self.sock.setblocking(False)
        self.deadline = deadline
        self.stopped = threading.Event()
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self.lock = threading.Lock()
        self.open: dict[socket.socket, float] = {}  # scrapes in progress -> their deadline
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting (within POLL_SECONDS); returns at once, whatever is in progress."""
        self.stopped.set()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            try:
                while not self.stopped.is_set():
                    if selector.select(POLL_SECONDS):
                        self._accept()
                    self._cut_overdue()
            finally:
                self.sock.close()
        # Stopped: scrapes still in progress keep their deadline, then are cut (bounded).
        for _ in range(int(self.deadline / POLL_SECONDS) + 2):
            if not self._cut_overdue():
                return
            time.sleep(POLL_SECONDS)

    def _accept(self) -> None:
        try:
            conn, address = self.sock.accept()
        except OSError:  # another generation took it, or out of descriptors: next turn
            return
        if not self.slots.acquire(blocking=False):
            log.debug("metrics request from %s: %d scrapes in progress; closed", address[0],
                      MAX_SCRAPES)
            conn.close()
            return
        with self.lock:
            self.open[conn] = time.monotonic() + self.deadline
        threading.Thread(target=self._answer, args=(conn, address), name="metrics-request",
                         daemon=True).start()

    def _answer(self, conn: socket.socket, address) -> None:
        try:
            _Handler(conn, address, self)
        except Exception:  # a cut-off or broken client: nothing to tell anyone
            log.debug("metrics request from %s failed", address[0])
        finally:
            with self.lock:  # under the lock: _cut_overdue never shuts a closed socket
                del self.open[conn]
                conn.close()
            self.slots.release()

    def _cut_overdue(self) -> int:
        """Shut the connections past their deadline (their thread then ends); returns how
        many scrapes are still in progress."""
        now = time.monotonic()
        with self.lock:
            for conn, deadline in self.open.items():
                if deadline <= now:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            return len(self.open)
