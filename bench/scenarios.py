"""The five benchmark scenarios, each run against one server at a time.

``Bench`` owns the pristine mail tree (generated once per run, never served), gives every
server start a fresh hard-linked copy of the users it needs, and drives the load-generator
processes. Each scenario returns, per variant, a flat dict of figures plus details (errors by
kind, the load generator's own CPU) that the report shows as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from bench import mailgen
from bench.fleet import NOOP_RATE_BUDGET
from bench.mailgen import SeedCounter, User
from bench.pop3client import Client, Pop3Error
from bench.servers import Server, tree_cpu_seconds

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = 1024
COPY_BATCH = 2000  # Maildirs per cp command (its argument list stays far below ARG_MAX)
LOADGEN_PEGGED = 90.0  # % of one core: above this the load generator may be the bottleneck


@dataclass
class Plan:
    """How long and how big each scenario runs; ``--quick`` and ``--full`` pick other plans."""

    warmup: float = 1.0
    storm_seconds: float = 8.0
    storm_concurrency: tuple[int, ...] = (1, 32)
    retr_seconds: float = 8.0
    retr_concurrency: tuple[int, ...] = (1, 4)
    retr_messages: int = 200
    retr_size: int = 100 * KIB
    idle_levels: tuple[int, ...] = (1000, 2000)
    idle_hold: float = 12.0
    noop_interval: float = 5.0
    noop_rate_budget: float = NOOP_RATE_BUDGET  # NOOPs/s over all sessions (bench/fleet.py)
    big_messages: int = 5000
    big_warm_runs: int = 5
    poll_users: int = 500
    poll_seconds: float = 20.0
    poll_concurrency: int = 16
    delivery_rate: float = 25.0  # new messages per second over all poll users
    loadgen_procs: int = 2

    @classmethod
    def quick(cls) -> "Plan":
        return cls(warmup=0.5, storm_seconds=2.0, retr_seconds=2.0, idle_levels=(300,),
                   idle_hold=5.5, big_warm_runs=2, poll_users=200,
                   poll_seconds=4.0)

    @classmethod
    def full(cls) -> "Plan":
        return cls(idle_levels=(1000, 2000, 10000, 100000))


@dataclass
class Result:
    figures: dict[str, float] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    loadgen_cpu: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_errors(self, done: dict) -> None:
        self.errors.update(done.get("errors", {}))
        for kind, text in done.get("error_examples", {}).items():
            self.examples.setdefault(kind, text)

    def as_dict(self) -> dict:
        return {"figures": self.figures, "errors": dict(self.errors),
                "error_examples": self.examples, "loadgen_cpu_pct": self.loadgen_cpu,
                "notes": self.notes}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


class Loadgens:
    """Several ``python -m bench.loadgen`` processes started together on a common clock.

    Their lines are read by one thread each, so every wait has a deadline (``timeout``
    seconds for any one message): a stuck load generator fails the step, it never hangs it.
    """

    def __init__(self, jobs: list[dict], timeout: float = 120.0):
        self.timeout = timeout
        self.procs = []
        self.lines: list[queue.Queue] = []
        for job in jobs:
            proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen"], cwd=PROJECT,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            self.procs.append(proc)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            self.lines.append(lines)
        try:
            for index in range(len(self.procs)):
                self._expect(index, "ready")
        except RuntimeError:
            self.kill()
            raise
        self.t0 = time.time() + 0.3
        self.send({"t0": self.t0})

    def _expect(self, index: int, event: str) -> dict:
        proc = self.procs[index]
        try:
            line = self.lines[index].get(timeout=self.timeout)
        except queue.Empty:
            raise RuntimeError(f"load generator {proc.pid} said nothing for {self.timeout:.0f}s "
                               f"(waiting for {event})") from None
        if not line:
            raise RuntimeError(f"load generator {proc.pid} died (exit {proc.wait()})")
        message = json.loads(line)
        if message.get("event") != event:
            raise RuntimeError(f"load generator said {message!r}, wanted {event}")
        return message

    def send(self, message: dict) -> None:
        for proc in self.procs:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()

    def expect_all(self, event: str) -> list[dict]:
        try:
            return [self._expect(index, event) for index in range(len(self.procs))]
        except RuntimeError:
            self.kill()
            raise

    def finish(self) -> list[dict]:
        results = self.expect_all("done")
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(timeout=30)
        return results

    def kill(self) -> None:
        """Our own children, by pid: a failed step leaves no load generator behind."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")  # end of file: the process is gone


class Bench:
    def __init__(self, work: str, plan: Plan, owner: tuple[int, int] | None):
        self.work = work
        self.plan = plan
        self.owner = owner  # uid, gid the Dovecot copy's mail belongs to
        self.master = os.path.join(work, "master")
        self.seeds = SeedCounter()
        self.groups: dict[str, list[User]] = {}
        self.expect: dict[str, int] = {}  # messages per mailbox of each group
        self._copies = 0
        # bench/profile.py sets this: probe(server, window_start, seconds) -> has .join()
        self.probe = None

    # -- mail -----------------------------------------------------------------------------
    def all_users(self) -> list[User]:
        return [u for users in self.groups.values() for u in users]

    def prepare_mail(self) -> float:
        """Write the pristine tree: one folder per group of users; returns seconds taken."""
        started = time.time()
        plan = self.plan
        rng = random.Random(1994)
        shutil.rmtree(self.master, ignore_errors=True)
        storm_users = max(plan.storm_concurrency) + plan.loadgen_procs
        self._group("storm", "s", storm_users, lambda: [rng.randint(2 * KIB, 8 * KIB)
                                                        for _ in range(10)])
        self._group("retr", "r", max(plan.retr_concurrency),
                    lambda: [plan.retr_size] * plan.retr_messages)
        # one user more than the largest level: bench/idle.py's probe session
        self._group("idle", "i", max(plan.idle_levels) + 1, lambda: [2 * KIB])
        self._group("big", "b", 1, lambda: [rng.randint(1 * KIB, 12 * KIB)
                                            for _ in range(plan.big_messages)])
        self._group("poll", "p", plan.poll_users, lambda: [rng.randint(2 * KIB, 40 * KIB)
                                                           for _ in range(3)])
        if self.owner:
            subprocess.run(["chown", "-R", f"{self.owner[0]}:{self.owner[1]}", self.master],
                           check=True)
        return time.time() - started

    def _group(self, group: str, prefix: str, count: int, sizes) -> None:
        root = os.path.join(self.master, group)
        users = [mailgen.user(f"{prefix}{i:05d}") for i in range(count)]
        for u in users:
            self.expect[group] = mailgen.fill_mailbox(root, u, sizes(), self.seeds)
        self.groups[group] = users

    @contextlib.contextmanager
    def serving(self, server: Server, group: str, sessions: int,
                before_start=None, users: list[User] | None = None) -> Iterator[str]:
        """A fresh hard-linked copy of GROUP's Maildirs (only USERS' when given: an idle level
        of 1,000 need not copy the 100,000 users of the largest), served by SERVER; yields
        the root.

        Maildir files are never rewritten, only renamed or unlinked, so hard links keep the
        two servers' copies byte-identical without one server's renames reaching the other.
        """
        self._copies += 1
        root = os.path.join(self.work, "serve", f"{server.name}-{group}-{self._copies}")
        os.makedirs(os.path.dirname(root), exist_ok=True)
        source = os.path.join(self.master, group)
        if users is None or len(users) >= len(self.groups[group]):
            subprocess.run(["cp", "-al", source, root], check=True)
        else:
            os.makedirs(root)
            for start in range(0, len(users), COPY_BATCH):
                names = [os.path.join(source, u.name) for u in users[start:start + COPY_BATCH]]
                subprocess.run(["cp", "-al", *names, root], check=True)
        if before_start:
            before_start(root)
        try:
            server.start(root, sessions)
            yield root
        finally:
            server.stop()
            subprocess.run(["rm", "-rf", "--one-file-system", root], check=False)

    def job(self, server: Server, kind: str, users: list[User], **extra) -> dict:
        return {"kind": kind, "host": "127.0.0.1", "port": server.port,
                "users": [(u.name, u.password) for u in users], "clients": len(users),
                "warmup": self.plan.warmup, **extra}

    def _timed_run(self, server: Server, kind: str, concurrency: int,
                   seconds: float) -> tuple[list[dict], float, Result]:
        """Load generators for ``seconds`` of ``kind`` sessions: their reports, the server's CPU
        seconds over the measured window, and a Result with their errors and CPU."""
        result = Result()
        users = self.groups[kind][:concurrency]
        with self.serving(server, kind, concurrency):
            chunks = split(users, self.plan.loadgen_procs if concurrency > 1 else 1)
            gens = Loadgens([self.job(server, kind, chunk, duration=seconds,
                                      expect_messages=self.expect[kind]) for chunk in chunks])
            measured_from = gens.t0 + self.plan.warmup
            cpu = self._server_cpu(server, measured_from, seconds)
            probe = self.probe and self.probe(server, measured_from, seconds)
            done = gens.finish()
            if probe:
                probe.join()
        for d in done:
            result.add_errors(d)
            result.loadgen_cpu.append(round(d["cpu_pct"], 1))
        return done, cpu.join(), result

    # -- 1. login storm -------------------------------------------------------------------
    def login_storm(self, server: Server, concurrency: int) -> Result:
        seconds = self.plan.storm_seconds
        done, cpu_s, result = self._timed_run(server, "storm", concurrency, seconds)
        latencies = [x for d in done for x in d.get("latencies", [])]
        sessions = len(latencies)
        result.figures = {
            "rate": sessions / seconds,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "cpu_ms": 1000 * cpu_s / sessions if sessions else float("nan"),
            "errors": sum(result.errors.values()),
        }
        return self.check_loadgen(result)

    # -- 2. bulk RETR ---------------------------------------------------------------------
    def bulk_retr(self, server: Server, concurrency: int) -> Result:
        seconds = self.plan.retr_seconds
        done, cpu_s, result = self._timed_run(server, "retr", concurrency, seconds)
        megabytes = sum(d.get("octets", 0) for d in done) / 1e6
        result.figures = {
            "mb_s": megabytes / seconds,
            "messages": sum(d.get("messages", 0) for d in done),
            "cpu_ms_per_mb": 1000 * cpu_s / megabytes if megabytes else float("nan"),
            "errors": sum(result.errors.values()),
        }
        return self.check_loadgen(result)

    # -- 4. big mailbox -------------------------------------------------------------------
    def big_mailbox(self, server: Server) -> dict[str, Result]:
        """The first session ever (no index, cache dropped), warm sessions, then the first
        session after a restart with the page cache of the mail AND of the index or ledger
        files the first session left (Dovecot's dovecot.index*/dovecot-uidlist, iupop3's
        .iupop3.ledger, all in the Maildir under this config) dropped."""
        first, warm, restart = Result(), Result(), Result()
        who = self.groups["big"][0]
        with self.serving(server, "big", 4, before_start=mailgen.evict_page_cache) as root:
            first.figures = self._big_session(server, who, first)
            runs = [self._big_session(server, who, warm) for _ in range(self.plan.big_warm_runs)]
            server.stop()
            maildir = os.path.join(root, who.name, "Maildir")
            kept = mailgen.index_files(maildir)
            dropped = mailgen.evict_page_cache(root)
            server.start(root, 4)
            restart.figures = self._big_session(server, who, restart)
        warm.figures = {key: percentile([r[key] for r in runs], 50) for key in runs[0]}
        for result in (first, warm, restart):
            result.figures["errors"] = sum(result.errors.values())
        warm.notes.append(f"median of {len(runs)} sessions")
        restart.notes.append(f"page cache dropped for {dropped} files after the stop; index "
                             "files in the Maildir: " + (", ".join(
                                 f"{name} ({size:,} B)" for name, size in kept.items())
                                 or "none"))
        return {"first": first, "warm": warm, "restart": restart}

    def _big_session(self, server: Server, who: User, result: Result) -> dict[str, float]:
        expected = self.plan.big_messages
        marks = [time.perf_counter()]
        try:
            client = Client("127.0.0.1", server.port, timeout=120)
            client.greeting()
            client.login(who.name, who.password)
            marks.append(time.perf_counter())
            count, octets = client.stat()
            marks.append(time.perf_counter())
            sizes = client.list_sizes()
            marks.append(time.perf_counter())
            uids = client.listing(b"UIDL")
            marks.append(time.perf_counter())
            client.quit()
            marks.append(time.perf_counter())
            if count != expected or len(sizes) != expected or len(uids) != expected:
                raise Pop3Error("count", f"STAT {count}, LIST {len(sizes)}, UIDL {len(uids)}")
            if sum(sizes.values()) != octets:
                raise Pop3Error("LIST sum != STAT octets")
            if len(set(uids.values())) != expected:
                raise Pop3Error("UIDL not unique")
        except Pop3Error as exc:
            result.errors[exc.kind] += 1
            result.examples.setdefault(exc.kind, exc.detail)
            return {k: float("nan") for k in ("total_ms", "login_ms", "stat_ms", "list_ms",
                                               "uidl_ms")}
        step = [1000 * (b - a) for a, b in zip(marks, marks[1:])]
        return {"total_ms": 1000 * (marks[-1] - marks[0]), "login_ms": step[0],
                "stat_ms": step[1], "list_ms": step[2], "uidl_ms": step[3]}

    # -- 5. a real poll -------------------------------------------------------------------
    def real_poll(self, server: Server) -> Result:
        plan, result = self.plan, Result()
        users = self.groups["poll"]
        initial = len(users) * self.expect["poll"]
        with self.serving(server, "poll", plan.poll_concurrency) as root:
            per_proc = max(1, plan.poll_concurrency // plan.loadgen_procs)
            jobs = [dict(self.job(server, "poll", chunk, duration=plan.poll_seconds),
                         clients=min(per_proc, len(chunk)))
                    for chunk in split(users, plan.loadgen_procs)]
            gens = Loadgens(jobs)
            stop = threading.Event()
            delivered: list[int] = []
            courier = threading.Thread(target=self._deliver, args=(root, users, stop, delivered,
                                                                   gens.t0))
            courier.start()
            cpu = self._server_cpu(server, gens.t0 + plan.warmup, plan.poll_seconds)
            time.sleep(max(0.0, gens.t0 + plan.warmup + plan.poll_seconds - time.time()))
            stop.set()
            courier.join()
            done = gens.finish()
            remaining = sum(len(os.listdir(os.path.join(root, u.name, "Maildir", sub)))
                            for u in users for sub in ("new", "cur"))
        seeds = [s for d in done for s in d.get("seeds", [])]
        latencies = [x for d in done for x in d.get("latencies", [])]
        polls = sum(d.get("polls", 0) for d in done)
        for d in done:
            result.add_errors(d)
            result.loadgen_cpu.append(round(d["cpu_pct"], 1))
        unique = len(set(seeds))
        lost = initial + len(delivered) - unique - remaining
        if lost:
            result.errors["lost or extra messages"] += abs(lost)
        if len(seeds) != unique:
            result.errors["retrieved twice"] += len(seeds) - unique
        result.figures = {
            "polls_s": polls / plan.poll_seconds,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "sweep_s": len(users) * plan.poll_seconds / polls if polls else float("nan"),
            "cpu_ms": 1000 * cpu.join() / polls if polls else float("nan"),
            "errors": sum(result.errors.values()),
        }
        result.notes.append(f"{initial} messages at start, {len(delivered)} delivered during "
                            f"the run, {len(seeds)} retrieved and deleted, {remaining} left")
        return self.check_loadgen(result)

    def _deliver(self, root: str, users: list[User], stop: threading.Event,
                 delivered: list[int], t0: float) -> None:
        """New mail arriving during the poll, at a steady rate, for random users."""
        rng = random.Random(len(delivered) + int(t0))
        interval = 1.0 / self.plan.delivery_rate
        next_at = t0
        while not stop.is_set():
            next_at += interval
            if stop.wait(max(0.0, next_at - time.time())):
                break
            who = rng.choice(users)
            seed = self.seeds.take()
            mailgen.deliver(os.path.join(root, who.name, "Maildir"), seed,
                            rng.randint(2 * KIB, 40 * KIB))
            delivered.append(seed)

    # -- helpers --------------------------------------------------------------------------
    def _server_cpu(self, server: Server, start: float, seconds: float) -> "_CpuProbe":
        return _CpuProbe(server.root_pid, start, seconds)

    @staticmethod
    def check_loadgen(result: Result) -> Result:
        """A note when a load generator was near a full core: the client may be the limit."""
        if result.loadgen_cpu and max(result.loadgen_cpu) > LOADGEN_PEGGED:
            result.notes.append(f"load generator near saturation ({max(result.loadgen_cpu)}% of "
                                f"a core in one process): the figure may be the client's limit")
        return result


class _CpuProbe:
    """Server CPU seconds over [start, start + seconds], sampled from a thread."""

    def __init__(self, root: int, start: float, seconds: float):
        self.value = float("nan")
        self._thread = threading.Thread(target=self._run, args=(root, start, seconds))
        self._thread.start()

    def _run(self, root: int, start: float, seconds: float) -> None:
        time.sleep(max(0.0, start - time.time()))
        first = tree_cpu_seconds(root)
        time.sleep(max(0.0, start + seconds - time.time()))
        self.value = tree_cpu_seconds(root) - first

    def join(self) -> float:
        self._thread.join()
        return self.value
