"""Where an iupop3 worker spends its time under the login storm and bulk RETR (py-spy).

``python3 bench/run.py --profile`` samples one worker with ``py-spy record`` while the load
runs and prints the top functions by own time (% of samples) and by time including callees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

from bench.scenarios import Bench
from bench.servers import Iupop3

RATE = 200  # samples per second


def ensure_pyspy() -> str:
    """py-spy from the venv, installed into it with pip when missing."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(local):
        return local
    found = shutil.which("py-spy")
    if found:
        return found
    print("bench: installing py-spy into the venv ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return local


class PySpy:
    """``py-spy record`` of one pid over [start, start + seconds], run from a thread."""

    def __init__(self, exe: str, pid: int, start: float, seconds: float, out: str):
        self.out = out
        self.error = ""
        self._thread = threading.Thread(target=self._run, args=(exe, pid, start, seconds))
        self._thread.start()

    def _run(self, exe: str, pid: int, start: float, seconds: float) -> None:
        time.sleep(max(0.0, start - time.time()))
        argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                "--rate", str(RATE), "--function", "--nonblocking", "--format", "raw",
                "--output", self.out]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            self.error = (done.stderr or done.stdout).strip()[-500:]

    def join(self) -> None:
        self._thread.join()


# py-spy's idle detection does not see these waits (the libev loop in epoll, gevent's
# thread-pool threads parked on a lock), so samples ending in them are counted as waiting.
WAITS = ("Hub.run (gevent/hub.py", "acquire_with_timeout (gevent/_threading.py",
         "_Condition.wait (gevent/_threading.py")


def hot_spots(raw_path: str, top: int = 10) -> dict:
    """Own and inclusive shares of the busy samples per function (py-spy collapsed stacks)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = [f for f in stack.split(";") if f]
            if not frames:
                continue
            if frames[-1].startswith(WAITS):
                waiting += n
                continue
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n

    def share(counter: Counter) -> list[list]:
        return [[name, round(100 * n / max(total, 1), 1)]
                for name, n in counter.most_common(top)]

    return {"busy_samples": total, "waiting_samples": waiting, "own": share(own),
            "inclusive": share(inclusive)}


def run_profile(bench: Bench, server: Iupop3, out_dir: str, stamp: str) -> int:
    exe = ensure_pyspy()
    os.makedirs(out_dir, exist_ok=True)
    plan = bench.plan
    plan.storm_seconds = max(plan.storm_seconds, 10.0)
    plan.retr_seconds = max(plan.retr_seconds, 10.0)
    report: dict = {}
    spies: list[PySpy] = []
    for key, label, run in (("storm", "login storm c=32", lambda: bench.login_storm(server, 32)),
                            ("retr", "bulk RETR c=4", lambda: bench.bulk_retr(server, 4))):
        raw = os.path.join(out_dir, f"profile-{stamp}-{key}.txt")

        def probe(srv, start, seconds, raw=raw):
            pid = srv.worker_pids()[0]
            spies.append(PySpy(exe, pid, start, seconds, raw))
            return spies[-1]

        bench.probe = probe
        result = run()
        bench.probe = None
        spy = spies[-1]
        if spy.error or not os.path.exists(raw):
            print(f"{label}: py-spy failed: {spy.error}")
            continue
        spots = hot_spots(raw)
        report[key] = {"label": label, "figures": result.figures,
                       "errors": dict(result.errors), **spots}
        figures = {k: round(v, 2) for k, v in result.figures.items()}
        print(f"\n{label} (while profiled: {json.dumps(figures)})")
        print(f"  one worker sampled at {RATE}/s: {spots['busy_samples']} busy samples "
              f"({spots['waiting_samples']} waiting, left out); top functions by own time, "
              f"% of busy samples:")
        for name, pct in spots["own"]:
            print(f"    {pct:5.1f}%  {name}")
        print("  top functions including callees:")
        for name, pct in spots["inclusive"]:
            print(f"    {pct:5.1f}%  {name}")
    path = os.path.join(out_dir, f"profile-{stamp}.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"\nprofile: {path}")
    return 0
