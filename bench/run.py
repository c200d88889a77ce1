"""Benchmark iupop3 against a private Dovecot: ``python3 bench/run.py [--quick|--full]``.

Sets up everything it needs (test mail, users, Dovecot's config; installs dovecot-pop3d when
root and missing), runs each scenario against each server in turn, alternating which goes
first, and writes a table, bench/results/bench-STAMP.json and a PNG chart of the ratios.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(PROJECT, ".venv", "bin", "python")


def _reexec_in_venv() -> None:
    """The load generator needs gevent: run under the project's venv when it is not ours."""
    try:
        import gevent  # noqa: F401
    except ImportError:
        if os.path.exists(VENV_PYTHON) and os.path.realpath(sys.executable) != os.path.realpath(
                VENV_PYTHON):
            os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__), *sys.argv[1:]])
        sys.exit("bench: gevent is missing; create the venv first (see README.md)")


if __name__ == "__main__":
    _reexec_in_venv()
    sys.path.insert(0, PROJECT)

from bench import fleet, report  # noqa: E402
from bench.idle import dovecot_skip_reason, idle_sessions, project_skipped  # noqa: E402
from bench.scenarios import Bench, Plan, Result  # noqa: E402
from bench.servers import DOVECOT, Dovecot, Iupop3, Server, ensure_dovecot  # noqa: E402
from bench import mailgen  # noqa: E402

SCENARIOS = ("storm", "retr", "idle", "big", "poll")
MAIL_OWNER = (65534, 65534)  # nobody:nogroup; Dovecot will not serve mail as root


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="~1-minute smoke run")
    size.add_argument("--full", action="store_true",
                      help="every row of issue 15's table: also 10,000 idle sessions against "
                           "both servers and 100,000 against iupop3 alone (~20 minutes)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run (default: all: "
                             f"{','.join(SCENARIOS)})")
    parser.add_argument("--no-dovecot", action="store_true", help="benchmark iupop3 alone")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install dovecot-pop3d when it is missing")
    parser.add_argument("--dovecot-reuse", action="store_true",
                        help="let Dovecot's pop3 processes serve many sessions in turn "
                             "(service_count = 0) instead of one process per session")
    parser.add_argument("--idle", default="",
                        help="idle session counts, e.g. 1000,10000 (overrides the plan)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every step this many times (alternating which server goes "
                             "first) and report medians: steadier figures on a busy machine")
    parser.add_argument("--workers", type=int, default=2, help="iupop3 worker processes")
    parser.add_argument("--loadgen-procs", type=int, default=2,
                        help="load-generator processes for concurrent scenarios")
    parser.add_argument("--workdir", default="/tmp/iupop3-bench",
                        help="scratch folder for mail, configs and logs (emptied first)")
    parser.add_argument("--out", default=os.path.join(PROJECT, "bench", "results"),
                        help="folder for the JSON and PNG results")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the comparison, run py-spy on an iupop3 worker under "
                             "the login storm and bulk RETR and print the hot spots")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan.full() if args.full else Plan()
    plan.loadgen_procs = max(1, args.loadgen_procs)
    if args.idle:
        plan.idle_levels = tuple(int(x) for x in args.idle.split(","))
    return plan


def raise_fd_limit() -> int:
    """Servers and load generators inherit this; 10,000 sessions need the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def steps(bench: Bench, only: list[str]) -> list[tuple]:
    """(scenario, variants, run(server) -> {variant: Result}, skip(server) -> reason or "")
    in the order they run."""
    plan = bench.plan
    out: list[tuple] = []
    if "storm" in only:
        for c in plan.storm_concurrency:
            out.append(("storm", [f"c={c}"],
                        lambda s, c=c: {f"c={c}": bench.login_storm(s, c)}))
    if "retr" in only:
        for c in plan.retr_concurrency:
            out.append(("retr", [f"c={c}"], lambda s, c=c: {f"c={c}": bench.bulk_retr(s, c)}))
    if "idle" in only:
        memory = fleet.mem_total_kib()
        for n in sorted(plan.idle_levels):
            out.append(("idle", [f"{n}"], lambda s, n=n: {f"{n}": idle_sessions(bench, s, n)},
                        lambda s, n=n: dovecot_skip_reason(n, memory) if s.name == "dovecot"
                        else ""))
    if "big" in only:
        out.append(("big", ["first", "warm", "restart"], bench.big_mailbox))
    if "poll" in only:
        out.append(("poll", [f"{plan.poll_users} users"],
                    lambda s: {f"{plan.poll_users} users": bench.real_poll(s)}))
    return [step if len(step) == 4 else (*step, lambda s: "") for step in out]


def summary(scenario: str, result: Result) -> str:
    f = result.figures
    keys = {"storm": ("rate", "p99_ms"), "retr": ("mb_s",),
            "idle": ("held", "pss_kib", "noop_p99_ms", "ramp_s"),
            "big": ("total_ms",), "poll": ("polls_s", "p99_ms")}[scenario]
    text = " ".join(f"{k}={report.fmt(f.get(k))}" for k in keys)
    errors = sum(result.errors.values())
    cpu = "/".join(f"{c:.0f}" for c in result.loadgen_cpu)
    return f"{text} errors={errors}" + (f" loadgen_cpu={cpu}%" if cpu else "")


def run_all(bench: Bench, servers: list[Server], only: list[str], rounds: int) -> dict:
    """Every step against every server, ROUNDS times; who goes first alternates each time."""
    collected: dict = {}
    plan = steps(bench, only)
    skipped: dict = {}
    for round_no in range(rounds):
        for index, (scenario, variants, run, skip) in enumerate(plan):
            order = servers if (index + round_no) % 2 == 0 else servers[::-1]
            for server in order:
                reason = skip(server)
                if reason:
                    for variant in variants:
                        skipped.setdefault(scenario, {}).setdefault(variant, {})[
                            server.name] = reason
                    print(f"  {scenario:5} {', '.join(variants):9} {server.name:8} {reason}",
                          flush=True)
                    continue
                started = time.time()
                log_mark = server.log_size()
                try:
                    results = run(server)
                except Exception as exc:  # a broken run is shown, never dropped
                    traceback.print_exc()
                    results = {v: Result(errors=Counter({"run failed": 1}),
                                         notes=[f"run failed: {exc}"]
                                         + server.log_tail(5).splitlines())
                               for v in variants}
                logged = server.log_errors(log_mark)
                for variant, result in results.items():
                    if logged:
                        result.errors["server log error lines"] += len(logged)
                        result.examples.setdefault("server log error lines", logged[0][:200])
                    collected.setdefault(scenario, {}).setdefault(variant, {}) \
                        .setdefault(server.name, []).append(result)
                    print(f"  {scenario:5} {variant:9} {server.name:8} "
                          f"{summary(scenario, result)}  ({time.time() - started:.0f}s)",
                          flush=True)
    runs = {scenario: {variant: {name: merge(results) for name, results in by_server.items()}
                       for variant, by_server in variants.items()}
            for scenario, variants in collected.items()}
    for scenario, variants in skipped.items():
        for variant, by_server in variants.items():
            for name, reason in by_server.items():
                runs.setdefault(scenario, {}).setdefault(variant, {})[name] = {
                    "figures": {}, "errors": {}, "error_examples": {}, "loadgen_cpu_pct": [],
                    "notes": [reason], "skipped": reason}
    project_skipped(runs, fleet.mem_total_kib())
    return runs


def merge(results: list[Result]) -> dict:
    """One run's dict from several rounds: the median of each figure, errors added up."""
    if len(results) == 1:
        return results[0].as_dict()
    merged = Result()
    for key in results[0].figures:
        values = [r.figures[key] for r in results if not math.isnan(r.figures.get(key, math.nan))]
        merged.figures[key] = statistics.median(values) if values else math.nan
    for number, result in enumerate(results, 1):
        merged.errors.update(result.errors)
        for kind, text in result.examples.items():
            merged.examples.setdefault(kind, text)
        merged.loadgen_cpu.extend(result.loadgen_cpu)
        merged.notes.extend(f"round {number}: {note}" for note in result.notes)
    merged.figures["errors"] = sum(merged.errors.values())
    document = merged.as_dict()
    document["rounds"] = [r.figures for r in results]
    document["notes"].insert(0, f"median of {len(results)} rounds")
    return document


def machine_info() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load],
            "kernel": platform.release(), "python": platform.python_version()}


def dovecot_version() -> str:
    try:
        return subprocess.run([DOVECOT, "--version"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def iupop3_version() -> str:
    try:
        from shared.version import VERSION
    except ImportError:
        return ""
    return VERSION


def write_results(out: str, document: dict) -> None:
    """The JSON and, beside it, the chart."""
    path = report.json_path(out, document["stamp"])
    report.write_json(path, document)
    print(f"\nresults: {path}")
    who = "iupop3 / Dovecot" if "dovecot" in document["compared"] else "iupop3 alone"
    title = (f"{who}, {document['mode']} run {document['stamp']} on "
             f"{os.cpu_count()} CPUs (load average {document['load_average_at_start']:.1f} at "
             f"start, {os.getloadavg()[0]:.1f} at end)")
    print(report.write_chart(path[:-5] + ".png", document["rows"], title))


def choose_peer(args: argparse.Namespace) -> tuple[bool, str, tuple[int, int] | None]:
    """(run Dovecot?, what to say about it, the owner its mail copy needs)."""
    if args.no_dovecot or args.profile:
        return False, "not requested (--no-dovecot)", None
    problem = ensure_dovecot(allow_install=not args.no_install)
    if problem:
        print(f"bench: {problem}\nbench: running iupop3 alone.", flush=True)
        return False, problem, None
    if os.geteuid() != 0:
        print("bench: Dovecot needs root here (mail owned by nobody); running iupop3 alone.")
        return False, "not root: Dovecot needs the mail owned by nobody", None
    return True, dovecot_version(), MAIL_OWNER


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    began = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan = make_plan(args)
    limits = fleet.read_limits(raise_fd_limit())
    print(f"bench: descriptor limit {limits.fd_limit} per process; ports "
          f"{limits.port_low}-{limits.port_high} per source address; somaxconn "
          f"{limits.somaxconn}; fs.file-max {limits.file_max}; nf_conntrack_max "
          f"{limits.conntrack_max}", flush=True)
    subprocess.run(["rm", "-rf", "--one-file-system", args.workdir], check=False)
    os.makedirs(args.workdir)
    os.chmod(args.workdir, 0o755)  # Dovecot's mail processes run as nobody
    use_dovecot, peer_note, owner = choose_peer(args)
    bench = Bench(args.workdir, plan, owner)
    print(f"bench: preparing mail in {args.workdir} ...", flush=True)
    took = bench.prepare_mail()
    users = bench.all_users()
    print(f"bench: {len(users)} users, {bench.seeds.next - 1} messages in {took:.1f}s",
          flush=True)
    users_file = os.path.join(args.workdir, "iupop3.users")
    mailgen.write_iupop3_users(users_file, users)
    servers: list[Server] = [Iupop3(os.path.join(args.workdir, "iupop3"), users_file,
                                    args.workers)]
    if use_dovecot:
        servers.append(Dovecot(os.path.join(args.workdir, "dovecot"), users, *MAIL_OWNER,
                               reuse=args.dovecot_reuse))

    if args.profile:
        from bench.profile import run_profile

        return run_profile(bench, servers[0], args.out, stamp)

    load_at_start = os.getloadavg()[0]
    mode = "quick" if args.quick else "full" if args.full else "default"
    print(f"bench: {mode} run of {', '.join(args.only)} against "
          f"{' and '.join(s.name for s in servers)}; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    runs = run_all(bench, servers, args.only, max(1, args.rounds))
    names = [s.name for s in servers]
    rows = report.build_rows(runs, names)
    print()
    print(report.table(rows, runs, names))
    document = {"stamp": stamp, "mode": mode, "rounds": args.rounds,
                "seconds": round(time.time() - began, 1),
                "machine": machine_info(), "load_average_at_start": load_at_start,
                "limits": fleet.describe(limits),
                "plan": vars(plan),
                "servers": {"iupop3": {"version": iupop3_version(), "workers": args.workers},
                            "dovecot": {"version": peer_note, "reuse": args.dovecot_reuse}},
                "compared": names, "rows": rows, "runs": runs}
    write_results(args.out, document)
    print(f"bench: done in {time.time() - began:.0f}s")
    # The mail goes (it can be hundreds of MB); configs and server logs stay for a look.
    subprocess.run(["rm", "-rf", "--one-file-system", bench.master,
                    os.path.join(args.workdir, "serve")], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
