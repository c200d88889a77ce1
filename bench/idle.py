"""Scenario 3, idle sessions: log N users in, keep them NOOPing, measure what they cost.

Small levels (1,000, 2,000) run against both servers; a level too big for Dovecot on this
machine (100,000: about 535-650 KiB PSS per Dovecot session) runs against iupop3 alone, and
Dovecot's cell shows its per-session figure from the smaller levels and why it was not run.
bench/fleet.py sizes the level (load generators, source addresses, workers, NOOP pace) and
checks the machine's limits first, so an impossible level fails at once and says why.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time

from bench import fleet
from bench.mailgen import User
from bench.pop3client import Client, Pop3Error
from bench.scenarios import KIB, Loadgens, Result, percentile, split
from bench.servers import Server, settle, tree_cpu_ns_running, tree_memory

LOGINS_IN_FLIGHT = 32   # per load generator: logins are paced, not fired all at once
STALL_SECONDS = 60.0    # a ramp in which no login settles for this long gives up
# Dovecot's PSS per idle session measured on these machines (FACTS.md, README): the low end,
# so a level is only left out when even the kindest figure would not fit.
DOVECOT_PSS_PRIOR_KIB = 535
MEMORY_SHARE = 0.8      # of MemTotal a level may take, with the load generators beside it
SERVER_BACKLOG = 1024   # iupop3's listen backlog (supervisor/listeners.py)
PROBE_INTERVAL = 0.2    # seconds between the probe session's NOOPs


def dovecot_skip_reason(level: int, mem_total_kib: int | None,
                        per_session_kib: float = DOVECOT_PSS_PRIOR_KIB) -> str:
    """Why Dovecot does not run LEVEL idle sessions here ("" when it fits in memory)."""
    if not mem_total_kib:
        return ""
    need = level * per_session_kib
    if need <= mem_total_kib * MEMORY_SHARE:
        return ""
    return (f"not run: ~{per_session_kib:.0f} KiB × {level:,} ≈ {need / KIB / KIB:.0f} GiB "
            f"> {mem_total_kib / KIB / KIB:.0f} GiB of memory")


def project_skipped(runs: dict, mem_total_kib: int | None) -> None:
    """Fill Dovecot's cell of each idle level it skipped with its PSS per session measured
    at the smaller levels (median), and the reason with that figure."""
    levels = runs.get("idle", {})
    measured = [run["figures"]["pss_kib"] for run in
                (by.get("dovecot") for by in levels.values())
                if run and not run.get("skipped") and run["figures"].get("pss_kib")]
    for variant, by_server in levels.items():
        run = by_server.get("dovecot")
        if not run or not run.get("skipped"):
            continue
        level = int(variant)
        if measured:
            per = statistics.median(measured)
            run["figures"]["pss_kib"] = per
            reason = dovecot_skip_reason(level, mem_total_kib, per) or run["skipped"]
            run["notes"] = [f"{reason}; PSS per session {per:.0f} KiB measured at the smaller "
                            "levels of this run"]
        else:
            run["notes"] = [run["skipped"] + f" (PSS per session {DOVECOT_PSS_PRIOR_KIB} KiB "
                            "from earlier runs: no smaller level ran this time)"]


class NoopProbe:
    """One more session, NOOPing every PROBE_INTERVAL from a thread of this (mostly idle)
    process while the level is held: when its p99 is low and the fleet's high, the delay is
    in the busy load generators (or the machine), not in the server."""

    def __init__(self, port: int, user: User):
        self.latencies: list[float] = []
        self.error = ""
        self.holding = threading.Event()  # NOOPs count from here on (they start at once:
        self._stop = threading.Event()    # a ramp of minutes must not time the session out)
        self._client = Client("127.0.0.1", port, timeout=30)
        self._client.greeting()
        self._client.login(user.name, user.password)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PROBE_INTERVAL):
            started = time.perf_counter()
            try:
                self._client.noop()
            except Pop3Error as exc:
                self.error = str(exc)
                return
            if self.holding.is_set():
                self.latencies.append(1000 * (time.perf_counter() - started))

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()
        return self.latencies


def idle_sessions(bench, server: Server, count: int) -> Result:
    """COUNT sessions logged in, held and NOOPing; figures per bench/README.md."""
    plan, result = bench.plan, Result()
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = fleet.read_limits(fd_limit)
    procs = fleet.loadgen_processes(count, plan.loadgen_procs, fd_limit)
    spread = fleet.spread(count, procs, fleet.ports_per_address(limits.port_low,
                                                                limits.port_high))
    problems, notes = fleet.check_limits(limits, count, spread, LOGINS_IN_FLIGHT * procs,
                                         SERVER_BACKLOG)
    if problems:
        raise RuntimeError("this machine cannot hold the level: " + "; ".join(problems))
    interval = fleet.noop_interval_for(count, plan.noop_interval, plan.noop_rate_budget)
    hold = fleet.hold_seconds(plan.idle_hold, interval)
    ramp_timeout = 60.0 + count / 50
    users = bench.groups["idle"][:count]
    probe_user = bench.groups["idle"][-1]  # the group has one user more than the largest level
    with bench.serving(server, "idle", count + 1, users=users + [probe_user]):
        settle(server, 30.0 + 2 * server.expected_processes())
        probe = NoopProbe(server.port, probe_user)
        probe.start()
        before = tree_memory(server.root_pid)
        jobs = [bench.job(server, "idle", chunk, noop_interval=interval, reply_timeout=30.0,
                          login_concurrency=LOGINS_IN_FLIGHT, ramp_timeout=ramp_timeout,
                          stall_timeout=STALL_SECONDS, sources=list(sources))
                for chunk, sources in zip(split(users, procs), spread.sources)]
        gens = Loadgens(jobs, timeout=ramp_timeout + 120)
        ramped = gens.expect_all("ramped")
        gens.send({"hold": True})
        load_at_hold = os.getloadavg()[0]
        probe.holding.set()
        cpu0 = tree_cpu_ns_running(server.root_pid)
        time.sleep(hold)
        after = tree_memory(server.root_pid)
        hold_cpu = (tree_cpu_ns_running(server.root_pid) - cpu0) / 1e9
        probe_ms = probe.stop()
        gens.send({"stop": True})
        done = gens.finish()
        # let the workers finish closing the sessions before the stop: at 100,000 all 26 were
        # still busy after -grace 2 and were killed, which the step counted as log errors
        settle(server, 30.0 + 2 * server.expected_processes())
    held = sum(d["held"] for d in done)
    for d in done:
        result.add_errors(d)
        result.loadgen_cpu.append(round(d["ramp_cpu_pct"], 1))
    result.figures = _figures(done, before, after, held, interval, hold, hold_cpu, server)
    result.figures["ramp_s"] = max(r["ramp_s"] for r in ramped)
    result.figures["probe_noop_p99_ms"] = percentile(probe_ms, 99)
    if probe.error:
        result.errors["probe session"] += 1
        result.examples.setdefault("probe session", probe.error)
    if hasattr(server, "workers_started"):
        result.figures["workers"] = server.workers_started
    result.notes += _notes(done, before, count, held, interval, plan.noop_interval, notes)
    result.notes += [f"gave up: {r['gave_up']}" for r in ramped if r.get("gave_up")][:1]
    result.notes.append(f"load average {load_at_hold:.1f} when the hold began, "
                        f"{os.getloadavg()[0]:.1f} after it, on {os.cpu_count()} CPUs")
    return bench.check_loadgen(result)


def _figures(done: list[dict], before, after, held: int, interval: float, hold: float,
             hold_cpu: float, server: Server) -> dict:
    per = max(held, 1)
    held_ms = [ms for d in done for ms in d.get("noop_ms", [])]
    noops = sum(d.get("hold_noops", 0) for d in done)
    return {
        "held": held,
        "pss_kib": (after.pss_kib - before.pss_kib) / per,
        "rss_kib": (after.rss_kib - before.rss_kib) / per,
        "total_pss_mib": after.pss_kib / KIB,
        "processes": after.processes,
        "noop_p50_ms": percentile(held_ms, 50),
        "noop_p99_ms": percentile(held_ms, 99),
        "ramp_noop_p99_ms": percentile([ms for d in done for ms in d.get("ramp_noop_ms", [])],
                                       99),
        "noop_interval_s": interval,
        "hold_s": hold,
        "hold_cpu_pct": 100 * hold_cpu / hold,
        "hold_noops_s": noops / hold,
        "cpu_us_per_noop": 1e6 * hold_cpu / noops if noops else float("nan"),
        "hold_loadgen_cpu_pct": sum(d.get("cpu_pct", 0.0) for d in done),
        "errors": sum(sum(d.get("errors", {}).values()) for d in done),
    }


def _notes(done: list[dict], before, count: int, held: int, interval: float,
           base_interval: float, sizing: list[str]) -> list[str]:
    notes = [f"baseline {before.pss_kib / KIB:.1f} MiB PSS in {before.processes} processes; "
             f"NOOPs sent: {sum(d['noops'] for d in done)}", *sizing]
    if not math.isclose(interval, base_interval):
        notes.append(f"NOOP every {interval:.0f} s instead of {base_interval:.0f} s: "
                     f"{count:,} sessions every {base_interval:.0f} s would be "
                     f"{count / base_interval:,.0f} NOOPs/s, above the "
                     f"{fleet.NOOP_RATE_BUDGET:,.0f}/s two shared cores give server and load "
                     "generators")
    if held < count:
        notes.append(f"only {held} of {count} sessions held")
    return notes
