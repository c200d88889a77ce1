"""Every figure the bench shows, and the targets of issue 15 ("performance, round 2") on them.

A target is either on the ratio iupop3 / Dovecot of one run (bulk RETR ≥ 1.3x) or, where
Dovecot cannot take part, on iupop3's own value (100,000 idle sessions held at ≤ 10 KiB PSS
each with NOOP p99 < 50 ms). ``evaluate`` turns the figures of a run into rows with a verdict;
bench/report.py prints and charts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LARGEST = "largest"  # a target on the largest level of a scenario that ran (idle 100,000)
LEVEL = -1.0         # a target value meaning "the level itself" (sessions held = level)


@dataclass(frozen=True)
class Target:
    op: str                  # ">=", "<=", "<"
    value: float
    absolute: bool = False   # on iupop3's value instead of the ratio
    issue: str = ""          # the issue table's row this target belongs to

    def limit(self, variant: str) -> float:
        return float(_level(variant)) if self.value == LEVEL else self.value

    def text(self, variant: str, unit: str) -> str:
        sign = {">=": "≥", "<=": "≤", "<": "<"}[self.op]
        value = self.limit(variant)
        if not self.absolute:
            return f"{sign} {value:g}x"
        number = f"{value:,.0f}" if value >= 1000 else f"{value:g}"
        return f"{sign} {number}{' ' + unit if unit else ''}"

    def met(self, value: float | None, variant: str) -> bool | None:
        if value is None or math.isnan(value):
            return None
        limit = self.limit(variant)
        return {">=": value >= limit, "<=": value <= limit, "<": value < limit}[self.op]


@dataclass(frozen=True)
class Figure:
    scenario: str
    metric: str
    label: str
    unit: str
    higher_is_better: bool
    target: Target | None = None
    variants: tuple[str, ...] = ()  # the target applies to these only (LARGEST: the biggest
                                    # level that ran); () = to every variant

    def target_for(self, variant: str, largest: str | None) -> Target | None:
        if self.target is None:
            return None
        wanted = tuple(largest if v == LARGEST else v for v in self.variants)
        if wanted and variant not in wanted:
            return None
        return self.target


def _ratio(op: str, value: float, issue: str) -> Target:
    return Target(op, value, False, issue)


def _absolute(op: str, value: float, issue: str) -> Target:
    return Target(op, value, True, issue)


FIGURES = (
    Figure("storm", "rate", "sessions/s", "/s", True,
           _ratio(">=", 6.0, "login storm c=32, sessions/s"), ("c=32",)),
    Figure("storm", "p50_ms", "latency p50", "ms", False),
    Figure("storm", "p99_ms", "latency p99", "ms", False),
    Figure("storm", "cpu_ms", "server CPU per session", "ms", False,
           _ratio("<=", 0.1, "login storm c=32, server CPU per session"), ("c=32",)),
    Figure("retr", "mb_s", "message data", "MB/s", True,
           _ratio(">=", 1.3, "bulk RETR {variant}, MB/s")),
    Figure("retr", "cpu_ms_per_mb", "server CPU per MB", "ms", False,
           _ratio("<=", 0.6, "bulk RETR {variant}, server CPU per MB")),
    Figure("idle", "held", "sessions held", "", True,
           _absolute(">=", LEVEL, "idle {variant}: sessions held"), (LARGEST,)),
    Figure("idle", "pss_kib", "PSS per session", "KiB", False,
           _absolute("<=", 10.0, "idle {variant}: PSS per session"), (LARGEST,)),
    Figure("idle", "rss_kib", "RSS per session", "KiB", False),
    Figure("idle", "ramp_s", "time to log all in", "s", False),
    Figure("idle", "noop_p50_ms", "NOOP p50 while all held", "ms", False),
    Figure("idle", "noop_p99_ms", "NOOP p99 while all held", "ms", False,
           _absolute("<", 50.0, "idle {variant}: NOOP p99 while held"), (LARGEST,)),
    Figure("idle", "ramp_noop_p99_ms", "NOOP p99 during the ramp", "ms", False),
    Figure("idle", "probe_noop_p99_ms", "NOOP p99 of a probe in an idle process", "ms", False),
    Figure("idle", "noop_interval_s", "NOOP interval per session", "s", False),
    Figure("idle", "hold_noops_s", "NOOPs/s while held", "/s", True),
    Figure("idle", "cpu_us_per_noop", "server CPU while held, per NOOP", "µs", False),
    Figure("idle", "workers", "iupop3 workers", "", False),
    Figure("idle", "processes", "server processes", "", False),
    Figure("big", "total_ms", "login+STAT+LIST+UIDL+QUIT", "ms", False,
           _ratio("<=", 1.0, "big mailbox (5,000 msgs), {variant}"),
           ("first", "restart")),
    Figure("big", "login_ms", "of which login", "ms", False),
    Figure("poll", "polls_s", "polls/s", "/s", True),
    Figure("poll", "p99_ms", "poll latency p99", "ms", False),
    Figure("poll", "sweep_s", "time to poll every user once", "s", False),
    Figure("poll", "cpu_ms", "server CPU per poll", "ms", False),
)

# The big mailbox's variants, as the issue names them; "warm" has no target.
BIG_VARIANTS = {"first": "first login ever (neither has an index)",
                "restart": "first login after a restart, page cache dropped",
                "warm": "warm (median of the next sessions)"}

SCENARIO_ORDER = ("storm", "retr", "idle", "big", "poll")


def _level(variant: str) -> int:
    digits = "".join(c for c in variant if c.isdigit())
    return int(digits) if digits else 0


def variant_key(variant: str) -> tuple:
    order = list(BIG_VARIANTS)
    return (_level(variant), order.index(variant) if variant in order else -1, variant)


def largest_variant(variants) -> str | None:
    numeric = [v for v in variants if _level(v)]
    return max(numeric, key=_level) if numeric else None


def value_of(run: dict | None, metric: str) -> float | None:
    if not run:
        return None
    return run.get("figures", {}).get(metric)


def ratio_of(mine: float | None, theirs: float | None) -> float | None:
    if mine is None or theirs in (None, 0) or math.isnan(mine) or math.isnan(theirs):
        return None
    return mine / theirs


def evaluate(runs: dict, servers: list[str]) -> list[dict]:
    """One row per (scenario, variant, figure) that has a value, with its target's verdict:
    met True/False, or None when there is no target or nothing to judge it by."""
    rows = []
    for figure in FIGURES:
        variants = runs.get(figure.scenario, {})
        largest = largest_variant(variants)
        for variant, by_server in variants.items():
            values = {name: value_of(by_server.get(name), figure.metric) for name in servers}
            if all(v is None for v in values.values()):
                continue
            ratio = ratio_of(values.get("iupop3"), values.get("dovecot"))
            target = figure.target_for(variant, largest)
            judged = None
            if target is not None:
                judged = target.met(values.get("iupop3") if target.absolute else ratio, variant)
            rows.append({"scenario": figure.scenario, "variant": variant,
                         "metric": figure.metric, "label": figure.label, "unit": figure.unit,
                         "higher_is_better": figure.higher_is_better, "values": values,
                         "ratio": ratio,
                         "target": target.text(variant, figure.unit) if target else "",
                         "absolute": bool(target and target.absolute),
                         "limit": target.limit(variant) if target else None,
                         "issue": (target.issue.format(variant=_variant_name(figure.scenario,
                                                                              variant))
                                   if target else ""),
                         "met": judged})
    rows.sort(key=lambda r: (SCENARIO_ORDER.index(r["scenario"]), variant_key(r["variant"])))
    return rows


def _variant_name(scenario: str, variant: str) -> str:
    if scenario == "big":
        return BIG_VARIANTS.get(variant, variant)
    if scenario == "idle":
        return f"{_level(variant):,} sessions"
    return variant


ISSUE_ORDER = (("retr", "mb_s"), ("retr", "cpu_ms_per_mb"), ("storm", "rate"),
               ("storm", "cpu_ms"), ("idle", "held"), ("idle", "pss_kib"),
               ("idle", "noop_p99_ms"), ("big", "total_ms"))


def issue_rows(rows: list[dict]) -> list[dict]:
    """The rows that carry a target, in the issue table's order (the big mailbox's restart
    row before its first-login-ever row, as the issue lists them)."""
    chosen = [r for r in rows if r["issue"]]
    return sorted(chosen, key=lambda r: (ISSUE_ORDER.index((r["scenario"], r["metric"])),
                                         r["variant"] != "restart", variant_key(r["variant"])))
