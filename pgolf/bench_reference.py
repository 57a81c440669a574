"""pgolf against the records' own scripts, in one process: `python -m pgolf.bench_reference CHECKOUT`.

"At least as fast as a hand-written record script" has to be measured, so this imports the
scripts of an openai/parameter-golf checkout by path and times them against pgolf on
identical weights and tokens, alternating the two call by call and reporting medians:

- train step: the baseline `train_gpt.py` GPT with its Muon and fused Adam split against
  pgolf's GPT and Optimizers, CPU fp32. pgolf runs twice: its default (Newton-Schulz in fp32
  on CPU) and with bf16 Newton-Schulz, the baseline's numerics, whose weights must then be
  bit-identical to the baseline's after the same steps;
- sliding eval: PR #192's `eval_val_sliding` on its GPT against `pgolf.evaluate.eval_sliding`
  on pgolf's `record_11l_qat_smeargate` model, same weights, seq_len, stride and batch;
- export: PR #192's int6 exporter + zstd-22 against pgolf's export of the same preset on
  the record's 11-layer state dict (26.5M parameters, random weights): seconds and bytes,
  after checking that both hold the same quantized values.

PR #192 lives on its PR branch: `git fetch origin pull/192/head` and check out its record
folder into the checkout. CPU only, one thread by default: on a shared machine,
multi-threaded kernels stall under contention and make ratios noise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

import torch

from pgolf.bench import cpu_threads
from pgolf.build import build, compose, to_container
from pgolf.errors import PgolfError
from pgolf.evaluate import ByteLUTs, eval_sliding
from pgolf.model import GPT, from_flat
from pgolf.optim import Optimizers
from pgolf.quant import quantize_state_dict, serialize

BASELINE = "train_gpt.py"
RECORD_192 = "records/track_10min_16mb/2026-03-20_11L_QAT_SmearGate_WD038/train_gpt.py"
PRESET_192 = "experiment=record_11l_qat_smeargate"
CPU = torch.device("cpu")


def load_script(checkout: Path, rel: str) -> ModuleType:
    """Import a record script by path (its module-level hyperparameters read the environment)."""
    path = checkout / rel
    if not path.exists():
        hint = " (PR #192: git fetch origin pull/192/head, check out its record folder)" if rel == RECORD_192 else ""
        raise PgolfError(f"{path} not found; pass a checkout of openai/parameter-golf{hint}")
    spec = importlib.util.spec_from_file_location(f"reference_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alternate(fns: dict[str, Callable[[int], object]], rounds: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function, called in turn (order reversed every round), on `clock`
    (wall time by default; `time.process_time` gives the process's CPU seconds, which a loaded
    machine's scheduling does not inflate)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + rounds):
        for name, fn in (list(fns.items()) if i % 2 else list(fns.items())[::-1]):
            t = clock()
            fn(i)
            if i >= warmup:
                times[name].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def random_weights(model: torch.nn.Module, std: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


# -----------------------------
# TRAIN STEP
# -----------------------------


def train_step(baseline: ModuleType, *, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
               seq_len: int, batch_seqs: int, rounds: int) -> dict:
    """Baseline GPT + Muon + fused Adam against pgolf's, on one batch, from the same weights."""
    shape = dict(vocab_size=1024, num_layers=num_layers, model_dim=model_dim, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, mlp_mult=2, tie_embeddings=True, tied_embed_init_std=0.005,
                 logit_softcap=30.0, rope_base=10000.0, qk_gain_init=1.5)
    torch.manual_seed(0)
    ours = GPT(**from_flat(shape))
    ours_bf16 = copy.deepcopy(ours)
    theirs = baseline.GPT(**shape)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    opt, opt_bf16 = Optimizers(ours, ns_dtype="fp32"), Optimizers(ours_bf16, ns_dtype="bf16")
    # The baseline's split (embedding / block matrices / scalars) at its learning rates, which
    # are pgolf's defaults: map each pgolf group onto the baseline model's parameters by name.
    name_of = {id(p): n for n, p in ours_bf16.named_parameters()}
    params = dict(theirs.named_parameters())
    on_theirs = lambda o: [{"params": [params[name_of[id(p)]] for p in g["params"]], "lr": g["lr"]}  # noqa: E731
                           for g in o.param_groups]
    adam = dict(betas=opt_bf16.token.defaults["betas"], eps=opt_bf16.token.defaults["eps"], fused=True)
    muon = baseline.Muon(on_theirs(opt_bf16.muon)[0]["params"], lr=opt_bf16.muon.defaults["lr"],
                         momentum=opt_bf16.muon_momentum, backend_steps=opt_bf16.muon.defaults["backend_steps"])
    theirs_opts = [torch.optim.Adam(on_theirs(opt_bf16.token), **adam), muon,
                   torch.optim.Adam(on_theirs(opt_bf16.scalar), **adam)]
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 1024, (batch_seqs, seq_len), generator=g) for _ in range(2))

    def pgolf_step(model: GPT, optimizers: Optimizers) -> Callable[[int], None]:
        def step(i: int) -> None:
            model(x, y).backward()
            optimizers.step(i, 1.0)
        return step

    def baseline_step(i: int) -> None:  # as the baseline's loop: momentum warmup, then every optimizer
        for group in muon.param_groups:
            group["momentum"] = opt_bf16.momentum_at(i)
        theirs(x, y).backward()
        for o in theirs_opts:
            o.step()
        for o in theirs_opts:
            o.zero_grad(set_to_none=True)

    med = alternate({"pgolf": pgolf_step(ours, opt), "pgolf_bf16_ns": pgolf_step(ours_bf16, opt_bf16),
                     "baseline": baseline_step}, rounds)
    same = all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours_bf16.state_dict().items())
    return {"shape": f"{num_layers}x{model_dim}, {batch_seqs} x {seq_len} tok", "pgolf_ms": 1000 * med["pgolf"],
            "pgolf_bf16_ns_ms": 1000 * med["pgolf_bf16_ns"], "baseline_ms": 1000 * med["baseline"],
            "ratio": med["pgolf"] / med["baseline"], "ratio_bf16_ns": med["pgolf_bf16_ns"] / med["baseline"],
            "bf16_ns_weights_identical": same, "steps": rounds + 1}


# -----------------------------
# SLIDING EVAL
# -----------------------------


def sliding(record: ModuleType, *, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
            seq_len: int, stride: int, batch_seqs: int, num_targets: int, rounds: int) -> dict:
    """PR #192's sliding eval on its GPT against pgolf's on the preset's GPT, same weights and tokens."""
    cfg = compose([PRESET_192, f"model.num_layers={num_layers}", f"model.model_dim={model_dim}",
                   f"model.num_heads={num_heads}", f"model.num_kv_heads={num_kv_heads}", "logger=none"])
    ours = build(cfg, "model")
    ours.load_state_dict(random_weights(ours, 0.05, seed=0), strict=True)
    m = to_container(cfg)["model"]
    a = m["attention"]
    theirs = record.GPT(**{k: m[k] for k in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads",
                                             "tie_embeddings")}, tied_embed_init_std=m["init"]["tied_embed_init_std"],
                        logit_softcap=m["head"]["logit_softcap"], rope_base=a["rope_base"], qk_gain_init=a["qk_gain_init"],
                        mlp_mult=int(m["mlp"]["mlp_mult"]), smear_gate=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    vocab = m["vocab_size"]
    val = torch.randint(0, vocab, (num_targets + 1,), generator=g)
    luts = ByteLUTs(torch.randint(1, 5, (vocab,), generator=g, dtype=torch.int16), torch.rand(vocab, generator=g) < 0.3,
                    torch.arange(vocab) < 4)
    out: dict[str, tuple[float, float]] = {}

    def run_ours(i: int) -> None:
        out["pgolf"] = eval_sliding(ours, val, luts, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs, rank=0,
                                    world_size=1, device=CPU, dtype=torch.float32)

    def run_theirs(i: int) -> None:
        # Its progress lines go to stdout; its CUDA autocast warns and turns itself off on CPU.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["record"] = record.eval_val_sliding(
                SimpleNamespace(train_seq_len=seq_len), theirs, 0, 1, CPU, val, luts.base_bytes,
                luts.has_leading_space, luts.is_boundary, stride=stride, batch_seqs=batch_seqs)

    med = alternate({"pgolf": run_ours, "record": run_theirs}, rounds)
    return {"shape": f"{num_layers}x{model_dim}, T {seq_len}/{stride}, B {batch_seqs}",
            "val_targets": num_targets, "pgolf_s": med["pgolf"], "record_s": med["record"],
            "ratio": med["pgolf"] / med["record"], "pgolf_bpb": out["pgolf"][1], "record_bpb": out["record"][1]}


# -----------------------------
# EXPORT
# -----------------------------


def alternate_clocks(fns: dict[str, Callable[[int], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Min and median of each function's wall and CPU seconds (`time.process_time`: every thread of
    this process), both read around every call, the functions called in turn, order reversed every
    round. Noise only ever adds time, so the minimum is the robust figure for "no slower"."""
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for i in range(rounds):
        for name, fn in (list(fns.items()) if i % 2 else list(fns.items())[::-1]):
            w, c = time.perf_counter(), time.process_time()
            fn(i)
            times[name]["cpu"].append(time.process_time() - c)
            times[name]["wall"].append(time.perf_counter() - w)
    return {k: {f"{clock}_{stat}": f(v[clock]) for clock in ("wall", "cpu")
                for stat, f in (("min", min), ("median", statistics.median))} for k, v in times.items()}


def export(record: ModuleType, *, num_layers: int, rounds: int, own_rounds: int = 9) -> dict:
    """PR #192's int6 + zstd-22 export against pgolf's on the record's state dict shapes.

    Two measurements, each alternating the sides call by call: the whole exports (`rounds`
    calls each), and each side's own steps with the one big compression call answered from a
    cache (`own_rounds` calls each): quantize, torch.save, pgolf's per-tensor estimate and write.
    The totals differ by the own steps plus the difference of the two compression calls."""
    import zstandard

    from pgolf.quant import artifact

    cfg = compose([PRESET_192, f"model.num_layers={num_layers}", "model.init.ortho_init=false", "logger=none"])
    model = build(cfg, "model")
    state = random_weights(model, 0.02, seed=3)
    quant = build(cfg, "quant")
    fp16_names = {"tok_emb.weight"}  # the record's FP16_EMBED=1, as the preset
    ours_obj, _ = quantize_state_dict(state, rules=quant.plan)
    theirs_obj, _ = record.quantize_state_dict_int6(state, fp16_names=fp16_names)
    same = all(all(torch.equal(ours_obj[part][k], theirs_obj[part][k]) for k in theirs_obj[part])
               and set(ours_obj[part]) == set(theirs_obj[part]) for part in ("quantized", "scales", "passthrough"))
    buf = io.BytesIO()
    torch.save(theirs_obj, buf)
    raw = buf.getvalue()
    same_raw = serialize(ours_obj) == raw
    sizes: dict[str, int] = {}
    cached: dict[str, bytes] = {}
    compress = artifact.compress

    def their_zstd(data: bytes) -> bytes:  # the record's call
        return cached["record"] if "record" in cached else zstandard.ZstdCompressor(level=22).compress(data)

    def our_zstd(data: bytes, **kw) -> bytes:  # the artifact's call; the cache answers only it, not the estimates
        return cached["pgolf"] if "pgolf" in cached and kw.get("level") == quant.level else compress(data, **kw)

    with tempfile.TemporaryDirectory() as d:
        def run_ours(i: int) -> None:
            sizes["pgolf"] = quant.export(state, Path(d) / "pgolf.ptz").total_bytes

        def run_theirs(i: int) -> None:  # the record's sequence: quantize, torch.save, zstd-22, write
            obj, _ = record.quantize_state_dict_int6(state, fp16_names=fp16_names)
            buf = io.BytesIO()
            torch.save(obj, buf)
            (Path(d) / "record.ptz").write_bytes(their_zstd(buf.getvalue()))
            sizes["record"] = (Path(d) / "record.ptz").stat().st_size

        total = alternate_clocks({"pgolf": run_ours, "record": run_theirs}, rounds)
        cached["pgolf"], cached["record"] = (Path(d) / "pgolf.ptz").read_bytes(), (Path(d) / "record.ptz").read_bytes()
        artifact.compress = our_zstd
        try:
            own = alternate_clocks({"pgolf": run_ours, "record": run_theirs}, own_rounds)
        finally:
            artifact.compress = compress
    frames = {k: zstandard.get_frame_parameters(v) for k, v in cached.items()}
    same_raw_back = zstandard.ZstdDecompressor().decompress(cached["pgolf"]) == raw
    out = {"params": sum(v.numel() for v in state.values()), "codec": f"{quant.compressor}-{quant.level}",
           "same_quantized_values": same, "same_bytes_before_compression": same_raw,
           "pgolf_artifact_decompresses_to_record_bytes": same_raw_back, "pgolf_bytes": sizes["pgolf"],
           "record_bytes": sizes["record"], "rounds": rounds, "own_rounds": own_rounds,
           "window_bytes": {k: f.window_size for k, f in frames.items()},
           "content_size": {k: f.content_size for k, f in frames.items()}}
    for part, med in (("total", total), ("own", own)):
        for key in med["pgolf"]:
            out[f"{part}_{key}"] = {"pgolf": med["pgolf"][key], "record": med["record"][key],
                                    "ratio": med["pgolf"][key] / med["record"][key]}
    return out


# -----------------------------
# COMMAND
# -----------------------------


def run(args: argparse.Namespace) -> dict:
    checkout = Path(args.checkout)
    baseline, record = load_script(checkout, BASELINE), load_script(checkout, RECORD_192)
    t = time.perf_counter()
    out = {"threads": args.threads, "torch": torch.__version__}
    if not args.export_only:
        out["train_step"] = train_step(baseline, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, seq_len=128,
                                       batch_seqs=4, rounds=args.rounds)
        out["sliding_eval"] = sliding(record, num_layers=3, model_dim=256, num_heads=4, num_kv_heads=2,
                                   seq_len=args.eval_seq_len, stride=64, batch_seqs=32,
                                      num_targets=args.eval_targets, rounds=args.rounds)
    if args.export_layers:
        out["export"] = export(record, num_layers=args.export_layers, rounds=args.export_rounds,
                               own_rounds=args.export_own_rounds)
    out["wall_s"] = time.perf_counter() - t
    return out


def format_table(out: dict) -> str:
    lines = [f"pgolf vs the records' scripts, CPU, {out['threads']} thread(s), torch {out['torch']}"]
    if "train_step" in out:
        ts, sw = out["train_step"], out["sliding_eval"]
        lines += [f"{'medians':<44}{'pgolf':>14}{'reference':>14}{'ratio':>9}",
                  f"{'train step ' + ts['shape']:<44}{ts['pgolf_ms']:>11.1f} ms{ts['baseline_ms']:>11.1f} ms"
                  f"{ts['ratio']:>9.3f}",
                  f"{'  with bf16 Newton-Schulz (baseline math)':<44}{ts['pgolf_bf16_ns_ms']:>11.1f} ms{'':>14}"
                  f"{ts['ratio_bf16_ns']:>9.3f}",
                  f"{'  weights bit-identical to the baseline':<44}{str(ts['bf16_ns_weights_identical']):>14}",
                  f"{'sliding eval ' + sw['shape']:<44}{sw['pgolf_s']:>12.2f} s{sw['record_s']:>12.2f} s{sw['ratio']:>9.3f}",
                  f"{'  bpb (scoring rules differ slightly)':<44}{sw['pgolf_bpb']:>14.5f}{sw['record_bpb']:>14.5f}"]
    if "export" in out:
        ex = out["export"]
        lines += [f"{'export ' + format(ex['params'], ',') + ' params, int6 ' + ex['codec']:<44}"
                  f"{'pgolf':>14}{'record':>14}{'ratio':>9}"]
        for part, label in (("total", f"whole export x{ex['rounds']}"),
                            ("own", f"own steps x{ex['own_rounds']} (zstd cached)")):
            for key in ("cpu_min", "cpu_median", "wall_min", "wall_median"):
                r = ex[f"{part}_{key}"]
                lines.append(f"{'  ' + label + ', ' + key.replace('_', ' '):<44}{r['pgolf']:>12.2f} s"
                             f"{r['record']:>12.2f} s{r['ratio']:>9.3f}")
        lines += [f"{'  artifact bytes':<44}{ex['pgolf_bytes']:>14,}{ex['record_bytes']:>14,}"
                  f"{ex['pgolf_bytes'] / ex['record_bytes']:>9.4f}",
                  f"{'  same quantized values / same raw bytes':<44}{str(ex['same_quantized_values']):>14}"
                  f"{str(ex['same_bytes_before_compression']):>14}",
                  f"{'  zstd window bytes':<44}{ex['window_bytes']['pgolf']:>14,}{ex['window_bytes']['record']:>14,}"]
    lines.append(f"wall {out['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.bench_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", help="an openai/parameter-golf checkout holding PR #192's record folder")
    p.add_argument("--rounds", type=int, default=9, help="timed calls of each side (train step, sliding eval)")
    p.add_argument("--export-rounds", type=int, default=3, help="whole exports of each side, alternating")
    p.add_argument("--export-own-rounds", type=int, default=9, help="each side's export without its zstd call")
    p.add_argument("--export-only", action="store_true", help="skip the train-step and sliding-eval comparisons")
    p.add_argument("--export-layers", type=int, default=11, help="0 skips the export comparison")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-targets", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
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
