"""Document-aware attention: no query attends across a BOS boundary (`model.attention.doc_attention`).

The training and validation streams are documents packed back to back, each one starting with
BOS (id `bos_id`, 1 for the challenge's SentencePiece models). With doc attention on, a BOS
starts its document: doc_id = cumsum(ids == bos_id) along T, the BOS position belongs to the new
document (as #1530's `_build_cu_seqlens`, 2026-04-10_VarLenAttn). A row (B, T) is a segment on
its own, so a document longer than T, or one cut by a row boundary, is cut into segments there.

Three kernels give the same mask, chosen from the device once per forward (`build_doc_mask`):
- `varlen` (CUDA with FlashAttention importable): `flash_attn_varlen_func` on the flattened
  batch (B*T, H, D) with cu_seqlens = the segment starts (BOS positions and row starts) and the
  total, as #1530. cu_seqlens has the static length B*T + 1, padded by repeating the total (empty
  segments, #1530's padding rule), so torch.compile sees one shape. A loader that knows its
  documents can pass a tighter DocMask to `GPT.hidden(..., docs=)` instead.
- `flex` (CUDA without FlashAttention): a `flex_attention` BlockMask, causal and same document.
- `sdpa` (CPU): SDPA under a boolean mask, causal and same document, built per block of
  queries from the (B, T) segment ids (`sdpa_doc_attention`): a row of T <= SDPA_QUERY_BLOCK
  is one (B, 1, T, T) mask; a longer row (#1626's global SGD packs 32 rows of 2,048 into one)
  is cut into query blocks whose keys start at most `max_seqlen` - 1 before the block, so the
  memory is O(T * (block + max_seqlen)) instead of O(T^2) (a 32K x 32K mask was 18.5 GB).

The mask only forbids; it never reorders the keys a query sees, so a document packed after
others scores what it scores alone up to float rounding (tests/test_doc_attention.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf.errors import PgolfError

try:  # FlashAttention 3 (Hopper), then 2; the CUDA varlen kernel of #1530
    from flash_attn_interface import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None

DOC_BACKENDS = ("varlen", "flex", "sdpa")


class DocMask(NamedTuple):
    """What each query may see, built once per forward and shared by every layer.

    `starts` (B, T) bool is True at a BOS (a document's first position); the embedding-path
    parts (SmearGate, BigramHash) treat it like position 0. Exactly one of `segment_ids` (sdpa,
    (B, T) int32 segment index), `block_mask` (flex) or `cu_seqlens` (varlen, int32 (B*T+1,)) is
    set, except for sdpa rows that each hold one segment (the per-document TTT windows): eager
    code then leaves `segment_ids` None and takes the causal kernel, 2-3x faster on CPU than a
    mask (under torch.compile the mask stays, a static graph); `max_seqlen`: the longest segment
    (at most T)."""

    backend: str
    starts: Tensor
    segment_ids: Tensor | None = None
    block_mask: object | None = None
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0


def doc_backend(device: torch.device) -> str:
    """The kernel for `device`: varlen (CUDA + FlashAttention), flex (CUDA), sdpa (otherwise)."""
    if device.type == "cuda":
        return "varlen" if flash_attn_varlen_func is not None else "flex"
    return "sdpa"


def doc_ids(ids: Tensor, bos_id: int) -> Tensor:
    """Document index of every position within its row: (B, T) -> (B, T) int, cumsum(ids == bos)."""
    return torch.cumsum((ids == bos_id).to(torch.int32), dim=1)


def segment_cu_seqlens(starts: Tensor) -> Tensor:
    """cu_seqlens over the flattened batch: segment starts (BOS positions and row starts), the
    total N = B*T, then N repeated to the static length N + 1. (B, T) bool -> (N + 1,) int32."""
    B, T = starts.shape
    seg = starts.clone()
    seg[:, 0] = True
    n = B * T
    pos = torch.arange(n, device=starts.device, dtype=torch.int32)
    first = torch.where(seg.reshape(-1), pos, torch.full_like(pos, n))
    return torch.cat([torch.sort(first).values, first.new_full((1,), n)])


def build_doc_mask(ids: Tensor, bos_id: int, backend: str | None = None) -> DocMask:
    """The document mask of token ids (B, T) for `backend` (default: from the device)."""
    starts = ids == bos_id
    return segment_mask(starts, starts, backend or doc_backend(ids.device))


def segment_mask(segments: Tensor, starts: Tensor, backend: str, max_seqlen: int | None = None) -> DocMask:
    """The mask of segments (B, T) bool, True where a segment starts (a row start is one too):
    causal attention within each segment. `starts` (B, T) bool marks the BOS positions the
    embedding-path parts restart at (a segment may also start mid-document: #1530 cuts a
    document every train_seq_len tokens, and SmearGate does not restart there). `max_seqlen`:
    the longest segment, for the varlen kernel (default T)."""
    B, T = segments.shape
    if backend == "varlen":
        return DocMask(backend, starts, cu_seqlens=segment_cu_seqlens(segments), max_seqlen=max_seqlen or T)
    doc = torch.cumsum(segments.to(torch.int32), dim=1)  # (B, T) segment index
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b, h, q, kv):
            return (q >= kv) & (doc[b, q] == doc[b, kv])

        return DocMask(backend, starts, block_mask=create_block_mask(same_doc_causal, B, None, T, T,
                                                                     device=segments.device), max_seqlen=T)
    if backend == "sdpa":  # the mask itself is built per query block in sdpa_doc_attention
        if not torch.compiler.is_compiling() and not bool(segments[:, 1:].any()):
            return DocMask(backend, starts, max_seqlen=T)  # one segment a row: the plain causal kernel
        return DocMask(backend, starts, segment_ids=doc, max_seqlen=min(max_seqlen or T, T))
    raise PgolfError(f"doc attention backend {backend!r} is not one of {', '.join(DOC_BACKENDS)}")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, docs: DocMask | None) -> Tensor:
    """Causal attention, within documents when `docs` is given: q (B, H, T, D), k, v (B, Hkv, T, D)
    -> (B, T, H, D). Without docs it is the baseline's SDPA call, unchanged."""
    gqa = k.size(1) != q.size(1)
    if docs is None or (docs.backend == "sdpa" and docs.segment_ids is None):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    if docs.backend == "sdpa":
        return sdpa_doc_attention(q, k, v, docs.segment_ids, docs.max_seqlen)
    if docs.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=docs.block_mask, enable_gqa=gqa).transpose(1, 2)
    B, H, T, D = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise PgolfError(f"FlashAttention varlen needs bf16/fp16 activations, got {q.dtype}; use dtype=bf16 "
                         "or uninstall flash-attn to fall back to flex_attention")
    flat = lambda t: t.transpose(1, 2).reshape(B * T, t.size(1), D)  # noqa: E731  (B*T, heads, D)
    y = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_seqlens_q=docs.cu_seqlens, cu_seqlens_k=docs.cu_seqlens,
                               max_seqlen_q=docs.max_seqlen, max_seqlen_k=docs.max_seqlen, causal=True)
    y = y[0] if isinstance(y, tuple) else y  # some FA3 builds return (out, lse)
    return y.reshape(B, T, H, D)


SDPA_QUERY_BLOCK = 2048  # rows up to this length take one dense (B, 1, T, T) mask


def sdpa_doc_attention(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, max_seqlen: int,
                       block: int | None = None) -> Tensor:
    """Causal attention within segments by SDPA under a boolean mask, one block of queries at a
    time: q (B, H, T, D), k, v (B, Hkv, T, D), segment_ids (B, T) -> (B, T, H, D). Segments are at
    most `max_seqlen` long, so queries [q0, q1) see keys in [q0 - max_seqlen + 1, q1) only; every
    bound is static (one graph under torch.compile). Peak mask memory B * block * (block +
    max_seqlen) bools instead of B * T^2; a row no longer than `block` is today's single mask."""
    B, H, T, D = q.shape
    block = block or SDPA_QUERY_BLOCK
    gqa = k.size(1) != H
    pos = torch.arange(T, device=q.device)
    out = []
    for q0 in range(0, T, block):
        q1 = min(q0 + block, T)
        k0 = 0 if T <= block else max(0, q0 - max_seqlen + 1)
        causal = pos[q0:q1, None] >= pos[None, k0:q1]  # (Tq, Tk)
        same = segment_ids[:, q0:q1, None] == segment_ids[:, None, k0:q1]  # (B, Tq, Tk)
        mask = (causal & same)[:, None]  # (B, 1, Tq, Tk)
        out.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=mask,
                                                  enable_gqa=gqa))
    return torch.cat(out, dim=2).transpose(1, 2)
