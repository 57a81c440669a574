"""Chunked score-first full-model SGD (PR #461 -> 2026-03-23 #549 `eval_val_sliding_ttt` ->
04-06..04-09 `eval_val_ttt`).

The validation stream is cut into chunks of `ttt_chunk_tokens` targets. Each sliding window
(length L = the eval context, stride S) belongs to the chunk holding its first scored target.
For chunk c: (1) score its windows with the current weights through the Scorer; (2) unless it is
the last chunk, train every unfrozen parameter on the chunk's tokens as rows of L tokens,
`ttt_epochs` passes, SGD(momentum) at lr_c = ttt_lr * (1 + cos(pi c / (C - 1))) / 2, gradients
clipped to `ttt_grad_clip`. Every target of chunks <= c is scored before the step on chunk c
(a window scores only targets at or after its first scored one), so C3 holds; the Scorer checks it.

Differences from 03-23's code, on purpose: every target is scored once (its window filter scored
the last ~L - S targets up to L/S - 1 extra times, the tail bug fixed in #1218); frozen blocks
freeze the whole physical block (its banked model froze only the block's scalars, since the
matrices live in banks outside `blocks.{i}`); rows split across ranks per global batch
(common.sgd_step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pgolf.errors import PgolfError
from pgolf.evaluate import sliding_windows
from pgolf.ttt.common import PhaseTimer, TTTRuntime, cosine_lr, sgd_step, split_rows
from pgolf.ttt.run import TTTVariant
from pgolf.ttt.scorer import Scorer


@dataclass(frozen=True, kw_only=True)
class ChunkedSGD(TTTVariant):
    """eval.ttt for `conf/eval/ttt_sgd.yaml`; names are the records' TTT_* variables lower-cased.
    Defaults: 2026-03-23 #549 (lr 0.002; 0.005 from 04-06), run with TTT_FREEZE_BLOCKS=0."""

    ttt_lr: float = 0.002
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32768
    ttt_freeze_blocks: int = 0
    ttt_momentum: float = 0.9
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0

    name = "chunked_sgd"

    def check(self, seq_len: int) -> None:
        if self.ttt_chunk_tokens < 1 or self.ttt_epochs < 0 or self.ttt_batch_seqs < 1 or self.ttt_lr < 0:
            raise PgolfError(f"eval.ttt: chunk_tokens={self.ttt_chunk_tokens}, epochs={self.ttt_epochs}, "
                             f"batch_seqs={self.ttt_batch_seqs}, lr={self.ttt_lr} must be >=1, >=0, >=1, >=0")

    def run(self, model: nn.Module, scorer: Scorer, rt: TTTRuntime, *, seq_len: int, stride: int,
            batch_seqs: int = 32) -> dict[str, float]:
        """Score the whole stream with TTT; returns the seconds per phase (score, train)."""
        n = scorer.num_targets
        seq_len = min(seq_len, n)
        starts, offsets = sliding_windows(n, seq_len, stride)
        num_chunks = (n + self.ttt_chunk_tokens - 1) // self.ttt_chunk_tokens
        chunk_windows: list[list[int]] = [[] for _ in range(num_chunks)]
        for w, (ws, off) in enumerate(zip(starts, offsets)):
            chunk_windows[min((ws + off) // self.ttt_chunk_tokens, num_chunks - 1)].append(w)
        frozen = tuple(f"blocks.{i}." for i in range(self.ttt_freeze_blocks))
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
            if p.requires_grad:
                params.append(p)
        rt.log(f"ttt_sgd:start chunks:{num_chunks} chunk_tokens:{self.ttt_chunk_tokens} windows:{len(starts)} "
               f"stride:{stride} lr:{self.ttt_lr} epochs:{self.ttt_epochs} freeze_blocks:{self.ttt_freeze_blocks} "
               f"trainable:{sum(p.numel() for p in params)}")
        opt = torch.optim.SGD(params, lr=self.ttt_lr, momentum=self.ttt_momentum)
        timer = PhaseTimer(rt.device)
        stream = scorer.stream
        for ci in range(num_chunks):
            with timer("score"):
                wins = chunk_windows[ci]
                lo, hi = split_rows(len(wins), rt.rank, rt.world_size)
                self._score(model, scorer, rt, [starts[w] for w in wins[lo:hi]], [offsets[w] for w in wins[lo:hi]],
                            seq_len, batch_seqs)
            if ci == num_chunks - 1 or self.ttt_epochs == 0:
                continue
            with timer("train"):
                first = ci * self.ttt_chunk_tokens
                scorer.sync(first, min(first + self.ttt_chunk_tokens, n))
                n_rows = (min(first + self.ttt_chunk_tokens, n) - first) // seq_len
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(self.ttt_lr, ci, num_chunks)
                model.train()
                for _ in range(self.ttt_epochs):
                    for b in range(0, n_rows, self.ttt_batch_seqs):
                        rows_b = min(self.ttt_batch_seqs, n_rows - b)
                        lo, hi = split_rows(rows_b, rt.rank, rt.world_size)
                        a = first + (b + lo) * seq_len
                        scorer.update(torch.arange(a, first + (b + hi) * seq_len))
                        rows = [stream[a + r * seq_len: a + (r + 1) * seq_len + 1].long() for r in range(hi - lo)]
                        sgd_step(model, params, opt, rows, rows_b * seq_len, rt, self.ttt_grad_clip)
                model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        return timer.seconds

    @torch.no_grad()
    def _score(self, model: nn.Module, scorer: Scorer, rt: TTTRuntime, starts: list[int], offsets: list[int],
               seq_len: int, batch_seqs: int) -> None:
        model.eval()
        pos = torch.arange(seq_len, device=rt.device)
        for b in range(0, len(starts), batch_seqs):
            ws = torch.tensor(starts[b:b + batch_seqs], device=rt.device)
            off = torch.tensor(offsets[b:b + batch_seqs], device=rt.device)
            idx = ws[:, None] + pos  # (B, T) positions of the inputs = target positions
            with rt.autocast():
                h = model.hidden(scorer.stream[idx].long())  # (B, T, D)
            keep = pos[None, :] >= off[:, None]
            with rt.autocast():
                logits = model.logits(h[keep])
            scorer.score(idx[keep], logits)

