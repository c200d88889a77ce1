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
import os  # noqa: E402
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
    __slots__ = ("client", "held", "error", "noops")

    def __init__(self) -> None:
        self.client: Client | None = None
        self.held = False
        self.error: str | None = None
        self.noops = 0


class IdleFleet:
    """This process's share of the idle sessions and what they measured; ``phase`` is
    "ramp" until the orchestrator says every process has logged all its sessions in."""

    def __init__(self, job: dict):
        self.job = job
        self.sessions = [IdleSession() for _ in job["users"]]
        self.settled = 0  # sessions whose login finished, either way
        self.phase = "ramp"
        self.noop_ms: dict[str, list[float]] = {"ramp": [], "hold": []}
        self.stop = Event()

    def source(self, index: int) -> str | None:
        sources = self.job.get("sources") or [None]
        return sources[index % len(sources)]


def idle_session(fleet: IdleFleet, index: int, gate, window: Window) -> None:
    job, session = fleet.job, fleet.sessions[index]
    name, password = job["users"][index]
    try:
        with gate:
            session.client = Client(job["host"], job["port"], timeout=job["reply_timeout"],
                                    source=fleet.source(index))
            session.client.greeting()
            session.client.login(name, password)
        session.held = True
    except Pop3Error as exc:
        session.error = exc.kind
        window.error(exc)
        if session.client:
            session.client.close()
        return
    finally:
        fleet.settled += 1
    interval = job["noop_interval"]
    delay = random.uniform(0, interval)  # spread the NOOPs evenly over the interval
    while not fleet.stop.wait(delay):
        try:
            started = time.perf_counter()
            session.client.noop()
            fleet.noop_ms[fleet.phase].append((time.perf_counter() - started) * 1000)
            session.noops += 1
        except Pop3Error as exc:
            session.held = False
            session.error = exc.kind
            window.error(exc)
            session.client.close()
            return
        delay = interval


def wait_for_ramp(fleet: IdleFleet, started: float) -> str:
    """Until every login has settled; gives up after ``ramp_timeout`` or when no login
    settles for ``stall_timeout`` seconds (a server that stopped answering). Progress goes
    to stderr every 10 s: a 100,000-session ramp takes minutes."""
    job, total = fleet.job, len(fleet.sessions)
    deadline = started + job["ramp_timeout"]
    last_progress, last_count, last_report = time.time(), -1, time.time()
    while fleet.settled < total:
        now = time.time()
        if fleet.settled != last_count:
            last_progress, last_count = now, fleet.settled
        if now > deadline:
            return f"ramp timeout after {job['ramp_timeout']:.0f}s"
        if now - last_progress > job["stall_timeout"]:
            return f"ramp stalled: no login settled for {job['stall_timeout']:.0f}s"
        if now - last_report >= 10:
            held = sum(s.held for s in fleet.sessions)
            print(f"loadgen {os.getpid()}: {fleet.settled}/{total} logins settled, {held} held, "
                  f"{now - started:.0f}s", file=sys.stderr, flush=True)
            last_report = now
        gevent.sleep(0.2)
    return ""


def run_idle(job: dict) -> dict:
    from gevent.lock import BoundedSemaphore

    emit({"event": "ready"})
    go = read_command()
    window = Window(go["t0"], 0.0, 0.0)
    gevent.sleep(max(0.0, go["t0"] - time.time()))
    cpu0 = cpu_seconds()
    gate = BoundedSemaphore(job["login_concurrency"])
    fleet = IdleFleet(job)
    greenlets = [gevent.spawn(idle_session, fleet, i, gate, window)
                 for i in range(len(fleet.sessions))]
    gave_up = wait_for_ramp(fleet, go["t0"])
    ramp_s = time.time() - go["t0"]
    cpu1 = cpu_seconds()
    emit({"event": "ramped", "held": sum(s.held for s in fleet.sessions),
          "failed": sum(s.error is not None for s in fleet.sessions), "ramp_s": ramp_s,
          "gave_up": gave_up, "errors": dict(window.errors)})
    read_command()  # "hold": every process has ramped; NOOPs from now on count as held
    fleet.phase = "hold"
    hold_t0 = time.time()
    read_command()  # "stop", once the orchestrator has measured memory
    hold_s = time.time() - hold_t0
    cpu2 = cpu_seconds()
    held = sum(s.held for s in fleet.sessions)
    noops = sum(s.noops for s in fleet.sessions)
    fleet.stop.set()  # sessions leave their loop once a NOOP in flight has its reply
    gevent.joinall(greenlets, timeout=job["reply_timeout"])
    for session in fleet.sessions:
        if session.client:
            session.client.close()
    return {"event": "done", "held": held, "noops": noops, "ramp_s": ramp_s,
            "noop_ms": _sample(fleet.noop_ms["hold"]), "hold_noops": len(fleet.noop_ms["hold"]),
            "ramp_noop_ms": _sample(fleet.noop_ms["ramp"]), "gave_up": gave_up,
            "errors": dict(window.errors), "error_examples": window.examples,
            "cpu_pct": 100.0 * (cpu2 - cpu1) / hold_s if hold_s > 0 else 0.0,
            "ramp_cpu_pct": 100.0 * (cpu1 - cpu0) / ramp_s if ramp_s > 0 else 0.0}


def _sample(values: list[float], most: int = 20000) -> list[float]:
    """A fair sample is enough for percentiles, and keeps the JSON line small."""
    return random.sample(values, most) if len(values) > most else values


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
