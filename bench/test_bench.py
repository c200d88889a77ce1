"""Unit tests of the benchmark's own checks (run: .venv/bin/pytest bench).

The benchmark is only worth its figures if its reply checks catch wrong replies; these pin the
checker, the message generator, the percentile and the py-spy summary on made-up inputs.
"""

from __future__ import annotations

import socket

import pytest

from bench.fleet import (WORKER_CAPACITY_SHARE, Limits, check_limits, hold_seconds,
                         loadgen_processes, noop_interval_for, port_range, ports_per_address,
                         source_addresses, spread, workers_for)
from bench.idle import dovecot_skip_reason, project_skipped
from bench.mailgen import BLOCK, make_message, seed_of
from bench.pop3client import Client, Pop3Error, check_message, unstuff
from bench.profile import hot_spots
from bench.report import PROJECTED_MARK, build_rows, table, write_chart
from bench.scenarios import percentile, split
from bench.targets import evaluate, issue_rows
from shared.descriptors import session_capacity


def wire(stored: bytes) -> bytes:
    """What a correct server sends for a stored message: CRLF lines, dot-stuffed."""
    crlf = stored.replace(b"\n", b"\r\n")
    stuffed = crlf.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def test_messages_are_deterministic_and_name_their_seed():
    """The same seed and size give the same bytes, and the header names both."""
    one = make_message(42, 5000)
    assert one == make_message(42, 5000)
    assert one != make_message(43, 5000)
    head = one.split(b"\n\n", 1)[0]
    assert seed_of(head) == (42, 5000)
    assert abs(len(one) - 5000) < 200


def test_text_block_exercises_dot_stuffing():
    """The body text has lines starting with '.' and lines that are only '.'."""
    assert b"\n.\n" in BLOCK
    assert BLOCK.count(b"\n.") > 100


def test_check_accepts_a_correct_reply():
    """A correctly stuffed CRLF copy with LIST's size passes and yields the seed."""
    stored = make_message(7, 20000)
    body = wire(stored)
    assert check_message(body, len(stored.replace(b"\n", b"\r\n"))) == 7


def test_check_ignores_headers_the_server_adds():
    """X-POP3-* and X-VMS-From: lines (with continuations) are not counted as changes."""
    stored = make_message(8, 3000)
    head, body = stored.split(b"\n\n", 1)
    served = (b"X-POP3-Server: host\nX-POP3-ID: 123\n\tfolded\nX-VMS-From: A::B\n" + head
              + b"\n\n" + body)
    data = wire(served)
    assert check_message(data, len(unstuff(data))) == 8


def test_check_rejects_a_changed_byte():
    """One changed body byte is a content error even when the size is right."""
    stored = make_message(9, 3000)
    data = bytearray(wire(stored))
    data[-10] = ord("#") if data[-10] != ord("#") else ord("%")
    with pytest.raises(Pop3Error) as caught:
        check_message(bytes(data), len(unstuff(bytes(data))))
    assert caught.value.kind == "content"


def test_check_rejects_a_size_that_differs_from_list():
    """The octets received must equal what LIST said."""
    stored = make_message(10, 3000)
    data = wire(stored)
    with pytest.raises(Pop3Error) as caught:
        check_message(data, len(unstuff(data)) + 1)
    assert caught.value.kind == "size != LIST"


def test_check_rejects_unstuffed_dot_lines():
    """A server that forgets dot-stuffing is caught (the line loses its dot)."""
    stored = b"X-Bench-Seed: 1 10\n\n" + b"..x\n"
    sent = stored.replace(b"\n", b"\r\n")  # not stuffed: the client strips one dot
    with pytest.raises(Pop3Error):
        check_message(sent, len(sent))


def test_unstuff_removes_one_dot_per_line_including_the_first():
    """RFC 1939: '..' at a line start is one '.', also on the first line."""
    assert unstuff(b"..a\r\n...b\r\nc.\r\n") == b".a\r\n..b\r\nc.\r\n"


def test_percentile_is_nearest_rank():
    """p50 of 1..100 is 50 and p99 is 99; no values give NaN."""
    values = [float(x) for x in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) != percentile([], 50)


def test_split_deals_items_round_robin():
    """Users are dealt to load generators evenly and never duplicated."""
    parts = split(list(range(7)), 3)
    assert sorted(x for p in parts for x in p) == list(range(7))
    assert [len(p) for p in parts] == [3, 2, 2]


def test_hot_spots_leave_out_waiting_samples(tmp_path):
    """Samples parked in the libev loop or a pool lock are waiting, not hot spots."""
    raw = tmp_path / "raw.txt"
    raw.write_text("a (x.py:1);b (x.py:2) 30\n"
                   "a (x.py:1);c (x.py:3) 10\n"
                   "Hub.run (gevent/hub.py:631) 50\n"
                   "t (y.py:1);acquire_with_timeout (gevent/_threading.py:34) 10\n")
    spots = hot_spots(str(raw))
    assert spots["busy_samples"] == 40 and spots["waiting_samples"] == 60
    assert spots["own"][0] == ["b (x.py:2)", 75.0]
    assert spots["inclusive"][0] == ["a (x.py:1)", 100.0]


# -- issue 15: sizing the idle levels (bench/fleet.py) ------------------------------------------
def test_port_range_parses_the_proc_file():
    """ip_local_port_range's two numbers; the default range gives 28,232 ports."""
    low, high = port_range("32768\t60999\n")
    assert (low, high) == (32768, 60999)
    assert ports_per_address(low, high) == 28232


def test_spread_gives_each_process_its_own_addresses():
    """Load generators never share a source address, and every address is loopback but .1."""
    layout = spread(100_000, 8, 28232)
    flat = [a for own in layout.sources for a in own]
    assert len(flat) == len(set(flat)) >= 8
    assert all(a.startswith("127.") and a != "127.0.0.1" for a in flat)
    assert flat[:8] == [f"127.0.0.{n}" for n in range(2, 10)]
    assert {len(own) for own in layout.sources} == {1}
    assert layout.per_address == 12_500


def test_spread_adds_addresses_when_the_port_range_is_narrow():
    """With 1,000 ports per address, 100,000 sessions need about 118 addresses, none over."""
    layout = spread(100_000, 8, 1000)
    count = sum(len(own) for own in layout.sources)
    assert count >= 100_000 / (1000 * 0.85)
    assert layout.per_address <= 1000 * 0.85
    assert source_addresses(300)[-1] == "127.0.1.45"


def test_spread_shares_no_address_with_more_processes_than_eight():
    """Twelve processes get twelve or more addresses, each its own."""
    layout = spread(24_000, 12, 28232)
    flat = [a for own in layout.sources for a in own]
    assert len(layout.sources) == 12 and len(flat) == len(set(flat))


def test_loadgen_processes_keep_well_under_the_descriptor_limit():
    """100,000 sessions under a 20,000 limit: 8 processes of 12,500; small levels keep the
    plan's minimum."""
    assert loadgen_processes(100_000, 2, 20_000) == 8
    assert loadgen_processes(1_000, 2, 20_000) == 2
    assert 100_000 / loadgen_processes(100_000, 2, 20_000) < 20_000 * 0.7


def test_workers_follow_the_servers_descriptor_budget():
    """The worker count comes from shared.descriptors: each worker stays under its capacity
    with margin, whatever FDS_PER_SESSION is."""
    capacity = session_capacity(20_000)
    needed = workers_for(100_000, 2, capacity)
    assert 100_000 / needed <= capacity * WORKER_CAPACITY_SHARE
    assert workers_for(100_000, 2, capacity * 2) < needed or needed <= 2
    assert workers_for(300, 2, capacity) == 2


def test_workers_for_refuses_a_worker_without_capacity():
    """A descriptor budget that holds no session is an error, not a division by zero."""
    with pytest.raises(ValueError):
        workers_for(10, 1, 0)


def test_noop_interval_lengthens_only_above_the_budget():
    """Small levels NOOP every 5 s; 100,000 sessions are paced to the NOOP budget, and the
    hold lasts at least two intervals."""
    assert noop_interval_for(20_000, 5.0, 4000) == 5.0
    assert noop_interval_for(100_000, 5.0, 4000) == 25.0
    assert hold_seconds(12.0, 5.0) == 12.0
    assert hold_seconds(12.0, 25.0) == 52.0


def test_check_limits_names_what_the_machine_lacks():
    """Too few ports, files or conntrack entries are problems; a small backlog is a note."""
    layout = spread(100_000, 8, 28232)
    fine = Limits(somaxconn=4096, syn_backlog=2048, file_max=2_400_000, files_open=3000,
                  conntrack_max=262_144, conntrack_now=100, fd_limit=20_000)
    problems, notes = check_limits(fine, 100_000, layout, 256, 1024)
    assert problems == [] and any("source addresses" in n for n in notes)
    tight = Limits(port_low=60000, port_high=60999, somaxconn=128, syn_backlog=128,
                   file_max=150_000, conntrack_max=65_536, fd_limit=10_000)
    problems, notes = check_limits(tight, 100_000, layout, 256, 1024)
    text = " ".join(problems)
    assert "port range" in text and "fs.file-max" in text and "nf_conntrack_max" in text
    assert "RLIMIT_NOFILE" in text
    assert any("backlog of 128" in n for n in notes)


def test_dovecot_is_left_out_only_where_it_cannot_fit():
    """10,000 Dovecot sessions fit in 24 GiB; 100,000 do not, and the reason says how much."""
    memory = 24 * 1024 * 1024
    assert dovecot_skip_reason(10_000, memory) == ""
    reason = dovecot_skip_reason(100_000, memory, 648)
    assert "100,000" in reason and "62 GiB" in reason and "24 GiB" in reason


def test_skipped_dovecot_level_shows_its_measured_per_session_pss():
    """The 100,000 cell gets the median PSS per session of the levels Dovecot ran."""
    runs = {"idle": {
        "1000": {"dovecot": {"figures": {"pss_kib": 640.0}}},
        "2000": {"dovecot": {"figures": {"pss_kib": 650.0}}},
        "100000": {"dovecot": {"figures": {}, "notes": [], "skipped": "not run"}}}}
    project_skipped(runs, 24 * 1024 * 1024)
    cell = runs["idle"]["100000"]["dovecot"]
    assert cell["figures"]["pss_kib"] == 645.0
    assert "645 KiB × 100,000" in cell["notes"][0]


# -- issue 15: the table's targets (bench/targets.py, bench/report.py) ---------------------------
def run_of(**figures) -> dict:
    return {"figures": figures, "errors": {}, "notes": []}


def made_up_runs() -> dict:
    return {
        "retr": {"c=1": {"iupop3": run_of(mb_s=130.0, cpu_ms_per_mb=5.0),
                         "dovecot": run_of(mb_s=100.0, cpu_ms_per_mb=10.0)},
                 "c=4": {"iupop3": run_of(mb_s=120.0, cpu_ms_per_mb=5.0),
                         "dovecot": run_of(mb_s=100.0, cpu_ms_per_mb=10.0)}},
        "storm": {"c=32": {"iupop3": run_of(rate=1800.0, cpu_ms=0.09),
                           "dovecot": run_of(rate=300.0, cpu_ms=1.0)},
                  "c=1": {"iupop3": run_of(rate=300.0, cpu_ms=2.0),
                          "dovecot": run_of(rate=200.0, cpu_ms=1.0)}},
        "idle": {"2000": {"iupop3": run_of(held=2000, pss_kib=30.0, noop_p99_ms=90.0),
                          "dovecot": run_of(held=2000, pss_kib=648.0, noop_p99_ms=2.0)},
                 "100000": {"iupop3": run_of(held=99_990, pss_kib=9.5, noop_p99_ms=12.0),
                            "dovecot": {"figures": {"pss_kib": 648.0}, "notes": ["not run"],
                                        "skipped": "not run: too big"}}},
        "big": {"first": {"iupop3": run_of(total_ms=500.0), "dovecot": run_of(total_ms=550.0)},
                "restart": {"iupop3": run_of(total_ms=40.0), "dovecot": run_of(total_ms=18.0)},
                "warm": {"iupop3": run_of(total_ms=40.0), "dovecot": run_of(total_ms=18.0)}},
    }


def verdicts(rows: list[dict]) -> dict:
    return {(r["scenario"], r["variant"], r["metric"]): r["met"] for r in rows}


def test_ratio_targets_follow_the_issue():
    """RETR ≥ 1.3x MB/s and ≤ 0.6x CPU per MB at c=1 and c=4; storm c=32 ≥ 6x and ≤ 0.1x."""
    got = verdicts(evaluate(made_up_runs(), ["iupop3", "dovecot"]))
    assert got[("retr", "c=1", "mb_s")] is True and got[("retr", "c=4", "mb_s")] is False
    assert got[("retr", "c=1", "cpu_ms_per_mb")] is True
    assert got[("storm", "c=32", "rate")] is True and got[("storm", "c=32", "cpu_ms")] is True
    assert got[("storm", "c=1", "rate")] is None  # no target at c=1


def test_idle_targets_judge_iupop3_alone_at_the_largest_level():
    """100,000: held must equal the level, PSS ≤ 10 KiB, NOOP p99 < 50 ms; smaller levels
    carry no target."""
    got = verdicts(evaluate(made_up_runs(), ["iupop3", "dovecot"]))
    assert got[("idle", "100000", "held")] is False  # 99,990 of 100,000
    assert got[("idle", "100000", "pss_kib")] is True
    assert got[("idle", "100000", "noop_p99_ms")] is True
    assert got[("idle", "2000", "pss_kib")] is None


def test_absolute_targets_are_judged_without_dovecot():
    """With --no-dovecot the idle targets still get a verdict; ratio targets get none."""
    rows = evaluate(made_up_runs(), ["iupop3"])
    got = verdicts(rows)
    assert got[("idle", "100000", "pss_kib")] is True
    assert got[("retr", "c=1", "mb_s")] is None
    held = next(r for r in rows if r["metric"] == "held" and r["variant"] == "100000")
    assert held["target"] == "≥ 100,000"


def test_big_mailbox_targets_both_first_logins_not_warm():
    """The restart row and the first-login-ever row are ≤ 1.0x; warm is shown, not judged."""
    got = verdicts(evaluate(made_up_runs(), ["iupop3", "dovecot"]))
    assert got[("big", "restart", "total_ms")] is False
    assert got[("big", "first", "total_ms")] is True
    assert got[("big", "warm", "total_ms")] is None


def test_issue_rows_come_in_the_issues_order():
    """RETR, storm, idle, then the big mailbox's restart before its first-login-ever row."""
    chosen = issue_rows(evaluate(made_up_runs(), ["iupop3", "dovecot"]))
    order = [(r["scenario"], r["metric"], r["variant"]) for r in chosen]
    assert order[0] == ("retr", "mb_s", "c=1")
    assert [o[0] for o in order] == ["retr"] * 4 + ["storm"] * 2 + ["idle"] * 3 + ["big"] * 2
    assert order[-2][2] == "restart" and order[-1][2] == "first"
    assert chosen[6]["issue"] == "idle 100,000 sessions: sessions held"


def test_table_shows_verdicts_and_dovecots_projected_cell():
    """The printed table has met/MISSED, Dovecot's 100,000 cell marked as measured at
    smaller levels, and the issue summary's count."""
    runs = made_up_runs()
    text = table(build_rows(runs, ["iupop3", "dovecot"]), runs, ["iupop3", "dovecot"])
    assert "MISSED" in text and " met" in text
    assert "648" + PROJECTED_MARK in text
    assert "Issue 15: 8 met, 3 missed, 0 not judged" in text


def test_chart_needs_no_dovecot_for_absolute_targets(tmp_path):
    """A run without Dovecot still charts the targets on iupop3's own figures."""
    pytest.importorskip("matplotlib")
    runs = made_up_runs()
    rows = build_rows(runs, ["iupop3"])
    message = write_chart(str(tmp_path / "c.png"), rows, "t")
    assert message.startswith("chart:") and (tmp_path / "c.png").stat().st_size > 1000


def test_client_connects_from_the_source_address_it_is_given():
    """bind((addr, 0)) before connect: the server sees 127.0.0.5, not 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        client = Client("127.0.0.1", listener.getsockname()[1], timeout=10, source="127.0.0.5")
        try:
            peer, address = listener.accept()
            peer.close()
        finally:
            client.close()
    assert address[0] == "127.0.0.5"
