"""pgolf's CUDA path on one GPU, in one command: `python -m pgolf.gpucheck [--tiny] [--reference CHECKOUT] [--json F]`.

On a CUDA GPU (under 8 minutes on an H100/H200) it
1. traces every experiment preset in bf16 with dynamo (fullgraph semantics: any graph break is
   reported with its reason) in training mode, looping on;
2. times an inductor-compiled training step (forward, backward, optimizers) of the 1.0611 (#1855) and
   1.0565 (#2135) presets at the per-GPU batch of an 8-GPU run, and projects steps in the 600 s cap;
3. times their sliding and TTT evals (#2135: phased LoRA TTT with the n-gram tilt) at one GPU's share
   and projects the full validation split on 8 GPUs against the 600 s eval budget;
4. checks that a bf16 CUDA forward agrees with the fp32 CPU forward on the same weights
   (|loss difference| within `--tol-nats`, 0.02 nats by default);
5. runs a 1-rank NCCL group end to end through `torchrun ... run.py` for a few steps;
6. with `--reference CHECKOUT` (an openai/parameter-golf checkout), times each preset's record script
   (pgolf.gpucheck_ref; needs FlashAttention 3 and Triton, else skipped with one line) and the baseline
   script against pgolf on the same GPU;
7. holds the whole run to a time plan (PLAN: seconds per check, TOTAL_BUDGET_S = 480 in all).
`--json F` writes each check's figure, tolerance, pass/fail, seconds and budget.
Without a GPU, `--tiny` runs the same checks at tiny shapes on the CPU (bf16 autocast against
fp32, gloo instead of NCCL); the tests run it. Each check prints one line; exit 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pgolf.build import CONF_DIR, build, compose
from pgolf.errors import PgolfError

# The newest frontier presets whose step is timed (whichever exist), the 1.0611 record first.
TIMED = ("record_0427_pr1855_lqer", "record_0501_pr2135_ngram_calib32")
# A tiny shape every preset fits: layer-index options are moved inside 3 layers.
TINY = ["model.num_layers=3", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "model.vocab_size=256", "data.vocab_size=256"]
TINY_FIT = {"model.attention.xsa_last_n": "3", "model.recurrence.loop_start": "1", "model.recurrence.loop_end": "1",
            "model.residual.parallel_start_layer": "2", "model.embeddings.ve_layers": "[1,2]",
            "model.residual.num_skip_weights": "null", "model.embeddings.bigram_dim": "32", "model.embeddings.ve_dim": "32"}
VAL_TARGETS = 40_540_160  # SP8192 validation targets (the frontier presets' data)
EVAL_BUDGET_S = 600  # the challenge's eval wall-clock budget
# The time plan on one H100/H200 (seconds per check; the whole command must end within TOTAL_BUDGET_S):
# trace is per preset (23 presets), step/eval/ttt/reference per timed preset.
PLAN = {"trace": 4, "step": 40, "eval": 10, "ttt eval": 50, "bf16": 10, "1-rank": 60, "reference": 30, "baseline": 20}
TOTAL_BUDGET_S = 480


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool | None  # None: skipped
    figure: str
    detail: str = ""
    tolerance: str = ""  # what passing means
    seconds: float = 0.0  # what the check took
    budget_s: float = 0.0  # its share of the time plan (PLAN)

    def line(self) -> str:
        mark = "skip" if self.ok is None else "ok" if self.ok else "FAIL"
        return f"{mark:4s} {self.name}: {self.figure}" + (f" ({self.detail})" if self.detail else "")


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def preset_overrides(name: str, tiny: bool) -> list[str]:
    """The overrides that build preset `name` (at the tiny shape with --tiny), options it lacks left out."""
    base = [f"experiment={name}", "logger=none"]
    if not tiny:
        return base
    cfg = compose(base)
    fit = [f"{k}={v}" for k, v in TINY_FIT.items()
           if OmegaConf.select(cfg, k, default=None) not in (None, 0, [], False)]
    fit += ["eval.seq_len=null"] if cfg.eval.get("seq_len") is not None else []  # long eval context: the tiny 64
    return base + TINY + fit + ["debug=smoke", "schedule.train_batch_tokens=1024", "schedule.train_seq_len=64"]


def trace(name: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Check:
    """Dynamo's explain over one training forward: the number of graphs and breaks, with reasons."""
    try:
        cfg = compose(preset_overrides(name, tiny))
        model = build(cfg, "model").to(device).train()
        if hasattr(model, "set_looping"):
            model.set_looping(getattr(model, "num_loops", 0))
        seq = min(int(cfg.schedule.train_seq_len), 64 if tiny else 2048)
        x = torch.randint(0, model.tok_emb.num_embeddings, (1, seq), device=device)
        torch._dynamo.reset()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ex = torch._dynamo.explain(model)(x, x)
    except (PgolfError, RuntimeError, TypeError, ValueError) as exc:
        return Check(f"trace {name}", False, "could not build or trace", str(exc).splitlines()[0][:200],
                     "0 graph breaks")
    reasons = "; ".join(str(r.reason).splitlines()[0][:120] for r in ex.break_reasons[:3])
    return Check(f"trace {name}", ex.graph_break_count == 0,
                 f"{ex.graph_count} graph(s), {ex.graph_break_count} break(s)", reasons, "0 graph breaks")


def step_and_eval(name: str, tiny: bool, steps: int) -> tuple[list[Check], object]:
    """Compiled train step at the per-GPU batch of 8 GPUs, then the sliding and TTT evals, each projected
    onto the full validation split on 8 GPUs (pgolf.bench's measurements); also returns the Bench."""
    from pgolf.bench import Bench

    if name not in presets():
        return [Check(f"step {name}", None, "preset not in conf/experiment yet")], None
    t0 = time.perf_counter()
    b = Bench(preset_overrides(name, tiny) + ["compile=true"], batch_tokens=None)
    for _ in range(3):  # compilation and warm-up
        b.step(record=False)
    for _ in range(steps):
        b.step()
    step_s = statistics.median(b.times)
    full = step_s * (b.schedule.train_batch_tokens / 8) / b.batch_tokens
    t1 = time.perf_counter()
    windows = 2 if tiny else 64
    std, sliding = b.eval_rates(windows)
    t2 = time.perf_counter()
    checks = [Check(f"step {name}", True, f"{1000 * step_s:.1f} ms/step at {b.batch_tokens:,} tokens/GPU",
                    f"projected {1000 * full:.1f} ms/step on 8 GPUs, {int(600 / full):,} steps in 600 s",
                    "runs; figure reported", t1 - t0),
              projected(f"eval {name}", f"standard {std:,.0f} tok/s, sliding {sliding:,.0f} tok/s (stride {b.stride})",
                        VAL_TARGETS / sliding / 8, tiny, t2 - t1, f"standard {VAL_TARGETS / std / 8:.0f} s")]
    ttt = b.ttt_rate(windows)
    if ttt is not None:
        tilt = f", {b.ttt_tilt.describe()}" if b.ttt_tilt is not None else ", no n-gram tilt"
        checks.append(projected(f"ttt eval {name}", f"{ttt:,.0f} scored tok/s ({type(b.spec.ttt).__name__}{tilt})",
                                VAL_TARGETS / ttt / 8, tiny, time.perf_counter() - t2))
    return checks, b


def projected(name: str, figure: str, full_s: float, tiny: bool, took: float, also: str = "") -> Check:
    """An eval's projected full-validation time on 8 GPUs against the 600 s eval budget (held on CUDA only:
    --tiny's CPU rates say nothing about a GPU)."""
    detail = f"full SP8192 val on 8 GPUs: {full_s:.0f} s" + (f" ({also})" if also else "")
    return Check(name, True if tiny else full_s <= EVAL_BUDGET_S, figure, detail,
                 f"projected <= {EVAL_BUDGET_S} s" + (" (not held on --tiny)" if tiny else ""), took)


def numerics(name: str, tiny: bool, device: torch.device, tol_nats: float) -> Check:
    """bf16 autocast on `device` against fp32 on the CPU, same weights and tokens."""
    cfg = compose(preset_overrides(name, tiny))
    torch.manual_seed(0)
    model = build(cfg, "model").eval()
    seq = min(int(cfg.schedule.train_seq_len), 64 if tiny else 1024)
    x = torch.randint(0, model.tok_emb.num_embeddings, (2, seq + 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = float(model(x[:, :-1], x[:, 1:]))
        model = model.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = float(model(x[:, :-1].to(device), x[:, 1:].to(device)))
    diff = abs(got - ref)
    return Check(f"bf16 {device.type} vs fp32 cpu ({name})", diff <= tol_nats,
                 f"loss {got:.5f} vs {ref:.5f}, |diff| {diff:.2e} nats", "", f"|diff| <= {tol_nats} nats")


def one_rank_group(device: torch.device, data_cache: str | None = None) -> Check:
    """`torchrun --nproc_per_node=1 run.py` for a few smoke steps: NCCL on CUDA, gloo on CPU; the smoke
    data from `data_cache` (a data.cache_dir; default: $PGOLF_CACHE, as training)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                str(CONF_DIR.parent / "run.py"), "experiment=smoke", "schedule.iterations=4", "data.num_val_docs=5",
                "logger=none", f"device={device.type}", f"hydra.run.dir={d}/run"]
        args += [f"data.cache_dir={data_cache}"] if data_cache else []
        t = time.perf_counter()
        r = subprocess.run(args, capture_output=True, text=True, timeout=420, env=dict(os.environ, WANDB_MODE="disabled"))
        took = time.perf_counter() - t
        metrics = Path(d, "run", "metrics.json")
        done = metrics.is_file() and json.loads(metrics.read_text()).get("status") == "finished"
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] if not done else []
    return Check(f"1-rank {backend} run", r.returncode == 0 and done, f"exit {r.returncode} in {took:.0f} s",
                 tail[0][:200] if tail else "", "exit 0 and metrics.json status finished")


def reference_step(checkout: Path, device: torch.device, dtype: torch.dtype, rounds: int = 5) -> Check:
    """The baseline script's GPT forward + backward against pgolf's on the same weights and batch."""
    from pgolf.bench_reference import load_script
    from pgolf.model import GPT, from_flat

    baseline = load_script(checkout, "train_gpt.py")
    shape = dict(vocab_size=1024, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=2,
                 tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0, qk_gain_init=1.5)
    if device.type == "cpu":
        shape.update(num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    ours = GPT(**from_flat(shape)).to(device)
    theirs = baseline.GPT(**shape).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    seqs, seq = (8, 1024) if device.type == "cuda" else (2, 128)
    x = torch.randint(0, 1024, (seqs, seq), device=device)
    times: dict[str, list[float]] = {"pgolf": [], "record": []}
    for i in range(rounds + 1):
        for label, m in (("pgolf", ours), ("record", theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                m(x, x).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[label].append(time.perf_counter() - t)
    p, r = statistics.median(times["pgolf"]), statistics.median(times["record"])
    return Check("baseline step (train_gpt.py)", True, f"pgolf {1000 * p:.1f} ms, record {1000 * r:.1f} ms, "
                 f"ratio {p / r:.3f}", f"{shape['num_layers']}x{shape['model_dim']}, {seqs}x{seq} tokens, fwd+bwd",
                 "runs; ratio reported")


def timed(fn, *a) -> Check:
    """fn(*a)'s Check with the seconds it took (unless fn measured them) and its PLAN budget."""
    t = time.perf_counter()
    c = fn(*a)
    c.seconds = c.seconds or time.perf_counter() - t
    c.budget_s = next((v for k, v in PLAN.items() if c.name.startswith(k)), 0.0)
    return c


def record_step(checkout: Path, name: str, bench, device: torch.device) -> Check:
    """The record script of preset `name`: its GPT's forward + backward on this GPU against pgolf's
    (pgolf.gpucheck_ref); skipped with one line where the script or its GPU-only imports are missing."""
    from pgolf import gpucheck_ref as ref

    label = f"reference step {name}"
    if bench is None:
        return Check(label, None, "preset not timed")
    try:
        module, env = ref.load_record(checkout, name)
    except ref.Skip as why:
        return Check(label, None, "skipped", str(why))
    theirs, tokens = ref.record_step_s(module, env, device, compile=device.type == "cuda")
    ours = ref.pgolf_fwd_bwd_s(bench)
    return Check(label, True, f"pgolf {1000 * ours:.1f} ms, record {1000 * theirs:.1f} ms, ratio {ours / theirs:.3f}",
                 f"fwd+bwd, pgolf at {bench.batch_tokens:,} tokens/GPU, record at {tokens:,}",
                 "runs; ratio reported")


def baseline_step(checkout: Path, device: torch.device, dtype: torch.dtype) -> Check:
    try:
        return reference_step(checkout, device, dtype)
    except PgolfError as why:
        return Check("baseline step (train_gpt.py)", None, "skipped", str(why))


def run(args: argparse.Namespace) -> list[Check]:
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise PgolfError("no CUDA device is visible; run `python -m pgolf.gpucheck --tiny` for the CPU twin")
    from pgolf.gpucheck_ref import check_args

    check_args(args.reference)
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16
    names = args.presets or presets()
    checks = [timed(trace, n, args.tiny, device, dtype) for n in names]
    benches = {}
    for name in TIMED:
        got, benches[name] = step_and_eval(name, args.tiny, args.steps)
        checks += [timed(lambda c=c: c) for c in got]
    checks.append(timed(numerics, TIMED[0], args.tiny, device, args.tol_nats))
    if not args.skip_run:
        checks.append(timed(one_rank_group, device, args.data_cache))
    if args.reference:
        checks += [timed(record_step, Path(args.reference), n, benches[n], device) for n in TIMED]
        checks.append(timed(baseline_step, Path(args.reference), device, dtype))
    total = sum(c.seconds for c in checks)
    checks.append(Check("time plan", True if args.tiny else total <= TOTAL_BUDGET_S, f"{total:.0f} s in all",
                        ", ".join(f"{c.name} {c.seconds:.0f}/{c.budget_s:.0f} s" for c in checks
                                  if c.budget_s and c.seconds > c.budget_s) or "every check within its budget",
                        f"<= {TOTAL_BUDGET_S} s" + (" (not held on --tiny)" if args.tiny else ""), total,
                        TOTAL_BUDGET_S))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    p.add_argument("--reference", metavar="CHECKOUT", help="an openai/parameter-golf checkout to time against")
    p.add_argument("--json", metavar="F", help="write the checks as JSON")
    p.add_argument("--presets", nargs="*", help="trace only these experiment presets (default: all)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps per preset")
    p.add_argument("--tol-nats", type=float, default=0.02, help="bf16 vs fp32 loss tolerance (nats)")
    p.add_argument("--skip-run", action="store_true", help="skip the torchrun end-to-end check")
    p.add_argument("--data-cache", metavar="DIR", help="data.cache_dir of the torchrun check (default: $PGOLF_CACHE)")
    args = p.parse_args(argv)
    try:
        checks = run(args)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu (--tiny)"
    print(f"gpucheck on {dev}, torch {torch.__version__}")
    for c in checks:
        print(c.line(), flush=True)
    failed = [c for c in checks if c.ok is False]
    print(f"{sum(c.ok is True for c in checks)} passed, {len(failed)} failed, {sum(c.ok is None for c in checks)} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "torch": torch.__version__,
                                               "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
