"""Phased TTT: LoRA TTT with global full-model SGD phases (#1610 `eval_val_ttt_phased`; multi-phase
global SGD #1626, 2026-04-14; one phase in #2014/#2135).

Run the LoRA queue (lora.py). Phase boundaries are prefix * (k + 1) / P documents for k < P
(`phased_ttt_prefix_docs`, `phased_ttt_num_phases`). Once the documents of the queue scored so far
reach a boundary, every rank pauses; the base model trains on the first `boundary` of the scored
documents in #1626's order (batch index before the length sort, then position in the batch), their
tokens concatenated: chunks of `global_ttt_chunk_tokens`, cosine lr over chunks, SGD(momentum),
`global_ttt_epochs` passes over rows of the eval length (documents kept apart by the document
mask, segments of at most the eval length, as #1626's cu_seqlens), gradient clip, the last chunk
never trained on (#1626's `train_val_ttt_global_sgd_distributed`). Then fresh adapters (a new draw
of A) and the queue resumes with the updated base model. Every trained target was scored before
(the Scorer checks it); the only pairs that are not validation targets are the BOS -> BOS joins
between concatenated documents.

Deterministic ranks: the pause comes after the queue item that reaches the boundary on every rank
(#1626's ranks kept scoring until a shared pause file appeared, so the pre-phase set depended on
timing); the training rows of each global batch are split across ranks (common.sgd_step). As in
#1626, a rank packs its rows into one row under the document mask, so a document cut by a row
boundary attends across it within a rank only: with more than one row per global batch the
global phase (and so the score) depends on the world size; `global_ttt_batch_seqs=1` does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pgolf.errors import PgolfError
from pgolf.ttt.common import TTTRuntime, cosine_lr, sgd_step, split_rows
from pgolf.ttt.lora import LoRARun, LoRATTT
from pgolf.ttt.scorer import Scorer


@dataclass(frozen=True, kw_only=True)
class PhasedTTT(LoRATTT):
    """eval.ttt for `conf/eval/ttt_phased.yaml`: LoRATTT's options plus the global phases.
    Defaults: #1626 (prefix 2000 docs, 3 phases, lr 0.001, 1 epoch, momentum 0.9, 32 rows/batch)."""

    phased_ttt_prefix_docs: int = 2000
    phased_ttt_num_phases: int = 3
    global_ttt_lr: float = 0.001
    global_ttt_momentum: float = 0.9
    global_ttt_epochs: int = 1
    global_ttt_chunk_tokens: int = 32768
    global_ttt_batch_seqs: int = 32
    global_ttt_grad_clip: float = 1.0
    global_ttt_respect_doc_boundaries: bool = True

    name = "phased"

    def check(self, seq_len: int) -> None:
        super().check(seq_len)
        if self.phased_ttt_num_phases < 1 or self.phased_ttt_prefix_docs < 0:
            raise PgolfError(f"eval.ttt: phased_ttt_num_phases={self.phased_ttt_num_phases} must be >= 1 and "
                             f"phased_ttt_prefix_docs={self.phased_ttt_prefix_docs} >= 0")

    def run(self, model: nn.Module, scorer: Scorer, rt: TTTRuntime, *, seq_len: int, stride: int = 0,
            batch_seqs: int = 0) -> dict[str, float]:
        return PhasedRun(self, model, scorer, rt, seq_len).run()


class PhasedRun(LoRARun):
    def __init__(self, spec: PhasedTTT, model: nn.Module, scorer: Scorer, rt: TTTRuntime, seq_len: int):
        super().__init__(spec, model, scorer, rt, seq_len)
        prefix = max(0, min(len(self.docs), spec.phased_ttt_prefix_docs))
        self.boundaries = [prefix * (k + 1) // spec.phased_ttt_num_phases for k in range(spec.phased_ttt_num_phases)]
        self.boundaries = [b for b in self.boundaries if b > 0] if prefix else []
        self.phase, self.scored_docs = 0, 0
        rt.log(f"ttt_phased: docs:{len(self.docs)} prefix_docs:{prefix} phases:{spec.phased_ttt_num_phases} "
               f"boundaries:{self.boundaries}")

    def after_batch(self, q: int) -> None:
        self.scored_docs += len(self.queue[q][1])
        if self.phase >= len(self.boundaries) or self.scored_docs < self.boundaries[self.phase]:
            return
        boundary = self.boundaries[self.phase]
        with self.timer(f"global_sgd_{self.phase + 1}"):
            scored = sorted((orig, k, doc) for orig, batch in self.queue[:q + 1] for k, doc in enumerate(batch))
            docs = [doc for _, _, doc in scored[:boundary]]
            self.rt.log(f"ttt_phased: phase:{self.phase + 1}/{len(self.boundaries)} scored_docs:{self.scored_docs} "
                        f"trained_docs:{len(docs)}")
            self.adapters.enabled = False  # the base model trains alone
            self.global_sgd(docs)
        self.phase += 1
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fresh_adapters()  # #1626 rebuilds the LoRA (a new draw of A) and its optimizer

    def global_sgd(self, docs: list[tuple[int, int]]) -> None:
        spec, rt, model, scorer = self.spec, self.rt, self.model, self.scorer
        positions = torch.cat([torch.arange(s, s + n) for s, n in docs])  # stream index of each token
        tokens = scorer.stream[positions.to(scorer.stream.device)]
        scorer.sync()
        seq_len, total = self.seq_len, tokens.numel() - 1
        num_chunks = (total + spec.global_ttt_chunk_tokens - 1) // spec.global_ttt_chunk_tokens
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=spec.global_ttt_lr, momentum=spec.global_ttt_momentum)
        model.train()
        for ci in range(num_chunks - 1):  # the last chunk is never trained on (#1626)
            first = ci * spec.global_ttt_chunk_tokens
            n_rows = (min(first + spec.global_ttt_chunk_tokens, total) - first) // seq_len
            for g in opt.param_groups:
                g["lr"] = cosine_lr(spec.global_ttt_lr, ci, num_chunks)
            for _ in range(spec.global_ttt_epochs):
                for b in range(0, n_rows, spec.global_ttt_batch_seqs):
                    rows_b = min(spec.global_ttt_batch_seqs, n_rows - b)
                    lo, hi = split_rows(rows_b, rt.rank, rt.world_size)
                    a, e = first + (b + lo) * seq_len, first + (b + hi) * seq_len
                    src = positions[a:e + 1]
                    inside = src[1:] == src[:-1] + 1  # pairs inside one document = validation targets
                    scorer.update(src[:-1][inside])
                    rows = [tokens[a + r * seq_len: a + (r + 1) * seq_len + 1].long() for r in range(hi - lo)]
                    sgd_step(model, params, opt, rows, rows_b * seq_len, rt, spec.global_ttt_grad_clip,
                             docs_bos=model.bos_id if spec.global_ttt_respect_doc_boundaries else None,
                             max_len=seq_len)
        model.eval()
