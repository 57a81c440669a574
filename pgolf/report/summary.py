"""Per-group statistics over seeds, and the challenge's record rule against a baseline.

Jobs whose overrides differ only by `seed` form a group. Each group is tested against the
baseline with the rule for a new record: beat the previous one by at least 0.005 nats at
p < 0.01. The test is scipy's one-sided Welch t-test on the seeds' final sliding-window loss.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from pgolf.errors import PgolfError
from pgolf.runlog import flatten
from pgolf.report.jobs import DEFAULT_KEY, Job, natural, override_key

BPB, LOSS = "final/quant_sliding_bpb", "final/quant_sliding_loss_nats"
SIZE_CAP_BYTES = 16_000_000  # the challenge's cap, as pgolf.trainer.SIZE_CAP_BYTES (not imported: that pulls in torch)
MIN_GAIN_NATS = 0.005        # challenge README: a record must beat the last one by >= 0.005 nats ...
ALPHA = 0.01                 # ... at p < 0.01
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


def summarize(jobs: list[Job], *, metric: str = BPB, baseline: str | None = None) -> dict:
    """Group jobs by overrides minus seed, summarize each over seeds and test it against the baseline."""
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
        base_key, chosen_by = group_key(baseline), "--baseline"
        if base_key not in by_key:
            plain = {_plain_key(r["overrides"]): r["key"] for r in rows}
            base_key = plain.get(_plain_key(_split_overrides(baseline) if base_key != DEFAULT_KEY else []), base_key)
        if base_key not in by_key:  # a subset names the one group holding all of its overrides
            wanted = set(_plain_key(_split_overrides(baseline)).split(","))
            hits = [r["key"] for r in rows if wanted <= set(_plain_key(r["overrides"]).split(","))]
            if len(hits) > 1:
                raise PgolfError(f"--baseline {baseline!r} matches {len(hits)} groups; add overrides to pick one of: "
                                 f"{' | '.join(hits)}")
            base_key = hits[0] if hits else base_key
        if base_key not in by_key:
            raise PgolfError(f"--baseline {baseline!r} matches no group; groups: {' | '.join(by_key)}")
    elif DEFAULT_KEY in tested:
        base_key, chosen_by = DEFAULT_KEY, "default: the group without overrides"
    else:
        base_key, chosen_by = (tested or list(by_key))[0], "default: the first group by key with results"
    base = by_key[base_key]
    for r in rows:
        if r is not base:
            r["vs_baseline"] = compare(base["loss_nats"]["values"], r["loss_nats"]["values"])
            mb, mc = base["bpb"]["mean"], r["bpb"]["mean"]
            r["vs_baseline"]["improvement_bpb"] = mb - mc if mb is not None and mc is not None else None

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
        "n_jobs": {s: sum(j.status == s for j in jobs) for s in ("finished", "failed", "unfinished")},
        "swept_fields": swept, "groups": rows,
        "jobs": [{"dir": str(j.dir), "group": j.group, "seed": j.seed, "status": j.status, "error": j.error,
                  "metric": _num(j.metrics.get(metric))} for j in sorted(jobs, key=lambda j: natural(j.dir))],
        "warnings": warns,
    }

