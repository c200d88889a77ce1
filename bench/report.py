"""The benchmark's output: a table of figures and ratios, a JSON file and a PNG chart.

Ratios are always iupop3 / Dovecot, whichever way is better for the figure; the table says
which way is better and whether the issue's target is met. Errors are listed per run, zeros
included, so a fast but wrong run cannot pass unnoticed.
"""

from __future__ import annotations

import json
import math
import os

from bench.targets import evaluate, issue_rows, variant_key


TITLES = {"storm": "1. login storm", "retr": "2. bulk RETR", "idle": "3. idle sessions",
          "big": "4. big mailbox", "poll": "5. real poll"}
NOT_RUN = "not run"
PROJECTED_MARK = "†"  # a Dovecot value measured at smaller levels, not at this one


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
    """One row per (scenario, variant, figure) that has a value, with target and verdict."""
    return evaluate(runs, servers)


def table(rows: list[dict], runs: dict, servers: list[str]) -> str:
    has_peer = "dovecot" in servers
    head = (["figure", "unit", "iupop3"] + (["dovecot", "ratio"] if has_peer else [])
            + ["target", ""])
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
            line += [peer_cell(runs, row), f"{row['ratio']:.2f}x" if row["ratio"] else "-"]
        body.append(line + [row["target"], verdict(row)])
    out = _grid(head, body)
    out.append("")
    projected = any(PROJECTED_MARK in line[3] for line in body if has_peer and len(line) > 3)
    out.append("↑ higher is better, ↓ lower is better; ratio = iupop3 / Dovecot."
               + (f" {PROJECTED_MARK} Dovecot not run at this level: its figure from the "
                  "smaller levels (see the checks below)." if projected else ""))
    out.append("")
    out.append(issue_table(rows, runs, has_peer))
    out.append("")
    out.append(checks(runs, servers))
    return "\n".join(out)


def verdict(row: dict) -> str:
    return {True: "met", False: "MISSED", None: ""}[row["met"]]


def peer_cell(runs: dict, row: dict, unit: str = "") -> str:
    """Dovecot's figure; at a level it did not run, the one from smaller levels (marked) or
    "not run"."""
    run = runs.get(row["scenario"], {}).get(row["variant"], {}).get("dovecot")
    value = row["values"].get("dovecot")
    if run and run.get("skipped"):
        return fmt(value) + unit + PROJECTED_MARK if value is not None else NOT_RUN
    return fmt(value) + unit


def issue_table(rows: list[dict], runs: dict, has_peer: bool) -> str:
    """The issue's table: each target, what this run measured, met or MISSED."""
    chosen = issue_rows(rows)
    if not chosen:
        return "Issue 15 targets: none of their scenarios ran."
    head = ["issue 15 target row", "iupop3"] + (["dovecot", "ratio"] if has_peer else []) \
        + ["target", ""]
    body = []
    for row in chosen:
        unit = f" {row['unit']}" if row["unit"] and row["unit"] != "/s" else ""
        line = [row["issue"], fmt(row["values"].get("iupop3")) + unit]
        if has_peer:
            line += [peer_cell(runs, row, unit),
                     f"{row['ratio']:.2f}x" if row["ratio"] else "-"]
        body.append(line + [row["target"], verdict(row) or "no ratio"])
    met = sum(r["met"] is True for r in chosen)
    missed = sum(r["met"] is False for r in chosen)
    return "\n".join(_grid(head, body, first_cells=1)
                     + [f"Issue 15: {met} met, {missed} missed, "
                        f"{len(chosen) - met - missed} not judged (no Dovecot figure)."])


def _grid(head: list[str], body: list[list[str]], first_cells: int = 2) -> list[str]:
    widths = [max(len(r[i]) for r in [head] + body if len(r) > i) for i in range(len(head))]
    out = [_line(head, widths, first_cells), _line(["-" * w for w in widths], widths,
                                                   first_cells)]
    for line in body:
        out.append(line[0] if len(line) == 1 else _line(line, widths, first_cells))
    return out


def _line(cells: list[str], widths: list[int], left: int = 2) -> str:
    """The first LEFT cells left-aligned (names), the rest right-aligned (figures)."""
    parts = [c.ljust(w) for c, w in zip(cells[:left], widths[:left])]
    parts += [c.rjust(w) for c, w in zip(cells[left:], widths[left:])]
    return "  ".join(parts).rstrip()


def checks(runs: dict, servers: list[str]) -> str:
    """Errors (zeros too), the load generator's CPU and notes, for every run."""
    out = ["Checks (every reply verified; errors by kind; load generator CPU % of one core "
           "per process):"]
    for scenario in TITLES:
        for variant, by_server in sorted(runs.get(scenario, {}).items(),
                                         key=lambda kv: variant_key(kv[0])):
            for name in servers:
                run = by_server.get(name)
                if run is None:
                    continue
                if run.get("skipped"):
                    out.append(f"  {scenario} {variant} {name}: not run")
                    out.extend(f"      {note}" for note in run.get("notes", []))
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
    """Bars of the ratios to Dovecot (log scale) and, below them, of the targets on iupop3's
    own values (value / target); returns what happened, for the console."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("no chart: matplotlib is not installed "
                "(.venv/bin/pip install matplotlib, then run again)")
    ratios = [r for r in rows if not r["absolute"] and r["ratio"] and r["ratio"] > 0]
    absolute = [r for r in rows if r["absolute"] and (r["values"].get("iupop3") or 0) > 0]
    if not ratios and not absolute:
        return "no chart: no ratios (Dovecot not run) and no target on iupop3's own figures"
    panels = [(p, kind) for p, kind in ((ratios, "ratio"), (absolute, "absolute")) if p]
    heights = [0.38 * len(p) + 1.4 for p, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (panel, kind) in zip(axes[:, 0], panels):
        if kind == "ratio":
            _ratio_panel(ax, panel)
        else:
            _absolute_panel(ax, panel)
    axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def _bars(ax, rows: list[dict], values: list[float], labels: list[str], texts: list[str],
          ticks: list[float | None]) -> None:
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=[_colour(r) for r in rows], left=0)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for yi, value, text, tick in zip(y, values, texts, ticks):
        ax.text(max(value, tick or 0) * 1.07, yi, text, va="center", fontsize=8)
        if tick:
            ax.plot([tick, tick], [yi - 0.4, yi + 0.4], color="black", linewidth=1.6)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    low, high = min(values + [0.05]), max(values + [3.0])
    ax.set_xlim(low / 1.6, high * 2.6)


def _label(row: dict) -> str:
    return (f"{TITLES[row['scenario']][3:]} {row['variant']}: {row['label']} "
            f"{'↑' if row['higher_is_better'] else '↓'}")


def _ratio_panel(ax, rows: list[dict]) -> None:
    ticks = [float(r["limit"]) if r["target"] else None for r in rows]
    _bars(ax, rows, [r["ratio"] for r in rows], [_label(r) for r in rows],
          [f"{r['ratio']:.2f}x" for r in rows], ticks)
    ax.set_xlabel("iupop3 / Dovecot (log scale); ↑ higher is better, ↓ lower is better; "
                  "black tick = target;\n"
                  "green/red: target met/missed; blue/orange: iupop3 better/worse, no target")


def _absolute_panel(ax, rows: list[dict]) -> None:
    values = [r["values"]["iupop3"] / r["limit"] for r in rows]
    texts = [f"{fmt(r['values']['iupop3'])}{' ' + r['unit'] if r['unit'] else ''} "
             f"(target {r['target']})" for r in rows]
    _bars(ax, rows, values, [_label(r) for r in rows], texts, [1.0] * len(rows))
    ax.set_xlabel("iupop3 alone (Dovecot cannot hold this level here): its figure / the "
                  "target (log scale);\ngreen/red: target met/missed")


def _colour(row: dict) -> str:
    """Strong green/red: a target met/missed; pale blue/orange: iupop3 better/worse."""
    if row["met"] is not None:
        return "#2a9d43" if row["met"] else "#d1495b"
    if row["ratio"] is None:
        return "#bbbbbb"
    better = row["ratio"] >= 1 if row["higher_is_better"] else row["ratio"] <= 1
    return "#9cc3e6" if better else "#f4b183"


def json_path(out_dir: str, stamp: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"bench-{stamp}.json")
