"""One load-generator process: many POP3 clients as greenlets, driven by JSON lines.

The orchestrator (bench/run.py) starts several of these with a job on stdin, waits for each
to say ``ready``, then sends ``go`` with a common start time; for the idle job it later sends
``stop``. Results, including this process's own CPU use, come back as one JSON line.
Run as ``python -m bench.loadgen``; it is not meant to be started by hand.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter, deque  # noqa: E402

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.event import Event  # noqa: E402

from bench.pop3client import Client, Pop3Error  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def read_command() -> dict:
    gevent.socket.wait_read(sys.stdin.fileno())
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("loadgen: the orchestrator went away")
    return json.loads(line)


class Window:
    """The measured interval [start, end) and this process's CPU over it."""

    def __init__(self, t0: float, warmup: float, duration: float):
        self.start = t0 + warmup
        self.end = self.start + duration
        self.cpu_start = self.cpu_end = 0.0
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def sample_cpu(self) -> None:
        gevent.sleep(max(0.0, self.start - time.time()))
        self.cpu_start = cpu_seconds()
        gevent.sleep(max(0.0, self.end - time.time()))
        self.cpu_end = cpu_seconds()

    def inside(self, t0: float, t1: float) -> bool:
        return t0 >= self.start and t1 <= self.end

    def error(self, exc: Pop3Error) -> None:
        self.errors[exc.kind] += 1
        self.examples.setdefault(exc.kind, exc.detail)

    def result(self, **figures) -> dict:
        wall = self.end - self.start
        return {"event": "done", "cpu_s": self.cpu_end - self.cpu_start,
                "cpu_pct": 100.0 * (self.cpu_end - self.cpu_start) / wall if wall > 0 else 0.0,
                "errors": dict(self.errors), "error_examples": self.examples, **figures}


def run_timed(job: dict, worker) -> dict:
    """Start one greenlet per client, run them until the window ends, gather figures."""
    emit({"event": "ready"})
    go = read_command()
    window = Window(go["t0"], job["warmup"], job["duration"])
    gevent.sleep(max(0.0, go["t0"] - time.time()))
    clients = [gevent.spawn(worker, job, window, index) for index in range(job["clients"])]
    sampler = gevent.spawn(window.sample_cpu)
    gevent.joinall(clients + [sampler])
    merged: dict = {}
    for greenlet in clients:
        for key, value in (greenlet.value or {}).items():
            merged[key] = merged.get(key, type(value)()) + value
    return window.result(**merged)


def _pause_after_error() -> None:
    gevent.sleep(0.05)  # a refused or broken session must not turn into a busy loop


# -- scenario 1: login storm ---------------------------------------------------------------
def storm_client(job: dict, window: Window, index: int) -> dict:
    name, password = job["users"][index]
    latencies: list[float] = []
    while time.time() < window.end:
        t0 = time.time()
        client = None
        try:
            client = Client(job["host"], job["port"])
            client.greeting()
            client.login(name, password)
            count, _octets = client.stat()
            if count != job["expect_messages"]:
                raise Pop3Error("STAT count", f"{count} != {job['expect_messages']}")
            client.quit()
        except Pop3Error as exc:
            window.error(exc)
            if client:
                client.close()
            _pause_after_error()
            continue
        t1 = time.time()
        if window.inside(t0, t1):
            latencies.append(t1 - t0)
    return {"latencies": latencies}


# -- scenario 2: bulk RETR -----------------------------------------------------------------
def retr_client(job: dict, window: Window, index: int) -> dict:
    name, password = job["users"][index]
    octets = messages = 0
    while time.time() < window.end:
        client = None
        try:
            client = Client(job["host"], job["port"])
            client.greeting()
            client.login(name, password)
            sizes = client.list_sizes()
            if len(sizes) != job["expect_messages"]:
                raise Pop3Error("LIST count", f"{len(sizes)} != {job['expect_messages']}")
            for number in sorted(sizes):
                t0 = time.time()
                if t0 >= window.end:
                    break
                client.retr(number, sizes[number])
                if window.inside(t0, time.time()):
                    octets += sizes[number]
                    messages += 1
            client.quit()
        except Pop3Error as exc:
            window.error(exc)
            if client:
                client.close()
            _pause_after_error()
    return {"octets": octets, "messages": messages}


# -- scenario 5: a real poll ---------------------------------------------------------------
def poll_client(job: dict, window: Window, index: int) -> dict:
    queue: deque = job["_queue"]
    seen: dict[str, set[bytes]] = job["_seen"]
    latencies: list[float] = []
    seeds: list[int] = []
    polls = 0
    while time.time() < window.end and queue:
        name, password = queue.popleft()
        t0 = time.time()
        client = None
        fetched: list[int] = []
        fetched_uids: list[bytes] = []
        try:
            client = Client(job["host"], job["port"])
            client.greeting()
            client.login(name, password)
            client.stat()
            uids = client.listing(b"UIDL")
            sizes = client.list_sizes()
            known = seen.setdefault(name, set())
            for number, uid in sorted(uids.items()):
                if uid in known:
                    continue
                fetched.append(client.retr(number, sizes[number]))
                fetched_uids.append(uid)
                client.dele(number)
            client.quit()
        except Pop3Error as exc:
            window.error(exc)
            if client:
                client.close()
            queue.append((name, password))
            _pause_after_error()
            continue
        t1 = time.time()
        known.update(fetched_uids)  # only once QUIT has applied the deletions
        seeds.extend(fetched)  # every retrieval, in or out of the window, for the audit
        if window.inside(t0, t1):
            latencies.append(t1 - t0)
            polls += 1
        queue.append((name, password))
    return {"latencies": latencies, "seeds": seeds, "polls": polls}


def run_poll(job: dict) -> dict:
    job["_queue"] = deque(tuple(u) for u in job["users"])
    job["_seen"] = {}
    return run_timed(job, poll_client)


# -- scenario 3: idle sessions ---------------------------------------------------------------
class IdleSession:
    __slots__ = ("client", "held", "error", "noops", "noop_ms")

    def __init__(self) -> None:
        self.client: Client | None = None
        self.held = False
        self.error: str | None = None
        self.noops = 0
        self.noop_ms: list[float] = []  # every NOOP's round trip, ramp and hold alike


def idle_session(job: dict, session: IdleSession, gate, stop: Event, window: Window) -> None:
    name, password = job["_user"]
    try:
        with gate:
            session.client = Client(job["host"], job["port"], timeout=job["reply_timeout"])
            session.client.greeting()
            session.client.login(name, password)
        session.held = True
    except Pop3Error as exc:
        session.error = exc.kind
        window.error(exc)
        if session.client:
            session.client.close()
        return
    interval = job["noop_interval"]
    delay = random.uniform(0, interval)  # spread the NOOPs evenly over the interval
    while not stop.wait(delay):
        try:
            started = time.perf_counter()
            session.client.noop()
            if job["_holding"][0]:  # "while held": NOOPs during the login ramp do not count
                session.noop_ms.append((time.perf_counter() - started) * 1000)
            session.noops += 1
        except Pop3Error as exc:
            session.held = False
            session.error = exc.kind
            window.error(exc)
            session.client.close()
            return
        delay = interval


def run_idle(job: dict) -> dict:
    from gevent.lock import BoundedSemaphore

    emit({"event": "ready"})
    go = read_command()
    window = Window(go["t0"], 0.0, 0.0)
    gevent.sleep(max(0.0, go["t0"] - time.time()))
    cpu0 = cpu_seconds()
    gate = BoundedSemaphore(job["login_concurrency"])
    stop = Event()
    sessions = [IdleSession() for _ in job["users"]]
    greenlets = []
    job["_holding"] = [False]  # shared by every session's copy of the job
    for session, user in zip(sessions, job["users"]):
        spec = dict(job, _user=user)
        greenlets.append(gevent.spawn(idle_session, spec, session, gate, stop, window))
    deadline = time.time() + job["ramp_timeout"]
    while time.time() < deadline and any(not s.held and s.error is None for s in sessions):
        gevent.sleep(0.2)
    ramp_s = time.time() - go["t0"]
    job["_holding"][0] = True
    cpu1 = cpu_seconds()
    emit({"event": "ramped", "held": sum(s.held for s in sessions),
          "failed": sum(s.error is not None for s in sessions), "ramp_s": ramp_s,
          "errors": dict(window.errors)})
    read_command()  # "stop", once the orchestrator has measured memory
    hold_s = time.time() - go["t0"] - ramp_s
    cpu2 = cpu_seconds()
    held = sum(s.held for s in sessions)
    noops = sum(s.noops for s in sessions)
    latencies = [ms for s in sessions for ms in s.noop_ms]
    if len(latencies) > 20000:  # a fair sample is enough for percentiles
        latencies = random.sample(latencies, 20000)
    stop.set()  # sessions leave their loop once a NOOP in flight has its reply
    gevent.joinall(greenlets, timeout=job["reply_timeout"])
    for session in sessions:
        if session.client:
            session.client.close()
    return {"event": "done", "held": held, "noops": noops, "ramp_s": ramp_s,
            "noop_ms": latencies,
            "errors": dict(window.errors), "error_examples": window.examples,
            "cpu_pct": 100.0 * (cpu2 - cpu1) / hold_s if hold_s > 0 else 0.0,
            "ramp_cpu_pct": 100.0 * (cpu1 - cpu0) / ramp_s if ramp_s > 0 else 0.0}


JOBS = {
    "storm": lambda job: run_timed(job, storm_client),
    "retr": lambda job: run_timed(job, retr_client),
    "poll": run_poll,
    "idle": run_idle,
}


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    job = json.loads(sys.stdin.readline())
    emit(JOBS[job["kind"]](job))


if __name__ == "__main__":
    main()
