"""Training on packed documents: one row per micro-batch, segments cut as #1530 cuts them.

With document attention (`model.attention.doc_attention`), the records from 2026-04-10 #1530
(VarLenAttn, `DocumentPackingLoader` + `_build_cu_seqlens`) train on one packed row per rank
and micro-step: the rank's contiguous span of `local_tokens` is x of shape (1, local_tokens),
and attention runs within segments. A segment starts at every BOS and at the span's first
position, and a document longer than `train_seq_len` is cut every `train_seq_len` tokens from
its own start (`max_doc_len`). Viewing the span as (B, seq_len) rows instead would cut every
document that crosses a row edge, so the tokens after the edge lose their context.

`PackedRows` wraps a loader whose span is contiguous (`sequential`, `documents`) and gives
(1, N) batches plus the segment starts of the last batch; `docs.segment_mask` turns them into
the attention mask of the device's kernel. Loaders of independent windows (`coprime`,
`shuffled`) have no context before a window to keep: their rows stay rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.model.docs import segment_mask

CONTIGUOUS_LOADERS = ("sequential", "documents")


def segment_starts(x: Tensor, bos_id: int, max_doc_len: int) -> Tensor:
    """Segment starts of one packed span, #1530's `_build_cu_seqlens` as a mask: (N,) ids ->
    (N,) bool, True at position 0, at every BOS, and every `max_doc_len` tokens after each
    document's start (the span's first position counts as one)."""
    n = x.numel()
    pos = torch.arange(n, device=x.device)
    bos = x.reshape(-1) == bos_id
    bos[0] = True  # the span's first token starts a segment whatever it is
    doc_start = torch.cummax(torch.where(bos, pos, torch.zeros_like(pos)), dim=0).values
    return (pos - doc_start) % max_doc_len == 0


class PackedRows:
    """A contiguous loader's micro-batches as one packed row (1, N) each, with the segment
    starts of the last batch in `last_segments` (1, N) bool and its BOS positions in
    `last_starts` (1, N) bool. Documents are cut every `seq_len` tokens of the call, so the
    segments follow a progressive length (#2014 cuts at its current length). State (resume) is
    the wrapped loader's."""

    def __init__(self, loader, *, bos_id: int, max_doc_len: int):
        self.loader, self.bos_id, self.max_doc_len = loader, bos_id, max_doc_len
        self.last_segments: Tensor | None = None
        self.last_starts: Tensor | None = None

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        x, y = self.loader.next_batch(global_tokens, seq_len, grad_accum_steps)
        self.max_doc_len = seq_len  # the length of this step: progressive context (#2014) changes it
        x, y = x.reshape(1, -1), y.reshape(1, -1)  # (B, T) views of one contiguous span -> (1, B*T)
        self.last_starts = x == self.bos_id
        self.last_segments = segment_starts(x, self.bos_id, self.max_doc_len).view(1, -1)
        return x, y

    def doc_mask(self, backend: str):
        """The last batch's attention mask for `backend` (docs.segment_mask)."""
        return segment_mask(self.last_segments, self.last_starts, backend, max_seqlen=self.max_doc_len)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def pack_documents(loader, model, kind: str, seq_len: int):
    """The training loader a model needs: packed (`PackedRows`) under document attention when
    the loader's span is contiguous, else the loader itself."""
    if getattr(model, "doc_attention", False) and kind in CONTIGUOUS_LOADERS:
        return PackedRows(loader, bos_id=model.bos_id, max_doc_len=seq_len)
    return loader
