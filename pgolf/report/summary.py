"""Per-group statistics over seeds, and the challenge's two record rules.

Jobs whose overrides differ only by `seed` form a group. Each group is tested with both rules:
- the README's: beat the baseline by at least 0.005 nats at p < 0.01 (one-sided Welch t-test on the
  seeds' final sliding-window loss, scipy);
- the one the leaderboard has applied since PR #1902 (2026-04-28, organizer pass): beat the previous
  top row with a one-sided Welch t-test at p < 0.25 on val_bpb, no margin. The previous top is a
  named set of runs: a group of the sweep, per-seed values, or a record's submission.json.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from pgolf.errors import SIZE_CAP_BYTES, PgolfError
from pgolf.runlog import flatten
from pgolf.report.jobs import DEFAULT_KEY, Job, natural, override_key

BPB, LOSS = "final/quant_sliding_bpb", "final/quant_sliding_loss_nats"
MIN_GAIN_NATS = 0.005        # challenge README: a record must beat the last one by >= 0.005 nats ...
ALPHA = 0.01                 # ... at p < 0.01
FRONTIER_ALPHA = 0.25       # PR #1902: p < 0.25 against the previous top row, no margin
TEST = (f"one-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False, alternative='less') of candidate "
        f"{LOSS} against baseline {LOSS} - {MIN_GAIN_NATS}; H1: mean candidate < mean baseline - {MIN_GAIN_NATS}")


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()) if len(a) else None, "std": float(a.std(ddof=1)) if len(a) > 1 else None,
            "values": a.tolist()}


def compare(base_nats: list[float], cand_nats: list[float]) -> dict:
    """The challenge's record rule for a candidate against a baseline, over seeds.

    The shift makes it a plain one-sided Welch test: H1 is mean(cand) < mean(base) - 0.005, tested as
    ttest_ind(cand, base - 0.005, equal_var=False, alternative='less'). Significant when the mean
    gain is at least 0.005 nats and p < 0.01; fewer than 2 seeds on either side cannot be tested.
    """
    out = {"improvement_nats": None, "t": None, "df": None, "p_value": None, "verdict": "too few seeds"}
    if base_nats and cand_nats:
        out["improvement_nats"] = float(np.mean(base_nats) - np.mean(cand_nats))
    if len(base_nats) < 2 or len(cand_nats) < 2:
        return out
    with warnings.catch_warnings():  # zero variance on both sides gives nan, reported as p n/a
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(np.asarray(cand_nats), np.asarray(base_nats) - MIN_GAIN_NATS, equal_var=False,
                              alternative="less")
    p = _finite(float(res.pvalue))
    out.update(t=_finite(float(res.statistic)), df=_finite(float(res.df)), p_value=p)
    significant = p is not None and p < ALPHA and out["improvement_nats"] >= MIN_GAIN_NATS
    out["verdict"] = "significant" if significant else "not significant"
    return out


def compare_frontier(prev_bpb: list[float], cand_bpb: list[float]) -> dict:
    """PR #1902's rule for a candidate against the previous top row, over seeds.

    H1: mean(cand) < mean(prev), tested as ttest_ind(cand, prev, equal_var=False, alternative='less')
    on val_bpb (the leaderboard's unit, comparable across tokenizers). Passes when p < 0.25; fewer
    than 2 values on either side cannot be tested.
    """
    out = {"improvement_bpb": None, "t": None, "df": None, "p_value": None, "verdict": "too few seeds"}
    if prev_bpb and cand_bpb:
        out["improvement_bpb"] = float(np.mean(prev_bpb) - np.mean(cand_bpb))
    if len(prev_bpb) < 2 or len(cand_bpb) < 2:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(np.asarray(cand_bpb), np.asarray(prev_bpb), equal_var=False, alternative="less")
    p = _finite(float(res.pvalue))
    out.update(t=_finite(float(res.statistic)), df=_finite(float(res.df)), p_value=p)
    out["verdict"] = "passes" if p is not None and p < FRONTIER_ALPHA else "fails"
    return out


def previous_top_values(spec: str) -> tuple[list[float], str] | None:
    """Per-seed val_bpb of a previous top row given as a record's submission.json or as numbers.

    `spec` is a path to a submission.json (the records' `seed_results: {seed: {val_bpb: ...}}`, or
    pgolf's own) or comma-separated values (`1.05662,1.05611,1.05679`). Returns (values, label), or
    None when `spec` is neither (then it names a group of the sweep). Raises PgolfError on a file
    without per-seed val_bpb.
    """
    from pathlib import Path
    import json

    if spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise PgolfError(f"--previous-top {spec}: no such file")
        try:
            sub = json.loads(path.read_text())
        except ValueError as exc:
            raise PgolfError(f"--previous-top {spec}: not JSON ({exc})") from None
        seeds = sub.get("seed_results") if isinstance(sub, dict) else None
        rows = seeds.values() if isinstance(seeds, dict) else seeds if isinstance(seeds, list) else []
        vals = [_num(r.get("val_bpb")) for r in rows if isinstance(r, dict)]
        if not vals or None in vals:
            raise PgolfError(f"--previous-top {spec}: no per-seed val_bpb (seed_results.<seed>.val_bpb); give the "
                             f"values instead, e.g. --previous-top 1.05662,1.05611,1.05679")
        return vals, f"{sub.get('name', path.parent.name)} ({path})"
    try:
        vals = [float(x) for x in spec.split(",")]
    except ValueError:
        return None
    return vals, "given values"


def _split_overrides(text: str) -> list[str]:
    """`a=1,b=[2,3]` -> ['a=1', 'b=[2,3]']: commas split only outside brackets and quotes."""
    parts, cur, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts, cur = parts + [cur], ""
            continue
        cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def group_key(overrides: str) -> str:
    """The group a comma-separated override string names: order-insensitive, seed ignored."""
    if overrides.strip() in ("", DEFAULT_KEY):
        return DEFAULT_KEY
    return ",".join(sorted(o for o in _split_overrides(overrides) if override_key(o) != "seed")) or DEFAULT_KEY


def _plain_key(overrides: list[str]) -> str:
    """The group key without Hydra's +/++/~ prefixes: `wd=0` also names the group `+wd=0`."""
    return ",".join(sorted(o.strip().lstrip("+~") for o in overrides if override_key(o) != "seed")) or DEFAULT_KEY


def _lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _field_value(job: Job, key: str) -> float | str | None:
    """A field's value in a group: its override if given, else the composed config's default."""
    raw = next((o.split("=", 1)[1] for o in job.overrides if override_key(o) == key and "=" in o), None)
    raw = _lookup(job.config, key) if raw is None else raw
    try:
        return float(raw) if raw is not None and not isinstance(raw, (bool, dict, list)) else raw
    except ValueError:
        return raw


def _find_group(spec: str, rows: list[dict], flag: str) -> str:
    """The key of the group that `spec` (comma-separated overrides, order-insensitive) names."""
    by_key = {r["key"]: r for r in rows}
    key = group_key(spec)
    if key not in by_key:
        plain = {_plain_key(r["overrides"]): r["key"] for r in rows}
        key = plain.get(_plain_key(_split_overrides(spec) if key != DEFAULT_KEY else []), key)
    if key not in by_key:  # a subset names the one group holding all of its overrides
        wanted = set(_plain_key(_split_overrides(spec)).split(","))
        hits = [r["key"] for r in rows if wanted <= set(_plain_key(r["overrides"]).split(","))]
        if len(hits) > 1:
            raise PgolfError(f"{flag} {spec!r} matches {len(hits)} groups; add overrides to pick one of: "
                             f"{' | '.join(hits)}")
        key = hits[0] if hits else key
    if key not in by_key:
        raise PgolfError(f"{flag} {spec!r} matches no group; groups: {' | '.join(by_key)}")
    return key


def summarize(jobs: list[Job], *, metric: str = BPB, baseline: str | None = None,
              previous_top: str | None = None) -> dict:
    """Group jobs by overrides minus seed, summarize each over seeds and test it with both record rules.

    `previous_top` names the previous top row for PR #1902's rule (see `previous_top_values`; a
    group's overrides otherwise); without it that rule is tested against the baseline group.
    """
    groups: dict[str, list[Job]] = {}
    for j in sorted(jobs, key=lambda j: j.group):
        groups.setdefault(j.group, []).append(j)
    finished = [j for j in jobs if j.status == "finished"]
    if not any(_num(j.metrics.get(metric)) is not None for j in finished):
        keys = sorted({k for j in finished for k, v in j.metrics.items() if _num(v) is not None})
        raise PgolfError(f"--metric {metric} is in no finished job's metrics.json; numeric keys: {', '.join(keys)}")
    warns = []

    def values(fin: list[Job], key: str) -> list[float]:
        vals = [(j, _num(j.metrics.get(key))) for j in fin]
        warns.extend(f"{j.dir}: {key} is {v}, left out" for j, v in vals if v is not None and not math.isfinite(v))
        return [v for _, v in vals if v is not None and math.isfinite(v)]

    rows = []
    for key, g in groups.items():
        fin = [j for j in g if j.status == "finished"]
        nbytes = [int(b) for j in fin if (b := _num(j.metrics.get("artifact/total_bytes"))) is not None]
        steps, ms = values(fin, "train/steps"), values(fin, "train/ms_per_step")
        rows.append({
            "key": key, "overrides": g[0].overrides, "seeds": [j.seed for j in fin],
            "n_finished": len(fin), "n_failed": sum(j.status == "failed" for j in g),
            "n_unfinished": sum(j.status == "unfinished" for j in g),
            "bpb": _summary(values(fin, BPB)), "loss_nats": _summary(values(fin, LOSS)),
            "metric": _summary(values(fin, metric)) if metric not in (BPB, LOSS) else None,
            "max_total_bytes": max(nbytes) if nbytes else None,
            "over_cap": any(bool(j.metrics.get("artifact/over_cap")) for j in fin) or any(
                b > SIZE_CAP_BYTES for b in nbytes),
            "mean_steps": float(np.mean(steps)) if steps else None,
            "mean_ms_per_step": float(np.mean(ms)) if ms else None,
            "fields": {}, "vs_baseline": None,
        })
        seeds = [str(s) for s in rows[-1]["seeds"]]
        if len(set(seeds)) < len(seeds):
            warns.append(f"group {key}: a seed repeats ({', '.join(sorted(seeds))}); repeats are not independent")
        flat = [(j, flatten({k: v for k, v in j.config.items() if k != "seed"})) for j in g if j.config]
        differ = sorted({k for _, f in flat[1:] for k in set(f) | set(flat[0][1]) if f.get(k) != flat[0][1].get(k)})
        if differ:
            warns.append(f"group {key}: configs differ beyond seed ({', '.join(differ[:5])}"
                         f"{', ...' if len(differ) > 5 else ''}); pooled anyway")
    for r in rows:
        r["metric"] = r["metric"] or r["bpb" if metric == BPB else "loss_nats"]

    by_key = {r["key"]: r for r in rows}
    tested = [r["key"] for r in rows if r["loss_nats"]["values"]]
    if baseline is not None:
        base_key, chosen_by = _find_group(baseline, rows, "--baseline"), "--baseline"
    elif DEFAULT_KEY in tested:
        base_key, chosen_by = DEFAULT_KEY, "default: the group without overrides"
    else:
        base_key, chosen_by = (tested or list(by_key))[0], "default: the first group by key with results"
    base = by_key[base_key]
    top = previous_top_values(previous_top) if previous_top is not None else None
    if top is None:
        top_key = _find_group(previous_top, rows, "--previous-top") if previous_top is not None else base_key
        top = (by_key[top_key]["bpb"]["values"], f"group {top_key}")
    else:
        top_key = None
    for r in rows:
        if r is not base:
            r["vs_baseline"] = compare(base["loss_nats"]["values"], r["loss_nats"]["values"])
            mb, mc = base["bpb"]["mean"], r["bpb"]["mean"]
            r["vs_baseline"]["improvement_bpb"] = mb - mc if mb is not None and mc is not None else None
        r["vs_previous_top"] = None if r["key"] == top_key else compare_frontier(top[0], r["bpb"]["values"])
        r["rules_passed"] = [name for name, cmp, ok in (("readme", r["vs_baseline"], "significant"),
                                                         ("pr1902", r["vs_previous_top"], "passes"))
                             if cmp and cmp["verdict"] == ok]

    # A swept field: a numeric override key (not seed) taking two or more values across groups.
    swept = []
    for key in sorted({override_key(o) for r in rows for o in r["overrides"]}):
        vals = {r["key"]: _field_value(groups[r["key"]][0], key) for r in rows}
        nums = {k: v for k, v in vals.items() if isinstance(v, float)}
        if len(set(nums.values())) > 1 and all(v is None or isinstance(v, float) for v in vals.values()):
            swept.append(key)
            for k, v in nums.items():
                by_key[k]["fields"][key] = v

    return {
        "metric": metric, "dirs": list(dict.fromkeys(str(j.sweep) for j in jobs)),
        "baseline": {"key": base_key, "chosen_by": chosen_by},
        "rule": {"min_improvement_nats": MIN_GAIN_NATS, "alpha": ALPHA, "test": TEST},
        "frontier_rule": {"alpha": FRONTIER_ALPHA, "previous_top": top[1], "previous_top_bpb": top[0],
                          "test": f"PR #1902: one-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False, "
                                  f"alternative='less') of candidate {BPB} against the previous top's val_bpb; "
                                  f"passes at p < {FRONTIER_ALPHA}"},
        "n_jobs": {s: sum(j.status == s for j in jobs) for s in ("finished", "failed", "unfinished")},
        "swept_fields": swept, "groups": rows,
        "jobs": [{"dir": str(j.dir), "group": j.group, "seed": j.seed, "status": j.status, "error": j.error,
                  "metric": _num(j.metrics.get(metric))} for j in sorted(jobs, key=lambda j: natural(j.dir))],
        "warnings": warns,
    }

