"""The benchmark's output: a table of figures and ratios, a JSON file and a PNG chart.

Ratios are always iupop3 / Dovecot, whichever way is better for the figure; the table says
which way is better and whether the issue's target is met. Errors are listed per run, zeros
included, so a fast but wrong run cannot pass unnoticed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    scenario: str
    metric: str
    label: str
    unit: str
    higher_is_better: bool
    target: tuple[str, float] | None = None  # on the ratio: (">=", 3.0) or ("<=", 1.0)
    only_variant: str | None = None  # the target applies to this variant only

    def target_text(self, variant: str) -> str:
        if not self.target or (self.only_variant and variant != self.only_variant):
            return ""
        op, value = self.target
        return f"{'≥' if op == '>=' else '≤'} {value:g}x"

    def met(self, variant: str, ratio: float) -> bool | None:
        if not self.target_text(variant) or math.isnan(ratio):
            return None
        op, value = self.target
        return ratio >= value if op == ">=" else ratio <= value


FIGURES = (
    Figure("storm", "rate", "sessions/s", "/s", True, (">=", 3.0), "c=32"),
    Figure("storm", "p50_ms", "latency p50", "ms", False),
    Figure("storm", "p99_ms", "latency p99", "ms", False, ("<=", 1.0), "c=32"),
    Figure("storm", "cpu_ms", "server CPU per session", "ms", False),
    Figure("retr", "mb_s", "message data", "MB/s", True, (">=", 1.0)),
    Figure("retr", "cpu_ms_per_mb", "server CPU per MB", "ms", False),
    Figure("idle", "held", "sessions held", "", True),
    Figure("idle", "pss_kib", "PSS per session", "KiB", False, ("<=", 0.05)),
    Figure("idle", "rss_kib", "RSS per session", "KiB", False),
    Figure("idle", "ramp_s", "time to log all in", "s", False),
    Figure("idle", "noop_p99_ms", "NOOP p99 while held (< 50 ms)", "ms", False),
    Figure("big", "total_ms", "login+STAT+LIST+UIDL+QUIT", "ms", False, ("<=", 1.0)),
    Figure("big", "login_ms", "of which login", "ms", False),
    Figure("poll", "polls_s", "polls/s", "/s", True),
    Figure("poll", "p99_ms", "poll latency p99", "ms", False),
    Figure("poll", "sweep_s", "time to poll every user once", "s", False),
    Figure("poll", "cpu_ms", "server CPU per poll", "ms", False),
)

TITLES = {"storm": "1. login storm", "retr": "2. bulk RETR", "idle": "3. idle sessions",
          "big": "4. big mailbox", "poll": "5. real poll"}


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 0.1 else f"{value:.3f}"


def build_rows(runs: dict, servers: list[str]) -> list[dict]:
    """One row per (scenario, variant, figure) that has a value."""
    rows = []
    for figure in FIGURES:
        for variant, by_server in runs.get(figure.scenario, {}).items():
            values = {name: by_server.get(name, {}).get("figures", {}).get(figure.metric)
                      for name in servers}
            if all(v is None for v in values.values()):
                continue
            mine, theirs = values.get("iupop3"), values.get("dovecot")
            ratio = float("nan")
            if mine is not None and theirs not in (None, 0) and not math.isnan(theirs):
                ratio = mine / theirs
            rows.append({"scenario": figure.scenario, "variant": variant,
                         "metric": figure.metric, "label": figure.label, "unit": figure.unit,
                         "higher_is_better": figure.higher_is_better, "values": values,
                         "ratio": None if math.isnan(ratio) else ratio,
                         "target": figure.target_text(variant),
                         "met": figure.met(variant, ratio)})
    order = list(TITLES)
    rows.sort(key=lambda r: (order.index(r["scenario"]), _variant_key(r["variant"])))
    return rows


def _variant_key(variant: str) -> tuple:
    digits = "".join(c for c in variant if c.isdigit())
    return (int(digits) if digits else 0, variant)


def table(rows: list[dict], runs: dict, servers: list[str]) -> str:
    has_peer = "dovecot" in servers
    head = ["figure", "unit", "iupop3"] + (["dovecot", "ratio", "target", ""] if has_peer else [])
    body = []
    last = None
    for row in rows:
        where = (row["scenario"], row["variant"])
        if where != last:
            body.append([f"{TITLES[row['scenario']]} {row['variant']}".strip()])
            last = where
        arrow = "↑" if row["higher_is_better"] else "↓"
        line = [f"  {row['label']} {arrow}", row["unit"], fmt(row["values"].get("iupop3"))]
        if has_peer:
            verdict = {True: "met", False: "MISSED", None: ""}[row["met"]]
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
            line += [fmt(row["values"].get("dovecot")), ratio, row["target"], verdict]
        body.append(line)
    widths = [max(len(r[i]) for r in [head] + body if len(r) > i) for i in range(len(head))]
    out = [_line(head, widths), _line(["-" * w for w in widths], widths)]
    for line in body:
        out.append(line[0] if len(line) == 1 else _line(line, widths))
    out.append("")
    out.append("↑ higher is better, ↓ lower is better; ratio = iupop3 / Dovecot.")
    out.append("")
    out.append(checks(runs, servers))
    return "\n".join(out)


def _line(cells: list[str], widths: list[int]) -> str:
    parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
    parts += [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]
    return "  ".join(parts).rstrip()


def checks(runs: dict, servers: list[str]) -> str:
    """Errors (zeros too), the load generator's CPU and notes, for every run."""
    out = ["Checks (every reply verified; errors by kind; load generator CPU % of one core "
           "per process):"]
    for scenario in TITLES:
        for variant, by_server in sorted(runs.get(scenario, {}).items(),
                                         key=lambda kv: _variant_key(kv[0])):
            for name in servers:
                run = by_server.get(name)
                if run is None:
                    continue
                errors = run.get("errors", {})
                text = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"
                cpu = run.get("loadgen_cpu_pct") or []
                cpu_text = f"; loadgen CPU {'/'.join(f'{c:.0f}' for c in cpu)}%" if cpu else ""
                out.append(f"  {scenario} {variant} {name}: errors {text}{cpu_text}")
                for kind, example in run.get("error_examples", {}).items():
                    if example:
                        out.append(f"      e.g. {kind}: {example}")
                for note in run.get("notes", []):
                    out.append(f"      {note}")
    return "\n".join(out)


def write_json(path: str, document: dict) -> None:
    def clean(value):
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with open(path, "w") as fh:
        json.dump(clean(document), fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_chart(path: str, rows: list[dict], title: str) -> str:
    """A horizontal bar per ratio (log scale); returns what happened, for the console."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("no chart: matplotlib is not installed "
                "(.venv/bin/pip install matplotlib, then run again)")
    rows = [r for r in rows if r["ratio"] is not None and r["ratio"] > 0]
    if not rows:
        return "no chart: no ratios (Dovecot not run)"
    labels = [f"{TITLES[r['scenario']][3:]} {r['variant']}: {r['label']} "
              f"{'↑' if r['higher_is_better'] else '↓'}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    colours = [_colour(r) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, ratios, color=colours, left=0)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for yi, row in zip(y, rows):
        ax.text(row["ratio"] * 1.05, yi, f"{row['ratio']:.2f}x", va="center", fontsize=8)
        if row["target"]:
            value = float(row["target"].split()[1].rstrip("x"))
            ax.plot([value, value], [yi - 0.4, yi + 0.4], color="black", linewidth=1.6)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("iupop3 / Dovecot (log scale); ↑ higher is better, ↓ lower is better; "
                  "black tick = target;\n"
                  "green/red: target met/missed; blue/orange: iupop3 better/worse, no target")
    ax.set_title(title, fontsize=10)
    low, high = min(ratios + [0.05]), max(ratios + [3.0])
    ax.set_xlim(low / 1.6, high * 2.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def _colour(row: dict) -> str:
    """Strong green/red: a target met/missed; pale blue/orange: iupop3 better/worse."""
    if row["met"] is not None:
        return "#2a9d43" if row["met"] else "#d1495b"
    better = row["ratio"] >= 1 if row["higher_is_better"] else row["ratio"] <= 1
    return "#9cc3e6" if better else "#f4b183"


def json_path(out_dir: str, stamp: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"bench-{stamp}.json")
