"""Document-independent batched LoRA TTT (2026-04-10 #1530 `eval_val_ttt_lora`; all top records).

The validation stream is split at BOS into documents (each document's span ends with the next
document's BOS as its last target, #1530's `_find_docs`; a stream not starting with BOS gets a
leading fragment as its own document so every target is scored). Documents are sorted by length,
cut into batches of `ttt_batch_size`, and the batches queued longest first. Each batch gets fresh
adapters (adapters.py) and a fresh AdamW. Each document is read in chunks of `chunk` targets: for
chunk i the input is the last `ttt_eval_seq_len` tokens of the document up to the chunk's end
(its own context only); one forward scores the chunk's targets through the Scorer, then, for
documents with chunks left, the mean loss over the chunk (summed over documents) takes one AdamW
step on the adapters. The base weights stay frozen. A document's last chunk is never trained on.

Ranks take batches round-robin in queue order, so which rank scores a document never depends on
timing; A's draws follow the queue on every rank (a rank draws, and drops, the adapters of the
batches it skips), so 2 ranks score exactly what 1 rank does. Later knobs: LoRA alpha (#1767),
warm-start A (#1767: only B is zeroed between batches, which makes the adapters depend on the
rank's earlier documents), adapter masks (#1953 `TTT_MASK`), local LR multiplier (#1953), short-
document chunk sizes by batch length (#2014 `TTT_SHORT_SCORE_FIRST_STEPS=256:8,2000:24`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.ttt.adapters import KINDS, MASKS, DocAdapters
from pgolf.ttt.common import PhaseTimer, TTTRuntime
from pgolf.ttt.run import TTTVariant
from pgolf.ttt.scorer import Scorer, at_least_fp32


def find_docs(stream: Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, length) per document: from a BOS to the next BOS inclusive (the last one to the end)."""
    bos = torch.nonzero(stream == bos_id).squeeze(1).tolist()
    if not bos or bos[0] != 0:
        bos = [0, *bos]
    ends = [b + 1 for b in bos[1:]] + [stream.numel()]
    return [(s, e - s) for s, e in zip(bos, ends) if e - s >= 2]


def ttt_queue(docs: list[tuple[int, int]], batch_size: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """#1530's `_build_ttt_global_batches`: sort by length, batch, longest batch first (stable);
    items are (batch index before the sort, [(start, length), ...])."""
    by_len = sorted(docs, key=lambda d: d[1])
    batches = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
    return sorted(enumerate(batches), key=lambda ib: -max(n for _, n in ib[1]))


def parse_short_steps(spec: str) -> list[tuple[int, int]]:
    """'256:8,2000:24' -> [(256, 8), (2000, 24)]: batches whose longest document is <= 256 tokens use
    chunks of 8, <= 2000 chunks of 24 (#2014)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            length, chunk = (int(v) for v in item.split(":"))
        except ValueError:
            raise PgolfError(f"eval.ttt.ttt_short_chunk_steps={spec!r}: expected 'LEN:CHUNK,...' like '256:8,2000:24'") from None
        if length <= 0 or chunk <= 0:
            raise PgolfError(f"eval.ttt.ttt_short_chunk_steps={spec!r}: lengths and chunks must be positive")
        out.append((length, chunk))
    return sorted(out)


@dataclass(frozen=True, kw_only=True)
class LoRATTT(TTTVariant):
    """eval.ttt for `conf/eval/ttt_lora.yaml`; names are the records' TTT_* variables lower-cased.
    Defaults: #1530 (rank 96, lr 1e-4, chunk 32, batch 64, AdamW beta1 0, WD 0.5, no alpha scale).
    `ttt_eval_seq_len` None: the eval's context length (eval.seq_len)."""

    ttt_lora_rank: int = 96
    ttt_lora_lr: float = 1e-4
    ttt_lora_alpha: float | None = None
    ttt_chunk_size: int = 32
    ttt_eval_seq_len: int | None = None
    ttt_batch_size: int = 64
    ttt_grad_steps: int = 1
    ttt_beta1: float = 0.0
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = 0.5
    ttt_mask: str = "all"
    ttt_k_lora: bool = True
    ttt_mlp_lora: bool = True
    ttt_o_lora: bool = True
    ttt_local_lr_mult: float = 1.0
    ttt_warm_start_a: bool = False
    ttt_short_chunk_steps: str = ""

    name = "lora"

    def check(self, seq_len: int) -> None:
        if self.ttt_mask not in MASKS:
            raise PgolfError(f"eval.ttt.ttt_mask={self.ttt_mask!r} is not one of {', '.join(MASKS)}")
        if min(self.ttt_chunk_size, self.ttt_batch_size, self.ttt_lora_rank) < 1 or self.ttt_grad_steps < 1:
            raise PgolfError("eval.ttt: ttt_chunk_size, ttt_batch_size, ttt_lora_rank, ttt_grad_steps must be >= 1")
        if (self.ttt_eval_seq_len or seq_len) < self.ttt_chunk_size:
            raise PgolfError(f"eval.ttt.ttt_eval_seq_len={self.ttt_eval_seq_len or seq_len} is shorter than a chunk "
                             f"({self.ttt_chunk_size}); a chunk must fit in its window")
        parse_short_steps(self.ttt_short_chunk_steps)

    def kinds(self) -> tuple[str, ...]:
        off = set(MASKS[self.ttt_mask])
        off |= {k for k, on in (("k", self.ttt_k_lora), ("mlp", self.ttt_mlp_lora), ("o", self.ttt_o_lora)) if not on}
        return tuple(k for k in KINDS if k not in off)

    def chunk_for(self, longest: int) -> int:
        for length, chunk in parse_short_steps(self.ttt_short_chunk_steps):
            if longest <= length:
                return chunk
        return self.ttt_chunk_size

    def new_adapters(self, model: nn.Module, bsz: int) -> DocAdapters:
        return DocAdapters(model, bsz, rank=self.ttt_lora_rank, kinds=self.kinds(), alpha=self.ttt_lora_alpha)

    def optimizer(self, adapters: DocAdapters) -> torch.optim.Optimizer:
        return torch.optim.AdamW(adapters.parameters(), lr=self.ttt_lora_lr * self.ttt_local_lr_mult,
                                 betas=(self.ttt_beta1, self.ttt_beta2), eps=1e-10, weight_decay=self.ttt_weight_decay)

    def run(self, model: nn.Module, scorer: Scorer, rt: TTTRuntime, *, seq_len: int, stride: int = 0,
            batch_seqs: int = 0) -> dict[str, float]:
        """Score the whole stream with per-document LoRA TTT; returns the seconds per phase."""
        return LoRARun(self, model, scorer, rt, seq_len).run()


class LoRARun:
    """One pass of the LoRA TTT queue (phased.py extends it with global phases)."""

    def __init__(self, spec: LoRATTT, model: nn.Module, scorer: Scorer, rt: TTTRuntime, seq_len: int):
        self.spec, self.model, self.scorer, self.rt = spec, model, scorer, rt
        self.window = spec.ttt_eval_seq_len or seq_len
        self.seq_len = seq_len
        self.docs = find_docs(scorer.stream.cpu(), model.bos_id)
        self.queue = ttt_queue(self.docs, spec.ttt_batch_size)
        self.timer = PhaseTimer(rt.device)
        self.adapters: DocAdapters | None = None

    def fresh_adapters(self) -> None:
        """(Re)build the reusable full-size adapters (#1530: once at the start; #1626: after a phase)."""
        if self.adapters is not None:
            self.adapters.remove()
        self.adapters = self.spec.new_adapters(self.model, self.spec.ttt_batch_size).to(self.rt.device)

    def adapters_for(self, bsz: int) -> DocAdapters:
        """#1530: reuse (reset) the full-size adapters, or draw new ones for a short batch."""
        if bsz == self.adapters.bsz:
            self.adapters.reset(self.spec.ttt_warm_start_a)
            return self.adapters
        self.adapters.enabled = False
        return self.spec.new_adapters(self.model, bsz).to(self.rt.device)

    def run(self) -> dict[str, float]:
        spec, rt = self.spec, self.rt
        rt.log(f"ttt_lora:start docs:{len(self.docs)} batches:{len(self.queue)} rank:{spec.ttt_lora_rank} "
               f"lr:{spec.ttt_lora_lr * spec.ttt_local_lr_mult} chunk:{spec.ttt_chunk_size} window:{self.window} "
               f"adapters:{','.join(spec.kinds())}+head alpha:{spec.ttt_lora_alpha} warm_a:{spec.ttt_warm_start_a}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.fresh_adapters()
        try:
            for q, (orig, batch) in enumerate(self.queue):
                with self.timer("score_and_adapt"):
                    adapters = self.adapters_for(len(batch))  # every rank draws, in queue order
                    try:
                        if q % rt.world_size == rt.rank:
                            self.batch(adapters, batch)
                    finally:
                        if adapters is not self.adapters:
                            adapters.remove()
                            self.adapters.enabled = True
                self.after_batch(q)
        finally:
            self.adapters.remove()
            for p in self.model.parameters():
                p.requires_grad_(True)
        return self.timer.seconds

    def after_batch(self, q: int) -> None:
        """Hook for phased TTT (runs on every rank after queue item q)."""

    def batch(self, adapters: DocAdapters, batch: list[tuple[int, int]]) -> None:
        spec, rt, scorer = self.spec, self.rt, self.scorer
        opt = spec.optimizer(adapters)
        chunk = spec.chunk_for(max(n for _, n in batch))
        pred = [n - 1 for _, n in batch]
        nchunks = [(p + chunk - 1) // chunk for p in pred]
        starts = torch.tensor([s for s, _ in batch], device=rt.device)
        for ci in range(max(nchunks)):
            # The generic window of chunk ci (#1530's context_size); a document's last chunk may end earlier.
            ctx = min((ci + 1) * chunk, self.window)
            win, off, clen = [], [], []
            for p, nc in zip(pred, nchunks):
                end = p if ci == nc - 1 else (ci + 1) * chunk
                w0 = max(0, end - self.window)
                active = ci < nc
                win.append(w0 if active else 0)
                off.append(ci * chunk - w0 if active else 0)
                clen.append(end - ci * chunk if active else 0)
            train = torch.tensor([ci < nc - 1 for nc in nchunks], device=rt.device)
            win_t, off_t, clen_t = (torch.tensor(v, device=rt.device) for v in (win, off, clen))
            cols = torch.arange(ctx, device=rt.device)
            wlen = torch.clamp(torch.minimum(off_t + clen_t, torch.full_like(off_t, ctx)), min=0)
            idx = (starts + win_t)[:, None] + cols  # (B, ctx) stream positions of the inputs
            valid = cols[None, :] < wlen[:, None]
            x = torch.where(valid, scorer.stream[idx.clamp(max=scorer.num_targets)].long(), 0)
            c = torch.arange(chunk, device=rt.device)
            sel = (off_t[:, None] + c).clamp(max=ctx - 1)  # (B, chunk) window columns of the chunk
            keep = c[None, :] < clen_t[:, None]
            for step in range(spec.ttt_grad_steps):
                with torch.set_grad_enabled(bool(train.any())), rt.autocast():
                    h = self.model.hidden(x)  # (B, ctx, D), adapters hooked in
                    hc = h.gather(1, sel[:, :, None].expand(-1, -1, h.size(-1)))  # (B, chunk, D)
                    logits = self.model.logits(hc, adapters.head_delta(hc))  # (B, chunk, V)
                if step == 0:
                    nll = scorer.score(idx.gather(1, sel)[keep], logits[keep])
                else:  # further steps on the same, already scored chunk (TTT_GRAD_STEPS)
                    y = scorer.stream[idx.gather(1, sel)[keep] + 1].long()
                    nll = torch.nn.functional.cross_entropy(at_least_fp32(logits[keep]), y, reduction="none")
                if not bool(train.any()):
                    break
                per_tok = torch.zeros(keep.shape, device=rt.device, dtype=nll.dtype).masked_scatter(keep, nll)
                loss = (per_tok.sum(1) / chunk * train).sum()
                scorer.update(idx.gather(1, sel)[keep & train[:, None]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
