"""The XTND STATS report: exact layout, figures gathered from a real shared statistics area."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from shared import statsreport
from shared.stats import USERS_PER_SLOT, Counter, Header, StatsArea

README_TOTALS = {
    Counter.CURRENT: 2, Counter.TOTAL: 218, Counter.MAX_CONCURRENT: 8, Counter.REFUSED: 0,
    Counter.NORMAL: 215, Counter.ABNORMAL: 2, Counter.TIMEOUTS: 1, Counter.BLOCKED: 3,
    Counter.RETR_MESSAGES: 127, Counter.RETR_OCTETS: 52451, Counter.RETR_MIN: 265,
    Counter.RETR_MAX: 1029, Counter.AUTH_FAILURES: 6,
}


def _local(*fields: int) -> float:
    return time.mktime((*fields, 0, 0, -1))


def test_render_matches_the_readme_example_line_for_line():
    """The figures of the IUPOP3 1.8 README's example render with aligned colons, users numbered."""
    figures = statsreport.Figures(
        version="2.0", level="thread", now=_local(1992, 2, 13, 17, 44, 11),
        start=_local(1992, 2, 13, 7, 32, 53), cpu_seconds=113.8, totals=README_TOTALS,
        users=("levanon", "hughes"))
    assert statsreport.render(figures) == [
        "Version Number       : 2.0",
        "Logging Level        : THREAD",
        "Current Time         : 1992-02-13 17:44:11",
        "Start Time           : 1992-02-13 07:32:53",
        "CPU Seconds          : 113.80 (1 mins, 53 secs)",
        "Current Threads      : 2",
        "Total Threads        : 218",
        "Max Threads          : 8",
        "Too Many Threads     : 0",
        "Normal Disconnects   : 215",
        "Abnormal Disconnects : 2",
        "Client Timeouts      : 1",
        "Blocked Socket Count : 3",
        "Retrieved Messages   : 127",
        "Retrieved Octets     : 52451",
        "Average Octets       : 413",
        "Minimum Octets       : 265",
        "Maximum Octets       : 1029",
        "Auth Failures        : 6",
        "Current Users        : 2",
        "                       0. hughes",
        "                       1. levanon",
    ]


def test_render_with_nothing_retrieved_and_nobody_logged_in():
    """No retrievals gives an average of 0 (no division by zero); no users, no user lines."""
    figures = statsreport.Figures("2.0", "ERROR", time.time(), time.time(), 0.0, {}, ())
    lines = statsreport.render(figures)
    assert "Average Octets       : 0" in lines
    assert lines[-1] == "Current Users        : 0"
    assert len(lines) == len(statsreport.FIELDS)


def test_cpu_text_is_iupop3s_form():
    """CPU seconds read like the README: two decimals, then whole minutes and seconds."""
    assert statsreport.cpu_text(113.8) == "113.80 (1 mins, 53 secs)"
    assert statsreport.cpu_text(0) == "0.00 (0 mins, 0 secs)"
    assert statsreport.cpu_text(3725.5) == "3725.50 (62 mins, 5 secs)"


def test_parse_reads_a_rendered_report_back():
    """The admin client's parser recovers every value and the user list from the text."""
    figures = statsreport.Figures("2.0", "DEBUG", time.time(), time.time(), 1.5, README_TOTALS,
                                  ("b", "a"))
    values, users = statsreport.parse(statsreport.render(figures))
    assert values["Retrieved Octets"] == "52451"
    assert values["CPU Seconds"] == "1.50 (0 mins, 1 secs)"
    assert values["Current Users"] == "2"
    assert users == ["a", "b"]
    assert set(values) == {name for name, _ in statsreport.FIELDS}


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def test_collect_sums_every_slot_and_counts_only_the_servers_processes():
    """Counters are summed over slots (minimum of minimums), users gathered, CPU from /proc."""
    area = StatsArea.create(4, int(_local(2026, 1, 2, 3, 4, 5)))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        area.set(0, Counter.PID, os.getpid())        # this test plays the supervisor
        area.set(1, Counter.PID, child.pid)          # a child of the "supervisor": counted
        area.set(2, Counter.PID, 1)                  # a reused pid, not our child: ignored
        area.set(0, Counter.CPU_EXITED_US, 2_500_000)
        area.set(0, Counter.MAX_CONCURRENT, 7)
        for slot, (total, messages, octets, low, high) in {
                1: (5, 2, 300, 100, 200), 2: (3, 1, 50, 50, 50), 3: (1, 0, 0, 0, 0)}.items():
            area.set(slot, Counter.TOTAL, total)
            area.set(slot, Counter.RETR_MESSAGES, messages)
            area.set(slot, Counter.RETR_OCTETS, octets)
            area.set(slot, Counter.RETR_MIN, low)
            area.set(slot, Counter.RETR_MAX, high)
        area.set_user(1, 0, "carol")
        area.set_user(2, 5, "alice")
        tick = os.sysconf("SC_CLK_TCK")
        before = (_ticks(os.getpid()) + _ticks(child.pid)) / tick
        figures = statsreport.collect(area, "2.0", "INFO", now=_local(2026, 1, 2, 3, 5, 0))
        after = (_ticks(os.getpid()) + _ticks(child.pid)) / tick
    finally:
        child.kill()
        child.wait()
    assert area.get_header(Header.START_TIME) == figures.start
    assert 2.5 + before <= figures.cpu_seconds <= 2.5 + after
    values, users = statsreport.parse(statsreport.render(figures))
    assert values["Total Threads"] == "9"
    assert values["Max Threads"] == "7"
    assert values["Retrieved Messages"] == "3"
    assert values["Retrieved Octets"] == "350"
    assert values["Average Octets"] == "116"
    assert values["Minimum Octets"] == "50"
    assert values["Maximum Octets"] == "200"
    assert values["Start Time"] == "2026-01-02 03:04:05"
    assert values["Current Time"] == "2026-01-02 03:05:00"
    assert values["Logging Level"] == "INFO"
    assert users == ["alice", "carol"]
    area.close()


def test_current_users_scan_costs_per_user_not_per_entry():
    """users() finds names in any entry of any slot (a cleared one is not shown), and the Python
    lines it runs grow with the slots and the users, not with the 16384 entries per slot:
    XTND STATS runs it on a worker's event loop, where the per-entry loop took 270 ms with
    8 workers. Counted with a line tracer, so no machine's speed matters."""
    area = StatsArea.create(17, 0)  # 8 workers: supervisor, 8 slots, 8 spares
    try:
        area.set_user(1, 0, "carol")
        area.set_user(8, 7, "alice")
        area.set_user(8, 8, "gone")
        area.set_user(8, 8, "")
        area.set_user(16, USERS_PER_SLOT - 1, "zed")
        lines = 0

        def tracer(frame, event, arg):
            nonlocal lines
            if frame.f_code is StatsArea.users.__code__:
                if event == "line":
                    lines += 1
                return tracer
            return None

        sys.settrace(tracer)
        try:
            names = area.users()
        finally:
            sys.settrace(None)
        assert sorted(names) == ["alice", "carol", "zed"]
        assert lines < 10 * area.nslots + 10 * len(names), lines  # per entry: over 800,000
    finally:
        area.close()
