"""The token-only causal n-gram tilt (2026-05-01 #2135, code of #2130; lineage #1145 -> #1514).

Hints: one left-to-right pass over the validation stream. For target i the context is the
`token_order - 1` tokens before it; a table keyed by a hash of that context keeps, over the
earlier positions with the same key, how often each next token followed (`total`) and the most
frequent one (`top_tok`, `top_count`; ties keep the earlier). The hint h_i = top_tok fires when
top_count / total >= `token_threshold` (no minimum count: a context seen once fires). Only then
is target i itself counted, so h_i depends on tokens before i only (C1).

Tilt: p'(a) = p(a) * exp(beta * 1[a = h]) / Z, Z = 1 + p(h) (e^beta - 1), over the whole
vocabulary (C2); for the scored token NLL' = NLL - beta * 1[y = h] + log1p(p(h) * expm1(beta)).
The LoRA / SGD steps of TTT keep the untilted loss (#2135 scores only with the tilt).

The record builds the table with a C open-addressing hash table compiled at eval time
(`online_ngram_state.c`, 0.68 us/token) beside a disabled Python word expert (6 us/token): ~200 s
of its 600 s eval. Here the same table is computed in closed form with sorts: a position's
`total` is its rank among earlier positions with the same context key, its pair count the rank
among the same (context, token) key, and `top_count` a segmented running maximum. Same 64-bit
keys (so the same hash collisions) and the same float32 ratio as the record, so the same hints.
Not offered: #1967's within-word and word-start experts, whose gates read the scored token (C1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf.errors import PgolfError

# The record's hash constants (online_ngram_state.c: ROLLING_COEFFS, PAIR_MIX): keys must match its keys.
COEFFS = [
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319,
    2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973]
PAIR_MIX = 1000003
MAX_ORDER = len(COEFFS) + 1


@dataclass(frozen=True)
class Hints:
    """Per-target hints of a stream: `hint` (N,) int64 token id (0 where none), `fired` (N,) bool,
    `top_prob` (N,) float32 (top_count / total, 0 where the context is new)."""

    hint: Tensor
    fired: Tensor
    top_prob: Tensor


def check_tilt_args(token_order: int, token_threshold: float, token_boost: float) -> None:
    """Compose-time check of the eval group's tilt options (one line naming the field and the fix)."""
    if not 1 <= token_order <= MAX_ORDER:
        raise PgolfError(f"eval.token_order={token_order} must be in 1..{MAX_ORDER} (the record's 16)")
    if not 0.0 < token_threshold <= 1.0:
        raise PgolfError(f"eval.token_threshold={token_threshold} must be in (0, 1] (the record's 0.8)")
    if token_boost < 0:
        raise PgolfError(f"eval.token_boost={token_boost} must be >= 0 (the record's 2.625)")


def _ranks(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stable grouping of equal keys: (order, group start flags, rank within group), all in sorted order."""
    sk, order = torch.sort(keys, stable=True)  # equal keys stay in stream order
    new = torch.ones_like(sk, dtype=torch.bool)
    new[1:] = sk[1:] != sk[:-1]
    starts = torch.nonzero(new).flatten()
    rank = torch.arange(len(sk), device=keys.device) - starts[torch.cumsum(new, 0) - 1]
    return order, new, rank


def context_keys(tokens: Tensor, order: int) -> Tensor:
    """The record's key of each target's context: XOR_j ctx[j] * C[j] (j = 0 the oldest of the
    `order - 1` tokens before the target), uint64 arithmetic held in int64 (same bits).
    tokens (N+1,) int64 -> keys (N - max(order - 2, 0),) for the targets with a full context."""
    n_ctx = order - 1
    keys = torch.zeros(len(tokens) - 1 - max(n_ctx - 1, 0), dtype=torch.int64, device=tokens.device)
    for j in range(n_ctx):  # target i's context is tokens[i + 1 - n_ctx .. i]
        keys ^= tokens[j:j + len(keys)] * COEFFS[j]
    return keys


def token_ngram_hints(tokens: Tensor, *, token_order: int = 16, token_threshold: float = 0.8) -> Hints:
    """Hints for the targets tokens[1:] of a stream (N+1,) of token ids < 65536, each from the
    tokens before it only; the record's `build_hints_for_targets` with its word experts off.
    Runs on the tokens' device; the result is on the CPU.

    #2135 seeds its context ring with the first *target* instead of tokens[0]: its hints for
    `targets` equal these on `cat([targets[:1], targets])` (the golden test). Memory ~10 int64
    tensors of N; time ~2 stable sorts of N keys (docs/ttt-tilt.md: 2.6 us/token for 47.85 M tokens on
    one shared EPYC core; on CUDA the stream is on the GPU).
    """
    check_tilt_args(token_order, token_threshold, 0.0)
    toks = torch.as_tensor(tokens).to(torch.int64)
    if toks.numel() and (int(toks.min()) < 0 or int(toks.max()) > 0xFFFF):
        raise PgolfError("n-gram tilt: token ids must fit in uint16 (vocab <= 65536), as in the record")
    n = max(len(toks) - 1, 0)
    hint = torch.zeros(n, dtype=torch.int64, device=toks.device)
    prob = torch.zeros(n, dtype=torch.float32, device=toks.device)
    first = min(max(token_order - 2, 0), n)  # targets before have no full context: no hint, no count
    if first < n:
        ctx = context_keys(toks, token_order)  # (n - first,)
        tok = toks[first + 1:]  # the targets counted
        pair = (ctx * PAIR_MIX) ^ (tok * COEFFS[(token_order - 1) % len(COEFFS)])
        p_order, _, p_rank = _ranks(pair)
        pair_count = torch.empty_like(pair)
        pair_count[p_order] = p_rank + 1  # count of (ctx, tok) after counting this position
        c_order, c_new, total = _ranks(ctx)  # total: earlier positions with this context
        v = pair_count[c_order]
        gid = torch.cumsum(c_new, 0) - 1
        big = len(v) + 1
        run_max = torch.cummax(v + gid * big, 0).values - gid * big  # top_count after each position
        prev_max = torch.where(c_new, 0, torch.roll(run_max, 1))
        setter = c_new | (v > prev_max)  # where top_tok changes (strictly greater, as the record)
        pos = torch.arange(len(v), device=v.device)
        top_at = torch.cummax(torch.where(setter, pos, -1), 0).values
        top_tok = tok[c_order][top_at]
        seen = ~c_new  # the state before this position: the previous position of the same group
        hint[first + c_order] = torch.where(seen, torch.roll(top_tok, 1), 0)
        ratio = prev_max.to(torch.float32) / total.clamp(min=1).to(torch.float32)  # float32, as the record
        prob[first + c_order] = torch.where(seen, ratio, 0.0)
    fired = prob >= torch.tensor(token_threshold, dtype=torch.float32)
    return Hints(torch.where(fired, hint, 0).cpu(), fired.cpu(), prob.cpu())


class NgramTilt:
    """The tilt hook: hints for a whole validation stream, applied to the model's distribution.

    Built inside the eval timer from `val_tokens` (M,) for its M-1 targets (target j predicts
    val_tokens[j+1] from val_tokens[:j+1]). Three views of the same tilt:
    `tilt(logp (N, V), ctx)` is pgolf.ttt.scorer's hook (ctx.positions (N,) target indices, ctx.stream);
    `log_probs(logits (N, V), target_idx (N,))` the tilted log-distribution (N, V) float64;
    `nll(logits, y, target_idx)` the record's closed form for the scored tokens (the sliding eval).
    Counters (`scored`, `fired`, `hits`, `loss_delta` nats) show the switch took effect (`describe`).
    """

    def __init__(self, val_tokens: Tensor, *, token_order: int = 16, token_threshold: float = 0.8,
                 token_boost: float = 2.625):
        t0 = time.perf_counter()
        self.hints = token_ngram_hints(val_tokens, token_order=token_order, token_threshold=token_threshold)
        self.build_s = time.perf_counter() - t0
        self.order, self.threshold, self.beta = token_order, token_threshold, token_boost
        self.reset()

    def reset(self) -> None:
        """Zero the counters (at the start of each scoring pass)."""
        self.scored = self.fired = self.hits = 0
        self.loss_delta = 0.0

    def _gather(self, target_idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        idx = target_idx.reshape(-1).cpu()
        return self.hints.hint[idx].to(device), self.hints.fired[idx].to(device)

    def log_z(self, log_q: Tensor) -> Tensor:
        """log Z = log1p(q (e^beta - 1)) for log q = log p(hint) (any shape, float64)."""
        return torch.log1p(log_q.exp() * math.expm1(self.beta))

    def _tilt(self, logp: Tensor, target_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(tilted log-distribution (N, V) float64, hint (N,), fired (N,)) from log-probs (N, V)."""
        logp = logp.double()
        hint, fired = self._gather(target_idx, logp.device)
        log_z = torch.where(fired, self.log_z(logp.gather(1, hint[:, None]).squeeze(1)), 0.0)
        out = logp - log_z[:, None]  # one (N, V) copy: rows that did not fire are unchanged
        rows = torch.nonzero(fired).squeeze(1)
        out[rows, hint[rows]] += self.beta
        return out, hint, fired

    def _count(self, base: Tensor, out: Tensor, y: Tensor, hint: Tensor, fired: Tensor) -> None:
        self.scored += out.numel()
        self.fired += int(fired.sum())
        self.hits += int((fired & (y == hint)).sum())
        self.loss_delta += float((out - base).sum())

    def __call__(self, logp: Tensor, ctx) -> Tensor:
        """pgolf.ttt.scorer's hook: the tilted log-distribution of targets ctx.positions."""
        pos = ctx.positions.reshape(-1)
        out, hint, fired = self._tilt(logp, pos)
        y = ctx.stream[pos.to(ctx.stream.device) + 1].to(out.device).long()
        self._count(-logp.double().gather(1, y[:, None]).squeeze(1), -out.gather(1, y[:, None]).squeeze(1),
                    y, hint, fired)
        return out

    def log_probs(self, logits: Tensor, target_idx: Tensor) -> Tensor:
        """Tilted log-distribution (N, V) float64: log_softmax + beta at the hint - log Z where fired."""
        return self._tilt(torch.log_softmax(logits.double(), dim=-1), target_idx)[0]

    def nll(self, logits: Tensor, y: Tensor, target_idx: Tensor) -> Tensor:
        """Tilted NLL (N,) float64 of the scored tokens y (N,): the record's closed form."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        hint, fired = self._gather(target_idx, logits.device)
        y = y.reshape(-1)
        base = -logp.gather(1, y[:, None]).squeeze(1)
        tilted = base - self.beta * (y == hint).double() + self.log_z(logp.gather(1, hint[:, None]).squeeze(1))
        out = torch.where(fired, tilted, base)
        self._count(base, out, y, hint, fired)
        return out

    def describe(self) -> str:
        """One log line: the switch, its build time and how often it fired and hit."""
        h = self.hints
        return (f"ngram_tilt:on order:{self.order} threshold:{self.threshold} boost:{self.beta} "
                f"build_s:{self.build_s:.2f} stream_targets:{h.fired.numel()} stream_fired:{int(h.fired.sum())} "
                f"scored:{self.scored} fired:{self.fired} hits:{self.hits} "
                f"mean_nll_delta:{self.loss_delta / max(self.scored, 1):+.6f}")
