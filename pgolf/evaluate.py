"""Validation loss and bits per byte, exactly as the challenge scores them.

bpb is tokenizer-agnostic: each target token is charged the UTF-8 bytes of its piece,
byte-fallback pieces 1 byte, a leading "▁" 1 extra byte only when the previous token is
not a boundary (control/unknown/unused) token, and boundary tokens 0 bytes. Then
val_bpb = (loss_nats / ln 2) * tokens / bytes, accumulated in float64 and summed across
ranks. Byte-count bugs are the most common source of wrong scores in the challenge.

Two scorers share that arithmetic: the baseline's non-overlapping sequences, and the
sliding window of the records (stride 64), here with every target scored exactly once.
Both take `token_bytes`, the CaseOps byte sidecar (PR #1729; int32, aligned with
`val_tokens`, each token's bytes in the original text): when given, target j is charged
`token_bytes[j]` instead of the tables' count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pgolf.errors import PgolfError


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """The eval group: batch sizes, cadence and the sliding window.

    `seq_len` None means the train sequence length. `stride` None scores with
    stride = seq_len (so the sliding figures equal the standard ones); 64 in the records.
    `prequant_sliding` adds a sliding eval of the unquantized weights, for the quantization
    gap under the headline metric; off by default, as in the records, since it is a whole
    extra sliding eval. `ttt`: a test-time-training variant (pgolf/ttt: chunked SGD, LoRA,
    phased; conf/eval/ttt_*.yaml) scored after the quantized sliding eval, or None.
    `ngram_tilt_enabled` tilts the headline score (the TTT score when `ttt` is set, else the
    sliding score) with the token-only n-gram hints of #2135 (pgolf/ttt/ngram.py: `token_order`,
    `token_threshold`, `token_boost`; hints built inside the eval timer).
    """

    val_batch_size: int = 524_288
    val_loss_every: int = 1000
    seq_len: int | None = None
    stride: int | None = 64
    batch_seqs: int = 32
    prequant_sliding: bool = False
    ttt: Any = None
    ngram_tilt_enabled: bool = False
    token_order: int = 16
    token_threshold: float = 0.8
    token_boost: float = 2.625

    def resolve(self, train_seq_len: int) -> tuple[int, int]:
        seq_len = self.seq_len or train_seq_len
        stride = self.stride if self.stride is not None else seq_len
        if seq_len <= 0:
            raise PgolfError(f"eval.seq_len={seq_len} must be positive")
        if stride <= 0 or stride > seq_len:
            raise PgolfError(f"eval.stride={stride} must be in 1..{seq_len} (the eval seq_len); "
                             f"use e.g. eval.stride={min(64, seq_len)} (the records use 64), or null for no overlap")
        if self.batch_seqs <= 0:
            raise PgolfError(f"eval.batch_seqs={self.batch_seqs} must be positive")
        if self.ttt is not None:
            self.ttt.check(seq_len)
        if self.ngram_tilt_enabled:
            from pgolf.ttt.ngram import check_tilt_args

            check_tilt_args(self.token_order, self.token_threshold, self.token_boost)
        return seq_len, stride


@dataclass(frozen=True)
class ByteLUTs:
    base_bytes: Tensor  # (V,) int16: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: Tensor  # (V,) bool
    is_boundary: Tensor  # (V,) bool: control, unknown, unused (and ids past the tokenizer)

    def to(self, device: torch.device | str) -> ByteLUTs:
        return ByteLUTs(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))

    def count(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Bytes charged to each target given its previous token (same shapes, int16)."""
        extra = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids] + extra.to(torch.int16)


def build_byte_luts(sp, vocab_size: int, device: torch.device | str = "cpu") -> ByteLUTs:
    """Per-token byte tables from a SentencePiece model, padded to max(tokenizer, model) vocab."""
    n = int(sp.vocab_size())
    size = max(n, vocab_size)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("▁"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    as_t = lambda a, dt: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
    return ByteLUTs(as_t(base, torch.int16), as_t(space, torch.bool), as_t(boundary, torch.bool))


def bpb(loss_sum: float, tokens: float, num_bytes: float) -> tuple[float, float]:
    """(val_loss nats/token, val_bpb) from float64 sums."""
    loss = loss_sum / tokens
    return loss, loss / math.log(2.0) * tokens / num_bytes


def _all_reduce(*ts: Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in ts:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.inference_mode()
def eval_standard(model, val_tokens: Tensor, luts: ByteLUTs, *, seq_len: int, batch_tokens: int, rank: int,
                  world_size: int, device: torch.device, dtype: torch.dtype,
                  token_bytes: Tensor | None = None) -> tuple[float, float]:
    """The baseline's eval: non-overlapping sequences split by rank, mean loss per batch.

    `model(x, y)` returns a mean loss; `batch_tokens` is the per-rank batch
    (VAL_BATCH_SIZE // (world_size * grad_accum_steps) in the baseline).
    """
    batch_seqs = batch_tokens // seq_len
    if batch_seqs < 1:
        raise PgolfError(f"eval.val_batch_size gives {batch_tokens} tokens per rank, fewer than one sequence "
                         f"of {seq_len}; raise eval.val_batch_size")
    total_seqs = (val_tokens.numel() - 1) // seq_len
    first, last = total_seqs * rank // world_size, total_seqs * (rank + 1) // world_size
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, tokens, bytes
    model.eval()
    for s in range(first, last, batch_seqs):
        e = min(s + batch_seqs, last)
        local = val_tokens[s * seq_len:e * seq_len + 1].to(device=device, dtype=torch.int64, non_blocking=True)
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        with _autocast(device, dtype):
            loss = model(x, y).detach()
        sums[0] += loss.to(torch.float64) * y.numel()
        sums[1] += y.numel()
        if token_bytes is None:
            sums[2] += luts.count(x.reshape(-1), y.reshape(-1)).to(torch.float64).sum()
        else:  # the sidecar entries of the targets y = val_tokens[s*seq_len+1 : e*seq_len+1]
            sums[2] += token_bytes[s * seq_len + 1:e * seq_len + 1].to(torch.float64).sum().to(device)
    model.train()
    _all_reduce(sums)
    return bpb(*sums.tolist())


def sliding_windows(num_targets: int, seq_len: int, stride: int) -> tuple[list[int], list[int]]:
    """Window starts and the offset inside each window where scoring begins.

    Target j (predicting token j+1) is scored exactly once. The first window scores all
    its positions; each later full window scores its last `stride`; a final window ending
    at the last target scores only the targets not yet scored (the tail the records'
    early versions dropped or double-counted).
    """
    if num_targets <= seq_len:
        return [0], [0]
    starts, offsets = [0], [0]
    ws = stride
    while ws + seq_len <= num_targets:
        starts.append(ws)
        offsets.append(seq_len - stride)
        ws += stride
    scored_end = starts[-1] + seq_len
    if scored_end < num_targets:
        starts.append(num_targets - seq_len)
        offsets.append(seq_len - (num_targets - scored_end))
    return starts, offsets


@torch.inference_mode()
def eval_sliding(model, val_tokens: Tensor, luts: ByteLUTs, *, seq_len: int, stride: int, batch_seqs: int, rank: int,
                 world_size: int, device: torch.device, dtype: torch.dtype,
                 token_bytes: Tensor | None = None, tilt=None) -> tuple[float, float]:
    """Sliding-window eval (records of 2026-03-19 on): each target sees >= seq_len - stride context.

    `model.hidden` gives (B, T, D); the vocabulary projection and cross-entropy run only on
    the scored positions: the last `stride` of every window, plus the rest of the first
    window (the records project all T positions of every window, ~T/stride times more).
    Windows are split contiguously by rank, batched `batch_seqs` at a time with a fixed batch
    shape (the last batch padded and masked) so compiled models see one shape. Offsets are
    host-side lists, so the loop never waits on the device. `tilt` (pgolf.ttt.ngram.NgramTilt)
    replaces each scored target's NLL by the tilted one.
    """
    n = val_tokens.numel() - 1
    if n < 1:
        raise PgolfError("validation split has no targets")
    seq_len = min(seq_len, n)
    starts, offsets = sliding_windows(n, seq_len, stride)
    lo, hi = len(starts) * rank // world_size, len(starts) * (rank + 1) // world_size
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    sidecar = None if token_bytes is None else token_bytes.to(device=device, dtype=torch.float64)
    pos = torch.arange(seq_len, device=device)
    tail = max(seq_len - stride, 0)  # every window but the first scores positions [tail, seq_len) at most
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, tokens, bytes
    if tilt is not None:
        tilt.reset()

    def score(h: Tensor, x: Tensor, y: Tensor, keep: Tensor, y_idx: Tensor) -> None:  # h (B, S, D); rest (B, S)
        with _autocast(device, dtype):
            logits = model.logits(h)
        logits = logits.float().reshape(-1, logits.size(-1))
        if tilt is None:
            nll = F.cross_entropy(logits, y.reshape(-1), reduction="none").view_as(y).to(torch.float64)
        else:  # scored positions only; target j predicts stream token j + 1
            nll = torch.zeros(y.shape, dtype=torch.float64, device=device)
            nll[keep] = tilt.nll(logits[keep.reshape(-1)], y[keep], y_idx[keep] - 1)
        sums[0] += (nll * keep).sum()
        sums[1] += keep.sum()
        charged = luts.count(x, y).to(torch.float64) if sidecar is None else sidecar[y_idx]
        sums[2] += (charged * keep).sum()

    model.eval()
    for b in range(lo, hi, batch_seqs):
        ws, off = starts[b:min(b + batch_seqs, hi)], offsets[b:min(b + batch_seqs, hi)]
        pad = batch_seqs - len(ws)  # padded rows repeat the last window and score nothing
        idx = torch.tensor(ws + ws[-1:] * pad, device=device)[:, None] + pos  # (B, T)
        keep = pos >= torch.tensor(off + [seq_len] * pad, device=device)[:, None]  # (B, T)
        x, y = tokens[idx], tokens[idx + 1]
        with _autocast(device, dtype):
            h = model.hidden(x)  # (B, T, D)
        score(h[:, tail:], x[:, tail:], y[:, tail:], keep[:, tail:], idx[:, tail:] + 1)
        early = [i for i, o in enumerate(off) if o < tail]  # the first window only
        if early:
            first = min(off)
            score(h[early, first:tail], x[early, first:tail], y[early, first:tail], keep[early, first:tail],
                  idx[early, first:tail] + 1)
    model.train()
    _all_reduce(sums)
    return bpb(*sums.tolist())
