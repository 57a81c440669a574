"""A run held against its record's published train log: `python -m pgolf.report --against-log LOG RUN_DIR`.

The records print their progress in two formats (both parsed, and pgolf's own train.log is the
first):
- 2026-03-17 .. 04-0x: `step:400/20000 train_loss:2.5687 train_time:17382ms step_avg:43.45ms` and
  `step:400/20000 val_loss:2.5687 val_bpb:1.5174 train_time:17382ms ...`;
- 2026-04-0x on (#1394's logger): `500/20000 train_loss: 2.5753 train_time: 0.8m tok/s: 8258040` and
  `4000/20000 val_loss: 2.8741 val_bpb: 1.1127`.
Any other line holding `val_loss` and `val_bpb` is a final figure named by the text before
`val_loss` (`final_int6_sliding_window`, `quantized_ttt`, `final_quant_sliding`, ...).

The comparison interpolates the record's curve at the run's logged steps (within the record's
range; equal steps compare exactly) and reports the first step where the run's train loss or
val_bpb differs by more than the tolerance.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgolf.errors import PgolfError

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf)"
TRAIN = [re.compile(rf"^step:(\d+)/\d+ train_loss:{_NUM}"), re.compile(rf"^(\d+)/\d+ train_loss: ?{_NUM}")]
VAL = [re.compile(rf"^step:(\d+)/\d+ val_loss:{_NUM} val_bpb:{_NUM}"),
       re.compile(rf"^(\d+)/\d+ val_loss: ?{_NUM} val_bpb: ?{_NUM}")]
FINAL = re.compile(rf"^(?P<name>[^\s].*?)\s+val_loss: ?{_NUM} val_bpb: ?{_NUM}")


@dataclass
class LogCurves:
    """What one train log says: train loss and val (loss, bpb) by step, and the final figures."""

    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, tuple[float, float]] = field(default_factory=dict)
    finals: dict[str, tuple[float, float]] = field(default_factory=dict)


def parse_log(text: str) -> LogCurves:
    """Parse a record's (or pgolf's) train log; later lines for the same step win."""
    out = LogCurves()
    for raw in text.splitlines():
        line = raw.strip()
        if m := next((r.match(line) for r in TRAIN if r.match(line)), None):
            out.train[int(m[1])] = float(m[2])
        elif m := next((r.match(line) for r in VAL if r.match(line)), None):
            out.val[int(m[1])] = (float(m[2]), float(m[3]))
        elif (m := FINAL.match(line)) and not line.startswith("step:"):
            out.finals[m["name"].strip()] = (float(m[2]), float(m[3]))
    return out


def first_divergence(ref: dict[int, float], run: dict[int, float], tol: float) -> tuple[int | None, list[dict]]:
    """Rows (step, run, record at that step, difference) over the run's steps inside the record's
    range, and the first step whose |difference| exceeds `tol` (None if none does)."""
    if not ref or not run:
        return None, []
    xs = np.array(sorted(ref), dtype=float)
    ys = np.array([ref[int(x)] for x in xs])
    rows, first = [], None
    for step in sorted(run):
        if step < xs[0] or step > xs[-1]:
            continue
        want = float(np.interp(step, xs, ys))
        diff = run[step] - want
        rows.append({"step": step, "run": run[step], "record": want, "diff": diff, "exact": step in ref})
        if first is None and abs(diff) > tol:
            first = step
    return first, rows


def compare_logs(record_log: str | Path, run_dir: str | Path, *, tol_loss: float = 0.05,
                 tol_bpb: float = 0.02) -> dict:
    """The comparison as a dict (also what report.json holds). PgolfError on unreadable input."""
    record_log, run_dir = Path(record_log), Path(run_dir)
    if not record_log.is_file():
        raise PgolfError(f"--against-log {record_log}: no such file")
    run_log = run_dir / "train.log" if run_dir.is_dir() else run_dir
    if not run_log.is_file():
        raise PgolfError(f"{run_dir}: no train.log there (give a pgolf run directory or a train log)")
    ref, run = parse_log(record_log.read_text(errors="replace")), parse_log(run_log.read_text(errors="replace"))
    if not ref.train and not ref.val:
        raise PgolfError(f"{record_log}: no train_loss or val_bpb lines in a known format (see pgolf.report.against_log)")
    first_train, train_rows = first_divergence(ref.train, run.train, tol_loss)
    first_val, val_rows = first_divergence({s: v[1] for s, v in ref.val.items()}, {s: v[1] for s, v in run.val.items()},
                                           tol_bpb)
    return {"record_log": str(record_log), "run_log": str(run_log),
            "tolerance": {"train_loss": tol_loss, "val_bpb": tol_bpb},
            "first_divergence": {"train_loss": first_train, "val_bpb": first_val},
            "train_loss": train_rows, "val_bpb": val_rows,
            "finals": {"record": ref.finals, "run": run.finals},
            "curves": {"record": {"train": ref.train, "val": ref.val}, "run": {"train": run.train, "val": run.val}}}


def format_markdown(cmp: dict) -> str:
    fd, tol = cmp["first_divergence"], cmp["tolerance"]
    say = {k: ("never" if v is None else f"step {v}") for k, v in fd.items()}
    md = [f"# {cmp['run_log']} against {cmp['record_log']}", "",
          f"- first step where train loss differs by more than {tol['train_loss']}: {say['train_loss']}",
          f"- first step where val_bpb differs by more than {tol['val_bpb']}: {say['val_bpb']}",
          "- the record's curve is interpolated at the run's steps (`exact` where both logged that step)", "",
          "![curves](against_log.png)", ""]
    for key in ("train_loss", "val_bpb"):
        md += [f"## {key}", "", "| step | run | record | difference | exact |", "|---:|---:|---:|---:|---|"]
        md += [f"| {r['step']} | {r['run']:.4f} | {r['record']:.4f} | {r['diff']:+.4f} | {'yes' if r['exact'] else ''} |"
               for r in cmp[key]] or ["| (no common range) | | | | |"]
        md.append("")
    md += ["## Final figures", "", "| source | name | val_loss | val_bpb |", "|---|---|---:|---:|"]
    for src in ("record", "run"):
        md += [f"| {src} | {n} | {v[0]:.6f} | {v[1]:.6f} |" for n, v in cmp["finals"][src].items()]
    return "\n".join(md) + "\n"


def render_png(cmp: dict) -> bytes:
    """Train loss and val_bpb against step for both logs, the first divergences marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_v = fig.subplots(1, 2)
    for src, style in (("record", "-"), ("run", "--")):
        c = cmp["curves"][src]
        if c["train"]:
            s = sorted(c["train"])
            ax_t.plot(s, [c["train"][k] for k in s], style, marker=".", label=src)
        if c["val"]:
            s = sorted(c["val"])
            ax_v.plot(s, [c["val"][k][1] for k in s], style, marker="o", label=src)
    for ax, key, ylabel in ((ax_t, "train_loss", "train loss (nats)"), (ax_v, "val_bpb", "val_bpb")):
        if cmp["first_divergence"][key] is not None:
            ax.axvline(cmp["first_divergence"][key], color="tab:red", linewidth=0.8, label="first divergence")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_against_log(cmp: dict, out: str | Path) -> list[Path]:
    """Write against_log.md, against_log.json and against_log.png into `out` (rendered in memory first)."""
    from pgolf.report.render import _write_atomic

    js = dict(cmp, curves={src: {"train": {str(k): v for k, v in c["train"].items()},
                                 "val": {str(k): v for k, v in c["val"].items()}} for src, c in cmp["curves"].items()})
    files = {"against_log.md": format_markdown(cmp).encode(), "against_log.png": render_png(cmp),
             "against_log.json": (json.dumps(js, indent=2, allow_nan=True) + "\n").encode()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_atomic(out / name, data)
    return [out / n for n in files]
