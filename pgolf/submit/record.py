"""A record submission folder from finished runs: README.md, submission.json, one log per seed, train_gpt.py
(the counted two-line script) and train_gpt_readable.py (the same code as source).

    from pgolf.submit.record import write_record
    write_record(["outputs/a", "outputs/b", "outputs/c"], "records/track_10min_16mb/2026-03-21_MyRun",
                 name="My run", author="Me", github_id="me")

The challenge scores a submission by the mean over its seeds and caps every seed's artifact
(compressed model + train_gpt.py) at 16,000,000 bytes. Everything is checked before anything is
written: unfinished or failed runs, seeds that repeat, configs that differ beyond the seed,
runs over the track's 600 s, any seed over the byte cap, a non-empty output folder. The folder
is staged next to its destination and renamed into place, so an error leaves nothing behind.

submission.json follows the records' conventions (e.g. 2026-03-20_Int6_MLP3x_SmearGate_...,
2026-03-25_ValCalib_GPTQ_...): `val_loss`/`val_bpb` are the mean over seeds, `bytes_total` the
largest seed's total, per-seed figures in `seed_results`, and a non-record marks itself with
`track` (upstream's `non-record-unlimited-compute-16mb`) and `non_record_reason`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pgolf.errors import PgolfError
from pgolf.submit.bundle import read_run_config as read_config
from pgolf.report.jobs import read_metrics
from pgolf.report.summary import BPB, LOSS, SIZE_CAP_BYTES
from pgolf.runlog import flatten

TRACK_S = 600.0  # the 10min_16mb track's training wall-clock
RECORD_TRACK, NON_RECORD_DIR, RECORD_DIR = "10min_16mb", "track_non_record_16mb", "track_10min_16mb"
# Keys that may differ between the seeds of one submission: they do not change what is trained.
IGNORED_KEYS = ("seed", "run_id", "resume", "logger.", "data.cache_dir", "checkpoint.")
NEEDED_METRICS = (BPB, LOSS, "artifact/model_bytes", "train/time_s", "train/steps", "model/params")
_ABSENT = object()  # a key one config has and the other lacks


@dataclass
class Run:
    dir: Path
    seed: int
    config: dict
    metrics: dict
    log: Path

    @property
    def bpb(self) -> float:
        return float(self.metrics[BPB])

    @property
    def loss(self) -> float:
        return float(self.metrics[LOSS])

    @property
    def model_bytes(self) -> int:
        return int(self.metrics["artifact/model_bytes"])

    @property
    def time_s(self) -> float:
        return float(self.metrics["train/time_s"])

    @property
    def step_s(self) -> float:
        """The average train step, in seconds (how far a capped run may run past the cap)."""
        steps = int(self.metrics["train/steps"])
        return self.time_s / steps if steps > 0 else 0.0


def read_run(run_dir: str | Path) -> Run:
    """One finished run: its seed, config, metrics and train.log (PgolfError if it is not submittable)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PgolfError(f"{run_dir} is not a directory; give run directories such as outputs/<run_id>")
    status, error, metrics = read_metrics(run_dir / "metrics.json")
    if status == "failed":
        raise PgolfError(f"{run_dir}: the run failed ({error or 'no error recorded'}); rerun it or leave it out")
    if status != "finished":
        why = error or "no metrics.json"
        raise PgolfError(f"{run_dir}: the run is unfinished ({why}); wait for it to finish or leave it out")
    for key in NEEDED_METRICS:
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise PgolfError(f"{run_dir}: metrics.json has {key}={value!r}, not a finite number; a submission "
                             "needs it (rerun with this pgolf version)")
    config = read_config(run_dir)
    if not isinstance(config.get("seed"), int) or isinstance(config.get("seed"), bool):
        raise PgolfError(f"{run_dir}: the config's seed is {config.get('seed')!r}, not an integer")
    log = run_dir / "train.log"
    if not log.is_file():
        raise PgolfError(f"{run_dir}: no train.log; a submission ships each seed's log, so give the run's own "
                         "directory")
    return Run(run_dir, config["seed"], config, metrics, log)


def config_differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every flattened key that differs, ignoring IGNORED_KEYS."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(k for k in set(fa) | set(fb) if not any(k == p or (p.endswith(".") and k.startswith(p))
                                                           for p in IGNORED_KEYS))
    return [(k, fa.get(k, _ABSENT), fb.get(k, _ABSENT)) for k in keys if fa.get(k, _ABSENT) != fb.get(k, _ABSENT)]


def check_runs(runs: list[Run], *, allow_non_record: bool) -> tuple[str, str | None]:
    """Refuse runs that cannot form one submission; return the track and the non-record reason, if any.

    A capped run stops after the step during which the cap passed (the baseline's rule), so
    its train time may exceed 600 s by up to one step; beyond that the run was not capped.
    """
    seen: dict[int, Path] = {}
    for r in runs:
        if r.seed in seen and seen[r.seed].resolve() == r.dir.resolve():
            raise PgolfError(f"{r.dir} is given twice; give each run once")
        if r.seed in seen:
            raise PgolfError(f"seed {r.seed} appears twice ({seen[r.seed]} and {r.dir}); each seed counts once, "
                             "drop one of them")
        seen[r.seed] = r.dir
    first = runs[0]
    for r in runs[1:]:
        diff = config_differences(first.config, r.config)
        if diff:
            shown = ", ".join(f"{k}: {_show(va)} in {first.dir} vs {_show(vb)}" for k, va, vb in diff[:6])
            more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
            raise PgolfError(f"{r.dir} differs from {first.dir} beyond the seed: {shown}{more}; a submission's "
                             "seeds must share one config, so rerun them with the same overrides")
    over = [r for r in runs if r.time_s > TRACK_S + r.step_s]
    if not over:
        return ("non-record-16mb", "submitted as non-record (--allow-non-record)") if allow_non_record \
            else (RECORD_TRACK, None)
    worst = max(over, key=lambda r: r.time_s)
    if not allow_non_record:
        raise PgolfError(f"{worst.dir}: train/time_s={worst.time_s:.3f} exceeds the {RECORD_TRACK} track's "
                         f"{TRACK_S:.0f} s (plus one step of {worst.step_s:.3f} s); rerun with "
                         f"schedule.max_wallclock_seconds={TRACK_S:.0f}, or pass --allow-non-record to submit it "
                         "to the unlimited-compute track")
    return "non-record-unlimited-compute-16mb", (f"unlimited compute: seed {worst.seed} trained {worst.time_s:.1f} s, "
                                                 f"over the {RECORD_TRACK} track's {TRACK_S:.0f} s")


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def check_bytes(runs: list[Run], bytes_code: int, *, plain: bool) -> None:
    for r in runs:
        total = r.model_bytes + bytes_code
        if total > SIZE_CAP_BYTES:
            fix = "shrink the model (fewer parameters, a smaller quant preset)" + (" or drop --plain" if plain else "")
            raise PgolfError(f"{r.dir} (seed {r.seed}): total bytes {total:,} = model {r.model_bytes:,} + code "
                             f"{bytes_code:,} exceeds the {SIZE_CAP_BYTES:,}-byte cap by {total - SIZE_CAP_BYTES:,}; "
                             f"{fix}")


def check_output(out: Path, *, non_record: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PgolfError(f"-o {out} is a file; give a new folder such as records/{RECORD_DIR}/DATE_NAME")
    if out.is_dir() and any(out.iterdir()):
        raise PgolfError(f"-o {out} exists and is not empty; give a new folder or remove it")
    parts = out.resolve().parts
    if non_record and RECORD_DIR in parts:
        raise PgolfError(f"-o {out} is under records/{RECORD_DIR} but this is a non-record submission; use "
                         f"records/{NON_RECORD_DIR}/{out.name}")
    if not non_record and NON_RECORD_DIR in parts:
        raise PgolfError(f"-o {out} is under records/{NON_RECORD_DIR} but this is a record submission; use "
                         f"records/{RECORD_DIR}/{out.name}, or pass --allow-non-record")


# -------------------------------- describing the config --------------------------------

def model_parts(model: dict) -> list[str]:
    """The model's own one-line descriptions of its parts (GPT.describe), from the run's model
    config, built on the meta device (no memory, no init cost)."""
    import logging

    import torch

    from pgolf.model import GPT

    kwargs = {k: v for k, v in model.items() if not k.startswith("_")}
    quiet = logging.getLogger("pgolf.model")
    level, quiet.level = quiet.level, logging.ERROR  # its construction notes are for the run log
    try:
        with torch.device("meta"):
            return GPT(**kwargs).describe()
    except (TypeError, PgolfError) as e:
        raise PgolfError(f"the run's model options do not build with this pgolf ({e}); write the record with the "
                         "pgolf version that trained the run") from None
    finally:
        quiet.setLevel(level)


def quantization(config: dict) -> tuple[str, str]:
    """('int6', 'zstd-22'): the quant preset (with '+rules' when its rules are replaced) and compressor."""
    q = config.get("quant", {})
    preset = str(q.get("preset", "int8")) + ("+rules" if q.get("rules") else "")
    compressor = q.get("compressor", "zlib")
    level = q.get("level")
    level = {"zlib": 9, "zstd": 22}.get(compressor) if level is None else level  # pgolf.quant's defaults
    return preset, f"{compressor}-{level}"


def eval_window(config: dict) -> tuple[str, int]:
    """('sliding_window', 64), or ('standard', seq_len) when windows do not overlap."""
    seq_len = config.get("eval", {}).get("seq_len") or config.get("schedule", {}).get("train_seq_len", 1024)
    stride = config.get("eval", {}).get("stride")
    stride = seq_len if stride is None else int(stride)
    return ("sliding_window" if stride < seq_len else "standard"), stride


def techniques(config: dict) -> list[str]:
    """One line per technique the config switches on, in the order model, optimizer, schedule, export, eval."""
    m, o = config.get("model", {}), config.get("optimizer", {})
    s, q = config.get("schedule", {}), config.get("quant", {})
    dim = m.get("model_dim", 512)
    mlp, init, qat = m.get("mlp") or {}, m.get("init") or {}, m.get("qat") or {}
    hidden = mlp.get("mlp_hidden") or int(mlp.get("mlp_mult", 2.0) * dim)
    out = [f"{m.get('num_layers')} layers x {dim} dim, {m.get('num_heads')} heads / {m.get('num_kv_heads')} KV "
           f"heads, MLP {mlp.get('mlp_mult')}x (hidden {hidden}), vocab {m.get('vocab_size')}"
           + (", tied embeddings" if m.get("tie_embeddings") else "")]
    out += model_parts(m)
    if init.get("ortho_init"):
        out.append(f"orthogonal init (matrices with min dim >= {init.get('ortho_min_dim', 0)})"
                   + (", output projections scaled by 1/sqrt(2L)" if init.get("ortho_proj_scale") else ""))
    if qat.get("qat_bits", 0):
        start = s.get("qat_start_frac", 1.0)
        late = f", from when the LR multiplier falls below {start}" if start < 1.0 else ", from the first step"
        out.append(f"int{qat['qat_bits']} STE QAT ({qat.get('qat_clip')} clip){late}")
    out.append(f"Muon (lr {o.get('matrix_lr')}, momentum {o.get('muon_momentum_warmup_start')} -> "
               f"{o.get('muon_momentum')} over {o.get('muon_momentum_warmup_steps')} steps) + Adam")
    if o.get("muon_weight_decay", 0.0):
        out.append(f"Muon decoupled weight decay {o['muon_weight_decay']}")
    if o.get("adam_weight_decay", 0.0):
        out.append(f"AdamW weight decay {o['adam_weight_decay']}")
    if o.get("grad_clip_norm", 0.0):
        out.append(f"gradient clipping at norm {o['grad_clip_norm']}")
    if o.get("smear_lr_mult", 1.0) != 1.0 or o.get("smear_beta2") is not None:
        out.append(f"SmearGate's own LR x{o.get('smear_lr_mult')}, beta2 {o.get('smear_beta2')}")
    cap = s.get("max_wallclock_seconds", 0)
    out.append(f"{s.get('train_batch_tokens'):,} tokens/step at seq {s.get('train_seq_len')}, "
               f"warmdown {s.get('warmdown_iters')} steps" + (f", {cap:g} s wall-clock cap" if cap else ""))
    if s.get("swa_every", 0):
        out.append(f"SWA every {s['swa_every']} steps once the LR multiplier is below {s.get('swa_start_frac')}")
    preset, codec = quantization(config)
    out.append(f"quantization: preset {preset}" + (f" (rules {q['rules']})" if q.get("rules") else "")
               + (f", default {q['default']}" if q.get("default") else "") + f"; compression {codec}")
    method, stride = eval_window(config)
    out.append(f"{'sliding-window' if method == 'sliding_window' else 'standard'} eval, stride {stride}")
    return out


# -------------------------------- the submission --------------------------------

def _round(x: float) -> float:
    return round(float(x), 8)


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def submission(runs: list[Run], *, name: str, author: str, github_id: str, blurb: str | None, date: str,
               bytes_code: int, track: str, non_record: str | None) -> dict:
    """The submission.json dict: upstream's fields, then the records' extra fields, then per-seed results."""
    config = runs[0].config
    preset, codec = quantization(config)
    method, stride = eval_window(config)
    hardware = sorted({str(r.metrics.get("hardware", "unknown")) for r in runs})
    bpbs, losses = [r.bpb for r in runs], [r.loss for r in runs]
    if blurb is None:
        m = config.get("model", {})
        blurb = (f"{m.get('num_layers')}L {m.get('model_dim')}d MLP {(m.get('mlp') or {}).get('mlp_mult')}x, "
                 f"{preset} + {codec}, "
                 f"{method.replace('_', ' ')} eval stride {stride}; mean of {len(runs)} seed(s), bundled by pgolf.")
        blurb = f"Non-record ({non_record}). {blurb}" if non_record else blurb
    out = {
        "name": name, "author": author, "github_id": github_id, "blurb": blurb, "date": date, "track": track,
        "val_loss": _round(statistics.fmean(losses)), "val_bpb": _round(statistics.fmean(bpbs)),
        "val_loss_std": None if _std(losses) is None else _round(_std(losses)),
        "val_bpb_std": None if _std(bpbs) is None else _round(_std(bpbs)),
        "bytes_total": max(r.model_bytes for r in runs) + bytes_code, "bytes_code": bytes_code,
        "eval_method": method, "eval_stride": stride, "quantization": preset, "compression": codec,
        "model_params": int(runs[0].metrics["model/params"]),
        "train_steps": round(statistics.fmean(int(r.metrics["train/steps"]) for r in runs)),
        "train_time_seconds": round(max(r.time_s for r in runs), 3),
        "hardware": "; ".join(hardware),
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {
            "val_loss": _round(r.loss), "val_bpb": _round(r.bpb), "bytes_total": r.model_bytes + bytes_code,
            "bytes_model": r.model_bytes, "steps": int(r.metrics["train/steps"]),
            "train_time_seconds": round(r.time_s, 3),
            "step_avg_ms": round(1000.0 * r.step_s, 2)} for r in runs},
    }
    if non_record:
        out["non_record_reason"] = non_record
    return out


def readme(runs: list[Run], sub: dict, *, plain: bool) -> str:
    """The submission's README.md: what it is, the techniques, per-seed results, how to reproduce, the config."""
    n = len(runs)
    std = "" if sub["val_bpb_std"] is None else f" (std {sub['val_bpb_std']:.8f})"
    track = (f"**Non-record submission** ({sub['non_record_reason']}), track `{sub['track']}`."
             if sub.get("non_record_reason") else f"Record submission, track `{sub['track']}`.")
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"**val_bpb {sub['val_bpb']:.8f}**{std}: mean over {n} seed{'s' * (n > 1)} of the dequantized "
             f"artifact's {sub['eval_method'].replace('_', ' ')} eval (stride {sub['eval_stride']}); "
             f"val_loss {sub['val_loss']:.8f} nats. {track}", "",
             f"By {sub['author']} (@{sub['github_id']}), {sub['date']}. Hardware: {sub['hardware']}.", ""]
    if not on_8xh100(sub):
        lines += ["Note: these runs were not timed on 8xH100, the hardware the track's 10 minutes refer to.", ""]
    lines += ["## Techniques", ""] + [f"- {t}" for t in techniques(runs[0].config)] + [""]
    lines += ["## Results", "",
              "Quantized sliding-window figures (`final/quant_sliding_bpb`, `final/quant_sliding_loss_nats` in "
              "each run's metrics.json). Total bytes = compressed model + train_gpt.py; the largest total is what "
              f"must stay under the {SIZE_CAP_BYTES:,}-byte cap.", "",
              "| seed | val_bpb | val_loss (nats) | steps | train time (s) | ms/step | model bytes | total bytes |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        s = sub["seed_results"][str(r.seed)]
        lines.append(f"| {r.seed} | {s['val_bpb']:.8f} | {s['val_loss']:.8f} | {s['steps']} | "
                     f"{s['train_time_seconds']:.3f} | {s['step_avg_ms']:.2f} | {s['bytes_model']:,} | "
                     f"{s['bytes_total']:,} |")
    fmt = lambda v: "n/a" if v is None else f"{v:.8f}"  # noqa: E731
    lines += [f"| **mean** | **{sub['val_bpb']:.8f}** | **{sub['val_loss']:.8f}** | | | | | |",
              f"| std | {fmt(sub['val_bpb_std'])} | {fmt(sub['val_loss_std'])} | | | | | |",
              f"| **max** | | | | {sub['train_time_seconds']:.3f} | | | **{sub['bytes_total']:,}** |", "",
              f"- bytes_total (max over seeds): {sub['bytes_total']:,} of {SIZE_CAP_BYTES:,} "
              f"({SIZE_CAP_BYTES - sub['bytes_total']:,} to spare)",
              f"- bytes_code (train_gpt.py{'' if plain else ', minified + lzma + base85'}): {sub['bytes_code']:,}"
              + ("" if plain else "; `train_gpt_readable.py` is the same code as readable source (not counted)"),
              f"- model parameters: {sub['model_params']:,}; quantization {sub['quantization']}, "
              f"compression {sub['compression']}", "",
              "## Reproduce", "",
              "`train_gpt.py` is pgolf's code for this config in one file; its defaults are the config below and "
              "environment variables override them (`SEED`, `DATA_PATH`, ...). One run per seed:", "", "```"]
    lines += [f"SEED={r.seed} torchrun --standalone --nproc_per_node=8 train_gpt.py" for r in runs]
    lines += ["```", "", f"The logs of these runs: {', '.join(f'`train_seed{r.seed}.log`' for r in runs)}.", "",
              "## Config", "",
              f"The composed, resolved config of the seed {runs[0].seed} run (the others differ only in "
              f"{', '.join(k + '*' if k.endswith('.') else k for k in IGNORED_KEYS)}):", "",
              "```yaml", yaml.safe_dump(runs[0].config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_record(run_dirs: list[str | Path], out: str | Path, *, name: str, author: str, github_id: str,
                 blurb: str | None = None, plain: bool = False, allow_non_record: bool = False,
                 date: str | None = None) -> dict:
    """Check the runs, then write the submission folder `out`; return the submission.json dict."""
    from pgolf.submit.bundle import write_bundle

    for flag, value in (("--name", name), ("--author", author), ("--github-id", github_id)):
        if not value or not value.strip():
            raise PgolfError(f"{flag} is empty; the submission needs it")
    if not run_dirs:
        raise PgolfError("no run directories given")
    out = Path(out)
    runs = [read_run(d) for d in run_dirs]
    track, non_record = check_runs(runs, allow_non_record=allow_non_record)
    check_output(out, non_record=non_record is not None)
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with tempfile.TemporaryDirectory(prefix="pgolf_record_") as tmp:
        # What counts is train_gpt.py: the two-line self-extracting script (pgolf.submit.bundle), or
        # with --plain the readable source itself.
        script = write_bundle(runs[0].dir, Path(tmp) / "train_gpt.py", plain=plain)
        readable = None if plain else write_bundle(runs[0].dir, Path(tmp) / "train_gpt_readable.py", plain=True)
        bytes_code = script.stat().st_size
        check_bytes(runs, bytes_code, plain=plain)
        sub = submission(runs, name=name, author=author, github_id=github_id, blurb=blurb, date=date,
                         bytes_code=bytes_code, track=track, non_record=non_record)
        files = {"README.md": readme(runs, sub, plain=plain).encode("utf-8"),
                 "submission.json": (json.dumps(sub, indent=2) + "\n").encode("utf-8")}
        # Stage beside the destination, then rename: a reader never sees half a folder.
        stage = out.parent / f".{out.name}.tmp{os.getpid()}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stage.mkdir()
            for fname, data in files.items():
                (stage / fname).write_bytes(data)
            shutil.copyfile(script, stage / "train_gpt.py")
            if readable is not None:
                shutil.copyfile(readable, stage / "train_gpt_readable.py")
            for r in runs:
                shutil.copyfile(r.log, stage / f"train_seed{r.seed}.log")
            os.replace(stage, out)  # onto a missing or empty folder
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise PgolfError(f"could not write {out}: {exc.strerror or exc}; free disk space or pick another "
                             "folder") from None
    return sub


def on_8xh100(sub: dict) -> bool:
    return all(h.startswith("8x") and "H100" in h for h in sub["hardware"].split("; "))


def warnings_for(sub: dict) -> list[str]:
    """Things worth a second look that do not stop a submission."""
    out = []
    if not on_8xh100(sub):
        out.append(f"hardware is {sub['hardware']!r}, not 8xH100: the track's 10 minutes are timed on 8xH100")
    if len(sub["seeds"]) < 3:
        out.append(f"{len(sub['seeds'])} seed(s): a record must show p < 0.01 over its seeds; most records use 3")
    return out
