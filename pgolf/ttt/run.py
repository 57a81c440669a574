"""The trainer's one call into TTT: score the dequantized artifact with the configured variant.

`eval_ttt` builds the Scorer over the validation stream (byte tables or the CaseOps sidecar, as
pgolf.evaluate), runs the variant (`eval.ttt`: chunked.ChunkedSGD, lora.LoRATTT, phased.PhasedTTT),
logs the seconds per phase and the projected time of the full FineWeb validation split on 8 GPUs
of this kind (warning past the 600 s eval budget), writes each rank's ledger to the run directory
(`ttt_ledger.rank{R}.jsonl`, for the audit) and returns (val_loss, val_bpb, figures).
Nothing here runs a compile warm-up or any forward on validation tokens before the Scorer's first
score: every forward of a variant scores or trains on already-scored targets.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import Tensor, nn

import torch

from pgolf.ttt.common import TTTRuntime
from pgolf.ttt.scorer import Scorer, Tilt

FINEWEB_VAL_TARGETS = 62_021_632  # pgolf.bench's full-split figure (SP1024)
EVAL_BUDGET_S = 600.0


def projected_full_val_s(seconds: float, targets: int, world_size: int, gpus: int = 8) -> float:
    """Seconds to score the full validation split on `gpus` devices of this kind, time ~ targets."""
    return seconds * FINEWEB_VAL_TARGETS / max(targets, 1) * world_size / gpus


def eval_ttt(spec, model: nn.Module, val_tokens: Tensor, luts, *, seq_len: int, stride: int, batch_seqs: int,
             rt: TTTRuntime, token_bytes: Tensor | None = None, run_dir: Path | None = None,
             tilt: Tilt | None = None) -> tuple[float, float, dict]:
    """Score `val_tokens` with TTT variant `spec`; (val_loss nats/token, val_bpb, figures)."""
    spec.check(seq_len)
    scorer = Scorer(val_tokens, luts, token_bytes=token_bytes, tilt=tilt)
    t0 = time.perf_counter()
    phases = spec.run(model, scorer, rt, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs)
    loss, bpb = scorer.result()
    seconds = time.perf_counter() - t0
    if run_dir is not None:
        scorer.save_ledger(Path(run_dir) / f"ttt_ledger.rank{rt.rank}.jsonl")
    projected = projected_full_val_s(seconds, scorer.num_targets, rt.world_size)
    rt.log(f"ttt_phases variant:{spec.name} " + " ".join(f"{k}:{v:.2f}s" for k, v in phases.items())
           + f" total:{seconds:.2f}s updates:{scorer.num_updates}")
    rt.log(f"ttt_projection full_val_8x{rt.device.type}:{projected:.1f}s budget:{EVAL_BUDGET_S:.0f}s "
           f"({scorer.num_targets} targets in {seconds:.2f}s on {rt.world_size} rank(s))")
    if rt.device.type == "cuda" and projected > EVAL_BUDGET_S:
        rt.log(f"warning: TTT eval projects to {projected:.0f} s on 8 GPUs, over the {EVAL_BUDGET_S:.0f} s eval budget")
    figures = {"eval/ttt_time_s": seconds, "eval/ttt_projected_8gpu_s": projected, "eval/ttt_updates": scorer.num_updates,
               "eval/ttt_targets": scorer.num_targets}
    figures.update({f"eval/ttt_{k}_s": v for k, v in phases.items()})
    return loss, bpb, figures


class TTTVariant:
    """Base of the eval.ttt options: `evaluate` is what the trainer calls (plain runtime values in),
    so a run without TTT reaches, and bundles, none of this package."""

    name = "ttt"

    def evaluate(self, model: nn.Module, val_tokens: Tensor, luts, *, seq_len: int, stride: int, batch_seqs: int,
                 rank: int, world_size: int, device: torch.device, dtype: torch.dtype, log, seed: int = 0,
                 token_bytes: Tensor | None = None, run_dir: Path | None = None,
                 tilt: Tilt | None = None) -> tuple[float, float, dict]:
        rt = TTTRuntime(rank, world_size, device, dtype, log, seed)
        return eval_ttt(self, model, val_tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs, rt=rt,
                        token_bytes=token_bytes, run_dir=run_dir, tilt=tilt)
