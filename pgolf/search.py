"""Greedy coordinate search over candidate overrides: `python -m pgolf.search CANDIDATES.yaml`.

The procedure the 1.0611 record (2026-04-27, PR #1855) used to pick its nine hyperparameter
overrides (on seed 42, at a fixed step count): start from a base config, try each candidate on
top of the current best, and keep it when the mean of the metric over the configured seeds beats
the best by more than a margin. Later rows tuned eval context, TTT masks and learning rates the
same way. Candidates are tried in the file's order, once per pass.

CANDIDATES.yaml:

    base: [experiment=smoke, schedule.iterations=100]   # overrides every trial starts from
    seeds: [42]                                         # each trial's score is the mean over these
    margin: 0.0005                                      # keep a candidate when mean < best - margin
    metric: final/quant_sliding_bpb                     # any numeric metrics.json key; lower is better
    passes: 1
    candidates:                                         # one override, or a list tried together
      - optimizer.matrix_lr=0.03
      - [schedule.warmdown_frac=0.85, schedule.min_lr=0.1]

Every run lives in `OUT/runs/<trial>/seed<seed>/`, a normal pgolf run directory; a finished one
is reused, so an interrupted search continues where it stopped. The trail is written to
`OUT/trail.json`, `OUT/trail.md` and `OUT/trail.png` after every trial.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pgolf.errors import PgolfError


@dataclass
class Trial:
    """One point of the trail: the overrides run, the per-seed metric and the decision."""

    index: int
    candidate: list[str]            # what this trial adds on top of the best so far ([] for the base)
    overrides: list[str]            # the whole override list that was run
    values: dict[str, float | None] = field(default_factory=dict)  # seed -> metric (None: failed)
    mean: float | None = None
    best_before: float | None = None
    kept: bool = False


@dataclass
class Spec:
    """A search: base overrides, candidates, seeds, keep margin, metric and number of passes."""

    candidates: list[list[str]]
    base: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [42])
    margin: float = 0.0
    metric: str = "final/quant_sliding_bpb"
    passes: int = 1


def load_spec(path: str | Path, **cli) -> Spec:
    """Read CANDIDATES.yaml; keyword arguments that are not None replace its fields."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: no such candidates file; see `python -m pgolf.search --help` for its format")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw.get("candidates"):
        raise PgolfError(f"{path}: needs a non-empty `candidates:` list of overrides (see the module docstring)")
    raw.update({k: v for k, v in cli.items() if v is not None})
    unknown = set(raw) - {"candidates", "base", "seeds", "margin", "metric", "passes"}
    if unknown:
        raise PgolfError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: base, candidates, seeds, "
                         f"margin, metric, passes")
    cands = [[c] if isinstance(c, str) else list(c) for c in raw["candidates"]]
    if any(not c or not all(isinstance(o, str) and "=" in o for o in c) for c in cands):
        raise PgolfError(f"{path}: every candidate is an override `key=value` or a list of them; got {raw['candidates']!r}")
    spec = Spec(candidates=cands, base=list(raw.get("base") or []), seeds=[int(s) for s in raw.get("seeds", [42])],
                margin=float(raw.get("margin", 0.0)), metric=str(raw.get("metric", Spec.metric)),
                passes=int(raw.get("passes", 1)))
    if not spec.seeds or spec.passes < 1 or spec.margin < 0:
        raise PgolfError(f"{path}: seeds must be non-empty, passes >= 1 and margin >= 0 "
                         f"(got seeds={spec.seeds}, passes={spec.passes}, margin={spec.margin})")
    return spec


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def combine(best: list[str], candidate: list[str]) -> list[str]:
    """`best` with `candidate` on top: a candidate's key replaces the same key already in `best`."""
    keys = {_key(o) for o in candidate}
    return [o for o in best if _key(o) not in keys] + candidate


def check_spec(spec: Spec) -> None:
    """Compose the base with each candidate before any run, so a typo costs one line and no runs."""
    import pgolf

    for cand in [[]] + spec.candidates:
        try:
            pgolf.compose(combine(spec.base, cand) + [f"seed={spec.seeds[0]}"])
        except PgolfError as exc:
            raise PgolfError(f"candidate {' '.join(cand) or '(base)'}: {exc}") from None


def run_one(overrides: list[str], seed: int, run_dir: Path, metric: str) -> float | None:
    """The metric of one run (reused when `run_dir` already holds a finished one); None if it failed."""
    import pgolf

    done = run_dir / "metrics.json"
    if done.is_file():
        m = json.loads(done.read_text())
        if m.get("status") == "finished":
            return m.get(metric)
    try:
        metrics = pgolf.train(pgolf.compose(overrides + [f"seed={seed}"]), run_dir=run_dir)
    except PgolfError as exc:
        print(f"search: run {run_dir} failed: {exc}", flush=True)
        return None
    value = metrics.get(metric)
    if not isinstance(value, (int, float)):
        raise PgolfError(f"metric {metric} is not in {done}; numeric keys: "
                         f"{', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}")
    return float(value)


def search(spec: Spec, out: str | Path) -> list[Trial]:
    """Run the greedy search; returns the trail (also written to OUT after every trial)."""
    out = Path(out)
    check_spec(spec)
    trail: list[Trial] = []
    best, best_mean = list(spec.base), None
    plan = [[]] + [c for _ in range(spec.passes) for c in spec.candidates]
    for i, cand in enumerate(plan):
        overrides = combine(best, cand)
        t = Trial(index=i, candidate=cand, overrides=overrides, best_before=best_mean)
        for seed in spec.seeds:
            t.values[str(seed)] = run_one(overrides, seed, out / "runs" / str(i) / f"seed{seed}", spec.metric)
        ok = [v for v in t.values.values() if v is not None and math.isfinite(v)]
        t.mean = sum(ok) / len(ok) if len(ok) == len(spec.seeds) else None
        if i == 0:
            if t.mean is None:
                raise PgolfError(f"the base config failed ({out / 'runs' / '0'}); fix it before searching")
            t.kept, best_mean = True, t.mean
        elif t.mean is not None and t.mean < best_mean - spec.margin:
            t.kept, best, best_mean = True, overrides, t.mean
        trail.append(t)
        print(f"search: trial {i} {' '.join(cand) or '(base)'}: {spec.metric} "
              f"{'failed' if t.mean is None else f'{t.mean:.6f}'} -> {'kept' if t.kept else 'dropped'}; "
              f"best {best_mean:.6f}", flush=True)
        write_trail(spec, trail, out)
    return trail


def trail_markdown(spec: Spec, trail: list[Trial]) -> str:
    best = [t for t in trail if t.kept][-1]
    lines = [f"# Greedy search: {spec.metric} (lower is better)", "",
             f"- base: `{' '.join(spec.base) or '(defaults)'}`; seeds {spec.seeds}; keep when mean < best - "
             f"{spec.margin}; {spec.passes} pass(es) over {len(spec.candidates)} candidate(s)",
             f"- best: {best.mean:.6f} with `{' '.join(best.overrides)}`", "", "![trail](trail.png)", "",
             "| trial | candidate | " + " | ".join(f"seed {s}" for s in spec.seeds) + " | mean | best before | "
             "delta | kept |", "|---:|---|" + "---:|" * len(spec.seeds) + "---:|---:|---:|---|"]
    for t in trail:
        vals = [("failed" if v is None else f"{v:.6f}") for v in t.values.values()]
        delta = t.mean - t.best_before if t.mean is not None and t.best_before is not None else None
        lines.append(f"| {t.index} | `{' '.join(t.candidate) or '(base)'}` | " + " | ".join(vals) +
                     f" | {'n/a' if t.mean is None else f'{t.mean:.6f}'} | "
                     f"{'n/a' if t.best_before is None else f'{t.best_before:.6f}'} | "
                     f"{'n/a' if delta is None else f'{delta:+.6f}'} | {'yes' if t.kept else 'no'} |")
    return "\n".join(lines) + "\n"


def trail_png(spec: Spec, trail: list[Trial]) -> bytes:
    """Each trial's mean (kept green, dropped grey, failed absent) and the best so far as a step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.5 * len(trail) + 2), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    best, run = [], None
    for t in trail:
        run = t.mean if t.kept else run
        best.append(run)
    ax.step(range(len(trail)), best, where="post", color="tab:green", label="best so far")
    for t in trail:
        if t.mean is not None:
            ax.plot(t.index, t.mean, "o", color="tab:green" if t.kept else "tab:gray")
    ax.set_xticks(range(len(trail)), [" ".join(t.candidate).split(".")[-1][:24] or "base" for t in trail],
                  rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(f"{spec.metric} (mean of {len(spec.seeds)} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_trail(spec: Spec, trail: list[Trial], out: Path) -> None:
    files = {"trail.json": json.dumps({"spec": asdict(spec), "trail": [asdict(t) for t in trail]}, indent=2) + "\n",
             "trail.md": trail_markdown(spec, trail), "trail.png": trail_png(spec, trail)}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = out / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.search", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("candidates", metavar="CANDIDATES.yaml")
    p.add_argument("--out", default="search", help="where runs and the trail go (default: ./search)")
    p.add_argument("--base", nargs="*", help="base overrides (replace the file's)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated seeds")
    p.add_argument("--margin", type=float)
    p.add_argument("--metric")
    p.add_argument("--passes", type=int)
    a = p.parse_args(argv)
    try:
        spec = load_spec(a.candidates, base=a.base, seeds=a.seeds, margin=a.margin, metric=a.metric, passes=a.passes)
        trail = search(spec, a.out)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    best = [t for t in trail if t.kept][-1]
    print(f"best {spec.metric} {best.mean:.6f}: {' '.join(best.overrides)}\nwrote {Path(a.out) / 'trail.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
