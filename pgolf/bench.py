"""What a config costs before you spend GPU hours on it: `python -m pgolf.bench [overrides]`.

Measures, on the current device, the train step (forward + backward + optimizers, median
after warm-up), standard and sliding eval throughput, and export time and bytes, then
projects them onto the challenge: steps inside the wall-clock cap on N GPUs and the time
to score the full FineWeb validation split (62,021,632 targets), with the config's TTT eval
(eval.ttt) when on: its tokens/s and projected time on N GPUs, warned past the 600 s eval budget. On CPU the batch is scaled
down (the scale is printed); projections assume time proportional to tokens.
`--compare "OVERRIDES"` benchmarks a second config in the same process, alternating steps
and evals, and prints ratios. `--doc-tokens N` packs documents into the synthetic tokens (a
BOS with probability 1/N at each position, the same tokens for both configs), e.g. to time
`--compare "model.attention.doc_attention=true"` against plain causal attention. The config's `device`, `dtype` and `compile` apply as in
training (e.g. `compile=true` times the inductor-compiled step on CPU).
`--reference CHECKOUT` instead times pgolf against the records' own scripts
(see pgolf.bench_reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pgolf.build import build, compose, to_container
from pgolf.errors import PgolfError
from pgolf.evaluate import ByteLUTs, eval_sliding, eval_standard
from pgolf.trainer import place_model, setup_runtime

FINEWEB_VAL_TARGETS = 62_021_632


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's CPU thread count set to `n` for the block (None leaves it), then restored:
    a benchmark called in-process must not slow down whatever runs after it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Bench:
    """One config's model, optimizers and synthetic batch, ready to time."""

    def __init__(self, overrides: list[str], *, batch_tokens: int | None, doc_tokens: int | None = None):
        self.label = " ".join(overrides) or "(defaults)"
        self.cfg = compose(overrides + ["logger=none"])
        self.schedule, self.spec = build(self.cfg, "schedule"), build(self.cfg, "eval")
        self.seq_len = self.schedule.train_seq_len
        self.eval_seq_len, self.stride = self.spec.resolve(self.seq_len)
        # Device, dtype and compile resolved exactly as a training job resolves them.
        top = to_container(self.cfg)
        self.rt = setup_runtime(SimpleNamespace(device=top["device"], dtype=top["dtype"], compile=top["compile"]))
        device, cuda = self.rt.device, self.rt.device.type == "cuda"
        torch.manual_seed(0)
        self.model = place_model(build(self.cfg, "model"), self.rt)
        self.step_model = torch.compile(self.model, dynamic=False, fullgraph=True) if self.rt.compile else self.model
        self.opt = build(self.cfg, "optimizer")(self.model)
        self.vocab = self.model.tok_emb.num_embeddings
        # One GPU of 8 takes train_batch_tokens / 8 per step; on CPU a few sequences stand in.
        per_gpu = self.schedule.train_batch_tokens // 8
        self.batch_tokens = batch_tokens or (per_gpu if cuda else min(per_gpu, 4 * self.seq_len))
        self.batch_tokens = max(self.seq_len, self.batch_tokens // self.seq_len * self.seq_len)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, self.vocab, (self.batch_tokens // self.seq_len, self.seq_len), generator=g).to(device)
        self.y = torch.randint(0, self.vocab, self.x.shape, generator=g).to(device)
        self.doc_tokens, self.bos_id = doc_tokens, getattr(self.model, "bos_id", 1)
        self.x = self.with_docs(self.x, seed=3)
        self.times: list[float] = []
        self.eval_times: list[tuple[float, float]] = []

    def with_docs(self, tokens: torch.Tensor, *, seed: int) -> torch.Tensor:
        """`tokens` with a BOS at each position with probability 1/doc_tokens (unchanged when None)."""
        if not self.doc_tokens:
            return tokens
        g = torch.Generator().manual_seed(seed)
        bos = torch.rand(tokens.shape, generator=g) < 1.0 / self.doc_tokens
        return torch.where(bos.to(tokens.device), torch.full_like(tokens, self.bos_id), tokens)

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, record: bool = True) -> None:
        self.sync()
        t = time.perf_counter()
        with torch.autocast(self.rt.device.type, dtype=self.rt.dtype, enabled=self.rt.dtype != torch.float32):
            loss = self.step_model(self.x, self.y)
        loss.backward()
        self.opt.step(1, 1.0)
        self.sync()
        if record:
            self.times.append(time.perf_counter() - t)

    def eval_rates(self, num_windows: int) -> tuple[float, float]:
        """(standard scored tokens/s, sliding scored tokens/s) on synthetic validation tokens; also recorded."""
        n = num_windows * self.eval_seq_len
        val = self.with_docs(torch.randint(0, self.vocab, (n + 1,), generator=torch.Generator().manual_seed(2)), seed=4)
        luts = ByteLUTs(torch.ones(self.vocab, dtype=torch.int16), torch.zeros(self.vocab, dtype=torch.bool),
                        torch.zeros(self.vocab, dtype=torch.bool)).to(self.rt.device)
        common = dict(rank=0, world_size=1, device=self.rt.device, dtype=self.rt.dtype)
        self.sync()
        t = time.perf_counter()
        eval_standard(self.model, val, luts, seq_len=self.eval_seq_len, batch_tokens=self.spec.batch_seqs *
                      self.eval_seq_len, **common)
        self.sync()
        std = n / (time.perf_counter() - t)
        t = time.perf_counter()
        eval_sliding(self.model, val, luts, seq_len=self.eval_seq_len, stride=self.stride,
                     batch_seqs=self.spec.batch_seqs, **common)
        self.sync()
        sliding = n / (time.perf_counter() - t)
        self.eval_times.append((std, sliding))
        return std, sliding

    def ttt_rate(self, num_windows: int) -> float | None:
        """Scored tokens/s of the config's TTT eval (eval.ttt; None when off) on synthetic documents
        (mean length --doc-tokens, 512 when unset), on a copy of the model (TTT trains it), with the
        n-gram tilt when eval.ngram_tilt_enabled (kept as self.ttt_tilt)."""
        if self.spec.ttt is None:
            return None
        import copy

        n = num_windows * self.eval_seq_len
        tokens = torch.randint(2, self.vocab, (n + 1,), generator=torch.Generator().manual_seed(5))
        bos = torch.rand(n + 1, generator=torch.Generator().manual_seed(6)) < 1.0 / (self.doc_tokens or 512)
        bos[0] = True
        val = torch.where(bos, torch.full_like(tokens, self.bos_id), tokens).to(self.rt.device)
        luts = ByteLUTs(torch.ones(self.vocab, dtype=torch.int16), torch.zeros(self.vocab, dtype=torch.bool),
                        torch.zeros(self.vocab, dtype=torch.bool)).to(self.rt.device)
        model = copy.deepcopy(self.model)
        self.sync()
        t = time.perf_counter()
        self.ttt_tilt = None  # the n-gram tilt (eval.ngram_tilt_enabled), built inside the timer as in training
        if self.spec.ngram_tilt_enabled:
            from pgolf.ttt.ngram import NgramTilt

            self.ttt_tilt = NgramTilt(val, token_order=self.spec.token_order,
                                      token_threshold=self.spec.token_threshold, token_boost=self.spec.token_boost)
        self.spec.ttt.evaluate(model, val, luts, seq_len=self.eval_seq_len, stride=self.stride,
                               batch_seqs=self.spec.batch_seqs, rank=0, world_size=1, device=self.rt.device,
                               dtype=self.rt.dtype, log=lambda s: None, tilt=self.ttt_tilt)
        self.sync()
        return n / (time.perf_counter() - t)

    def export(self) -> tuple[float, int]:
        quant = build(self.cfg, "quant")
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            report = quant.export(state, Path(d) / quant.artifact_name)
            return time.perf_counter() - t, report.total_bytes


def run(args: argparse.Namespace) -> dict:
    benches = [Bench(args.overrides, batch_tokens=args.batch_tokens, doc_tokens=args.doc_tokens)]
    if args.compare is not None:
        benches.append(Bench(args.compare.split(), batch_tokens=benches[0].batch_tokens, doc_tokens=args.doc_tokens))
    for b in benches:  # warm-up (and compilation)
        for _ in range(args.warmup):
            b.step(record=False)
    for _ in range(args.steps):  # alternate so both configs see the same machine state
        for b in benches:
            b.step()
    for _ in range(args.eval_rounds):
        for b in benches:
            b.eval_rates(args.eval_windows)
    results = []
    for b in benches:
        step_s = statistics.median(b.times)
        full_step_s = step_s * (b.schedule.train_batch_tokens / args.gpus) / b.batch_tokens
        std_rate, sliding_rate = (statistics.median(r) for r in zip(*b.eval_times))
        export_s, artifact_bytes = b.export()
        ttt_rate = b.ttt_rate(args.eval_windows)
        results.append({
            "overrides": b.label,
            "device": str(b.rt.device), "compiled": b.rt.compile,
            "params": sum(p.numel() for p in b.model.parameters()),
            "measured_batch_tokens": b.batch_tokens, "batch_scale": b.batch_tokens / b.schedule.train_batch_tokens,
            "step_ms": 1000 * step_s, "train_tokens_per_s": b.batch_tokens / step_s,
            "projected_step_ms": 1000 * full_step_s, "gpus": args.gpus,
            "projected_steps_in_cap": (int(b.schedule.max_wallclock_seconds / full_step_s)
                                       if b.schedule.max_wallclock_seconds > 0 else "no cap"),
            "eval_standard_tokens_per_s": std_rate, "eval_sliding_tokens_per_s": sliding_rate,
            "projected_full_val_standard_s": FINEWEB_VAL_TARGETS / std_rate / args.gpus,
            "projected_full_val_sliding_s": FINEWEB_VAL_TARGETS / sliding_rate / args.gpus,
            "eval_seq_len": b.eval_seq_len, "stride": b.stride,
            "export_s": export_s, "artifact_model_bytes": artifact_bytes,
            "eval_ttt_tokens_per_s": ttt_rate if ttt_rate is not None else float("nan"),
            "projected_full_val_ttt_s": FINEWEB_VAL_TARGETS / ttt_rate / args.gpus if ttt_rate else float("nan"),
        })
        if ttt_rate and FINEWEB_VAL_TARGETS / ttt_rate / args.gpus > 600 and b.rt.device.type == "cuda":
            print(f"warning: the TTT eval projects to {FINEWEB_VAL_TARGETS / ttt_rate / args.gpus:.0f} s on "
                  f"{args.gpus} GPUs, over the 600 s eval budget", file=sys.stderr)
    return {"results": results, "ratios": ratios(results) if len(results) > 1 else None}


def ratios(results: list[dict]) -> dict:
    a, b = results
    keys = ("step_ms", "eval_standard_tokens_per_s", "eval_sliding_tokens_per_s", "export_s", "artifact_model_bytes")
    return {k: b[k] / a[k] if a[k] else float("nan") for k in keys}


def format_table(out: dict) -> str:
    rows = [
        ("params", "{:,}", "params"), ("device", "{}", "device"), ("compiled step", "{}", "compiled"),
        ("measured batch tokens", "{:,}", "measured_batch_tokens"),
        ("batch scale vs config", "{:.4f}", "batch_scale"), ("train step (median)", "{:.1f} ms", "step_ms"),
        ("train tokens/s", "{:,.0f}", "train_tokens_per_s"), ("projected step on N GPUs", "{:.1f} ms", "projected_step_ms"),
        ("N GPUs", "{}", "gpus"), ("projected steps in cap", "{}", "projected_steps_in_cap"),
        ("eval seq_len / stride", "{}", "eval_seq_len"), ("standard eval tokens/s", "{:,.0f}", "eval_standard_tokens_per_s"),
        ("sliding eval tokens/s", "{:,.0f}", "eval_sliding_tokens_per_s"),
        ("full val, standard (N GPUs)", "{:.1f} s", "projected_full_val_standard_s"),
        ("full val, sliding (N GPUs)", "{:.1f} s", "projected_full_val_sliding_s"),
        ("TTT eval tokens/s", "{:,.0f}", "eval_ttt_tokens_per_s"),
        ("full val, TTT (N GPUs)", "{:.1f} s", "projected_full_val_ttt_s"),
        ("export time", "{:.2f} s", "export_s"), ("artifact model bytes", "{:,}", "artifact_model_bytes"),
    ]
    res = out["results"]
    lines = ["config: " + " | ".join(r["overrides"] for r in res)]
    for label, fmt, key in rows:
        cells = [fmt.format(r[key]) if key != "eval_seq_len" else f"{r['eval_seq_len']} / {r['stride']}" for r in res]
        if out["ratios"] and key in out["ratios"]:
            cells.append(f"x{out['ratios'][key]:.3f}")
        lines.append(f"{label:<30}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, as for run.py")
    p.add_argument("--compare", default=None, help="a second config's overrides, in quotes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpus", type=int, default=8, help="GPU count for the projections")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per measured step (default: 1/8 of the "
                   "config's batch on CUDA, 4 sequences on CPU)")
    p.add_argument("--doc-tokens", type=int, default=None, help="mean document length of the synthetic tokens "
                   "(a BOS with probability 1/N at each position; default: uniform random tokens)")
    p.add_argument("--eval-windows", type=int, default=64, help="eval_seq_len-long blocks of synthetic val tokens")
    p.add_argument("--eval-rounds", type=int, default=3, help="evals of each config (alternated; medians)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's); 1 gives stable "
                   "figures on a shared machine")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--reference", metavar="CHECKOUT", default=None, help="time pgolf against the records' scripts "
                   "of an openai/parameter-golf checkout instead (python -m pgolf.bench_reference, default options)")
    args = p.parse_args(argv)
    if args.reference:
        from pgolf.bench_reference import main as reference_main

        return reference_main([args.reference] + (["--json", args.json] if args.json else []))
    try:
        with cpu_threads(args.threads):
            out = run(args)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
