"""What the TTT variants share: the runtime they are handed, phase timing, and a world-size-
independent gradient step for full-model SGD over rows of validation tokens.

Full-model SGD (the chunked variant, 2026-03-23 #461/#549; the global phases of #1610/#1626)
splits each *global* batch of rows across ranks, each rank sums its rows' token losses divided
by the global batch's token count, and the gradients are summed over ranks: the step equals the
one-rank step up to float summation order, whatever the world size. (The records all-reduce
per-rank mean losses with AVG, which equals it when the rows split evenly, as in their runs.)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.docs import doc_backend, segment_mask
from pgolf.ttt.scorer import at_least_fp32


@dataclass
class TTTRuntime:
    """What a TTT variant runs with (runtime objects, never config): rank, world size, device,
    dtype (bf16/fp16: autocast; fp32, or fp64 for a model cast with .double(): as is), the log
    function and the base model's seed."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    log: Callable[[str], None] = print
    seed: int = 0

    def autocast(self):
        # float32 and float64 (a model cast with .double(), for the world-size tests) run as they are
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype in (torch.bfloat16, torch.float16))

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1


class PhaseTimer:
    """Wall-clock seconds per named phase (score, train, global_sgd, ...), synchronised on CUDA."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def describe(self) -> str:
        return " ".join(f"{k}:{v:.2f}s" for k, v in self.seconds.items())


def cosine_lr(lr: float, ci: int, num_chunks: int) -> float:
    """lr * (1 + cos(pi * ci / (C - 1))) / 2 over chunks (2026-03-23 #549, #1610's global phase)."""
    import math

    return lr * 0.5 * (1.0 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))


def segment_docs(x: Tensor, bos_id: int, max_len: int):
    """Document mask of a flat row x (1, N): a segment starts at every BOS and every `max_len`
    tokens inside a document (#1626's `_build_cu_seqlens(..., max_doc_len=eval_seq_len)`)."""
    starts = (x[0] == bos_id).clone()
    starts[0] = True
    seg = torch.cumsum(starts.long(), 0)
    first = torch.nonzero(starts).squeeze(1)
    offset = torch.arange(x.size(1), device=x.device) - first[seg - 1]
    starts |= (offset % max_len == 0)
    # Segments are at most max_len long: the CPU kernel then keeps its mask O(N * max_len).
    return segment_mask(starts[None], starts[None], doc_backend(x.device), max_seqlen=max_len)


def sgd_step(model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer, rows: list[Tensor],
             total_tokens: int, rt: TTTRuntime, grad_clip: float, docs_bos: int | None = None,
             max_len: int = 0) -> None:
    """One optimizer step on this rank's `rows` (each (T+1,) tokens: x = row[:-1], y = row[1:]) of a
    global batch holding `total_tokens` targets. `docs_bos`: pack the rows into one flat row with a
    document mask (BOS id, segments of at most `max_len`), as #1626's global phase; else (B, T) rows."""
    opt.zero_grad(set_to_none=True)
    if rows:
        with rt.autocast():
            if docs_bos is not None:
                x = torch.cat([r[:-1] for r in rows])[None]
                y = torch.cat([r[1:] for r in rows])[None]
                h = model.hidden(x, segment_docs(x, docs_bos, max_len))
            else:
                x, y = torch.stack([r[:-1] for r in rows]), torch.stack([r[1:] for r in rows])
                h = model.hidden(x)
            logits = model.logits(h)
        loss = F.cross_entropy(at_least_fp32(logits).reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        (loss / total_tokens).backward()
    if rt.distributed:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def split_rows(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of `n_rows` rows."""
    return n_rows * rank // world_size, n_rows * (rank + 1) // world_size
