"""The XTND STATS report: figures gathered from the shared statistics area, rendered as text.

``collect`` reads a ``StatsArea`` (and /proc for the CPU time of live processes); ``render`` is a
pure function of the figures, so the exact layout is unit-tested. The worker's XTND handler sends
``+OK Statistics follow``, the rendered lines, then ``.``; the admin client parses them back with
``parse``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from shared.stats import Counter, Header, StatsArea

HEADER = "+OK Statistics follow"
# (line name, counter) in the IUPOP3 1.8 README's order; None = computed, not a counter.
FIELDS: tuple[tuple[str, Counter | None], ...] = (
    ("Version Number", None),
    ("Logging Level", None),
    ("Current Time", None),
    ("Start Time", None),
    ("CPU Seconds", None),
    ("Current Threads", Counter.CURRENT),
    ("Total Threads", Counter.TOTAL),
    ("Max Threads", Counter.MAX_CONCURRENT),
    ("Too Many Threads", Counter.REFUSED),
    ("Normal Disconnects", Counter.NORMAL),
    ("Abnormal Disconnects", Counter.ABNORMAL),
    ("Client Timeouts", Counter.TIMEOUTS),
    ("Blocked Socket Count", Counter.BLOCKED),
    ("Retrieved Messages", Counter.RETR_MESSAGES),
    ("Retrieved Octets", Counter.RETR_OCTETS),
    ("Average Octets", None),
    ("Minimum Octets", Counter.RETR_MIN),
    ("Maximum Octets", Counter.RETR_MAX),
    ("Auth Failures", Counter.AUTH_FAILURES),
    ("Current Users", None),
)
# Lines added before Current Users only while non-zero (not in IUPOP3's report: worker
# slots in trouble, supervisor/workers.py, and what later issues count).
HEALTH_FIELDS: tuple[tuple[str, Counter], ...] = (
    ("Fatal Workers", Counter.FATAL_SLOTS),
    ("Dead Workers", Counter.DEAD_SLOTS),
    ("Hung Workers Killed", Counter.HUNG_KILLED),
    ("Lost Handoffs", Counter.TRUNCATED),
    ("Proxy Refusals", Counter.PROXY_REFUSED),
    ("Takeovers", Counter.TAKEOVERS),
    ("Login Delay Refusals", Counter.LOGIN_DELAYED),
)
NAME_WIDTH = max(len(name) for name, _ in FIELDS)  # the colons line up, as in the README
USER_INDENT = " " * (NAME_WIDTH + 3)              # user lines start under the values
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class Figures:
    """Everything one report shows, as of one moment."""

    version: str
    level: str
    now: float
    start: float
    cpu_seconds: float
    totals: Mapping[Counter, int]
    users: tuple[str, ...]


def line(name: str, value: object) -> str:
    return f"{name:<{NAME_WIDTH}} : {value}"


def cpu_text(seconds: float) -> str:
    """IUPOP3's form: ``113.80 (1 mins, 53 secs)``."""
    whole = int(seconds)
    return f"{seconds:.2f} ({whole // 60} mins, {whole % 60} secs)"


def render(figures: Figures) -> list[str]:
    """The report's lines between ``+OK Statistics follow`` and ``.``.

    Current Users shows how many, then one line per user, numbered from 0 and sorted by name.
    """
    t = figures.totals
    messages = t.get(Counter.RETR_MESSAGES, 0)
    computed = {
        "Version Number": figures.version,
        "Logging Level": figures.level.upper(),
        "Current Time": time.strftime(TIME_FORMAT, time.localtime(figures.now)),
        "Start Time": time.strftime(TIME_FORMAT, time.localtime(figures.start)),
        "CPU Seconds": cpu_text(figures.cpu_seconds),
        "Average Octets": t.get(Counter.RETR_OCTETS, 0) // messages if messages else 0,
        "Current Users": len(figures.users),
    }
    out = []
    for name, counter in FIELDS:
        if name == "Current Users":
            # Not in IUPOP3's report: shown only while non-zero.
            out.extend(line(name, t[c]) for name, c in HEALTH_FIELDS if t.get(c, 0))
        out.append(line(name, computed[name] if counter is None else t.get(counter, 0)))
    for number, user in enumerate(sorted(figures.users)):
        out.append(f"{USER_INDENT}{number}. {user}")
    return out


def collect(area: StatsArea, version: str, level: str, now: float | None = None) -> Figures:
    """Read the figures of every process of the server from the shared area."""
    return Figures(
        version=version,
        level=level,
        now=time.time() if now is None else now,
        start=area.get_header(Header.START_TIME),
        cpu_seconds=server_cpu_seconds(area),
        totals=area.totals(),
        users=tuple(area.users()),
    )


def server_cpu_seconds(area: StatsArea) -> float:
    """CPU time of the whole server: live processes from /proc, reaped workers from slot 0."""
    ticks = os.sysconf("SC_CLK_TCK")
    supervisor = area.get(0, Counter.PID)
    total_ticks = 0
    for slot in range(area.nslots):
        pid = area.get(slot, Counter.PID)
        if not pid:
            continue
        fields = _proc_stat(pid)
        if fields is None:
            continue  # a worker that exited; the supervisor adds it when it reaps it
        # A dead worker's pid may be reused: count only the supervisor and its children.
        if slot and int(fields[1]) != supervisor:
            continue
        total_ticks += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total_ticks / ticks + area.get(0, Counter.CPU_EXITED_US) / 1e6


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; the name in parentheses may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def parse(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """A report's lines back into (name -> value text, users); for the admin client."""
    values: dict[str, str] = {}
    users: list[str] = []
    for text in lines:
        if text.startswith(USER_INDENT):
            number, _, user = text.strip().partition(". ")
            if number.isdigit() and user:
                users.append(user)
            continue
        name, sep, value = text.partition(" : ")
        if sep:
            values[name.strip()] = value.strip()
    return values, users
