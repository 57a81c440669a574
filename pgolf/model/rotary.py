"""Rotary position embeddings: full or partial (`rope_dims`), with the NTK base rescale.

Partial RoPE (2026-03-21 #315, all later records): only the first `rope_dims` of each head's
dims rotate, half-split inside that slice (x1 = dims[:rd/2], x2 = dims[rd/2:rd]); the rest
carry no position. NTK rescale: when the forward length T exceeds `train_seq_len` L, the base
becomes base * (T/L)^(rd/(rd-2)). The 2026-03-20..03-31 records build their Rotary for L=1024
while training at 2048, so the rescale is always on there (`rope_train_seq_len=1024`
reproduces them); it is also the NTK-aware way to evaluate past the training length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_tables(seq_len: int, rope_dims: int, base: float, device: torch.device,
                  train_seq_len: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (1, 1, T, rope_dims/2) for positions 0..T-1.

    Computed once per forward and shared by the layers (compile folds it), instead of the
    baseline's Python-side cache, which is state that torch.compile must guard. `seq_len` is a
    static int under compile, so the NTK branch is resolved at trace time.
    """
    if train_seq_len and seq_len > train_seq_len:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos()[None, None], freqs.sin()[None, None]


def describe_rope(rope_dims: int, head_dim: int, train_seq_len: int) -> str | None:
    """One line for the record README (None for full RoPE without rescale)."""
    parts = []
    if rope_dims < head_dim:
        parts.append(f"partial RoPE on {rope_dims} of {head_dim} head dims (2026-03-21 #315)")
    if train_seq_len:
        parts.append(f"NTK base rescale past {train_seq_len} tokens")
    return "; ".join(parts) or None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2*cos.size(-1) dims of x (..., D); the rest pass through unchanged."""
    rd = 2 * cos.size(-1)
    if rd < x.size(-1):
        return torch.cat((apply_rotary(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    half = rd // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)
