"""The report as a plain-text table, report.md, report.json and report.png, written atomically.

Everything is rendered in memory first, so an error leaves nothing half-written; each file is
then written to a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table_rows(report: dict) -> list[list[str]]:
    """Header plus one row per group; the baseline's verdict cell says `baseline`."""
    short = report["metric"].split("/")[-1]
    extra = report["metric"] not in ("final/quant_sliding_bpb", "final/quant_sliding_loss_nats")
    head = ["group", "n", "failed", "unfinished", "bpb mean", "bpb std", "nats mean", "nats std"]
    head += [f"{short} mean", f"{short} std"] if extra else []
    head += ["max bytes", "over cap", "steps", "ms/step", "gain nats", "gain bpb", "p", "verdict",
             "vs top bpb", "p #1902", "rules passed"]
    rows = [head]
    for g in report["groups"]:
        cmp = g["vs_baseline"] or {}
        row = [g["key"], str(g["n_finished"]), str(g["n_failed"]), str(g["n_unfinished"]),
               _f(g["bpb"]["mean"], ".5f"), _f(g["bpb"]["std"], ".5f"),
               _f(g["loss_nats"]["mean"], ".5f"), _f(g["loss_nats"]["std"], ".5f")]
        row += [_f(g["metric"]["mean"], ".5g"), _f(g["metric"]["std"], ".3g")] if extra else []
        row += [_f(g["max_total_bytes"], ","), "YES" if g["over_cap"] else "no", _f(g["mean_steps"], ".0f"),
                _f(g["mean_ms_per_step"], ".1f"), _f(cmp.get("improvement_nats"), "+.5f"),
                _f(cmp.get("improvement_bpb"), "+.5f"), _f(cmp.get("p_value"), ".3g"),
                cmp.get("verdict", "baseline")]
        top = g.get("vs_previous_top") or {}
        row += [_f(top.get("improvement_bpb"), "+.5f"), _f(top.get("p_value"), ".3g"),
                ", ".join(g.get("rules_passed") or []) or ("previous top" if not top else "none")]
        rows.append(row)
    return rows


def _notes(report: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Header lines, then (title, lines) sections for failed and unfinished jobs and warnings."""
    n, b = report["n_jobs"], report["baseline"]
    head = [f"{len(report['groups'])} groups from {n['finished']} finished, {n['failed']} failed, "
            f"{n['unfinished']} unfinished jobs in {', '.join(report['dirs'])}",
            f"baseline: {b['key']} (chosen by {b['chosen_by']})",
            f"rule: gain >= {report['rule']['min_improvement_nats']} nats at p < {report['rule']['alpha']}; "
            f"gains are baseline minus group (positive is better)",
            f"test: {report['rule']['test']}",
            f"rule since PR #1902: p < {report['frontier_rule']['alpha']} against the previous top "
            f"({report['frontier_rule']['previous_top']}); {report['frontier_rule']['test']}"]
    sections = [(f"{status} jobs", [f"{j['dir']} [{j['group']}, seed={j['seed']}]" + (f": {j['error']}" if j["error"]
                                                                                        else "")
                                    for j in report["jobs"] if j["status"] == status])
                for status in ("failed", "unfinished")]
    return head, [(t, lines) for t, lines in sections + [("warnings", report["warnings"])] if lines]


def format_text(report: dict) -> str:
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 or i == len(r) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    head, sections = _notes(report)
    for title, items in sections:
        lines += ["", f"{title}:"] + [f"  {x}" for x in items]
    return "\n".join(head + [""] + lines) + "\n"


def format_markdown(report: dict) -> str:
    rows = [[c.replace("|", "\\|") for c in r] for r in table_rows(report)]
    head, sections = _notes(report)
    md = [f"# pgolf report: {report['metric']}", ""] + [f"- {h}" for h in head] + [""]
    md += ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 2) + ["---"]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", "![metric by group](report.png)"]
    for title, items in sections:
        md += ["", f"## {title.capitalize()}", ""] + [f"- {x}" for x in items]
    return "\n".join(md) + "\n"


def render_png(report: dict) -> bytes:
    """The metric against each swept numeric field (one line per other-overrides combination), error
    bars one sample std; with no swept field, one bar per group. Uses Agg without touching pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pgolf.report.jobs import DEFAULT_KEY, override_key

    metric, fields = report["metric"], report["swept_fields"]
    groups = [g for g in report["groups"] if g["metric"]["mean"] is not None]
    base = next(g for g in report["groups"] if g["key"] == report["baseline"]["key"])["metric"]["mean"]
    fig = Figure(figsize=(5.5 * max(len(fields), 1), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(fields), 1), squeeze=False)[0]
    for ax, name in zip(axes, fields):
        lines: dict[str, list] = {}
        for g in groups:
            if name in g["fields"]:
                rest = ",".join(o for o in g["overrides"] if override_key(o) != name) or DEFAULT_KEY
                lines.setdefault(rest, []).append((g["fields"][name], g["metric"]["mean"], g["metric"]["std"] or 0.0,
                                                   g["n_finished"]))
        for label, pts in sorted(lines.items()):
            x, y, e, n = zip(*sorted(pts))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label if len(lines) > 1 else "mean ± std")
            for xi, yi, ni in zip(x, y, n):
                ax.annotate(f"n={ni}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(name)
    if not fields:
        ax = axes[0]
        means = [g["metric"]["mean"] for g in groups]
        stds = [g["metric"]["std"] or 0.0 for g in groups]
        colors = ["tab:gray" if g["key"] == report["baseline"]["key"] else "tab:blue" for g in groups]
        ax.bar(range(len(groups)), means, yerr=stds, capsize=4, color=colors)
        ax.set_xticks(range(len(groups)), [g["key"] for g in groups], rotation=30, ha="right", fontsize=7)
        lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        pad = max(hi - lo, abs(hi) * 1e-3, 1e-9) * 0.3  # zoom in: bars from 0 hide a 0.005 difference
        ax.set_ylim(lo - pad, hi + pad)
    for ax in axes:
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", linewidth=0.8, label=f"baseline {report['baseline']['key']}")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if fields:
            ax.legend(fontsize=7)
    fig.suptitle(f"{metric}: mean ± sample std over seeds", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Render report.md, report.json and report.png in memory, then write each atomically into `out`."""
    files = {"report.md": format_markdown(report).encode(),
             "report.json": (json.dumps(report, indent=2, allow_nan=False) + "\n").encode(),
             "report.png": render_png(report)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_atomic(out / name, data)
    return [out / name for name in files]
