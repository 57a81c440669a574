"""Batched per-document LoRA adapters, one per **virtual** layer slot, attached from outside.

#1530's BatchedTTTLoRA (2026-04-10, `BatchedLinearLoRA`): every document of a TTT batch has its
own adapters, A (B, r, in) ~ U(+-1/sqrt(in)), B (B, out, r) = 0, so delta(x) = (x A^T) B^T per
row, times alpha/r from #1767 (`TTT_LORA_ALPHA`; none in #1530). Per virtual slot s (encoder
then decoder positions of the looped schedule, `GPT.plans`): q, k, v on the attention's
normalised input n (added to c_q/c_k/c_v's outputs); "o" maps n to the attention output (added
after the output projection, before attn_scale); "mlp" maps the MLP's normalised input to its
output; plus one LM-head adapter (final hidden -> vocab, added before the softcap,
`GPT.logits(h, head_delta)`).

The record re-implemented its blocks for this (`_block_with_lora`) and later records lost a gate
that way (#1787). Here the adapters are forward hooks on the model's own modules: a looped
module is called once per pass, and a per-module call counter (reset by a pre-hook on
`tok_emb`, which every forward calls first) picks the slot's adapter. The draw order of A
matches #1530 exactly (head, then q, v, k, mlp, o over slots), so the same RNG gives the same
adapters. Masks (#1953 `TTT_MASK`): which of q/k/v/o/mlp exist.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError

KINDS = ("q", "v", "k", "mlp", "o")  # #1530's draw order after the head
MASKS = {"all": (), "no_qv": ("q", "v"), "no_q": ("q",), "no_v": ("v",), "no_k": ("k",)}


class BatchedLoRA(nn.Module):
    """Per-row low-rank delta (B, T, in) -> (B, T, out): (x A^T) B^T * scale."""

    def __init__(self, bsz: int, in_features: int, out_features: int, rank: int, scale: float = 1.0):
        super().__init__()
        self.bound = 1.0 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(bsz, rank, in_features).uniform_(-self.bound, self.bound))
        self.B = nn.Parameter(torch.zeros(bsz, out_features, rank))
        self.scale = scale

    @torch.no_grad()
    def reset(self, warm_start_a: bool = False) -> None:
        if not warm_start_a:
            self.A.uniform_(-self.bound, self.bound)
        self.B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = (x @ self.A.to(x.dtype).transpose(1, 2)) @ self.B.to(x.dtype).transpose(1, 2)
        return out * self.scale if self.scale != 1.0 else out


def slot_modules(model: nn.Module) -> list[dict[str, nn.Module]]:
    """Per virtual slot (in forward order), the module each adapter kind hooks: q/k/v -> the
    physical attention's c_q/c_k/c_v, o -> the attention module called there (input n, output
    after proj), mlp -> the MLP (or untied repeat MLP) called there."""
    encoder, decoder = model.plans[model.loop_passes]
    slots = []
    for b, i, r in (*encoder, *decoder):
        lin, mlp = model.blocks[i].attn, model.blocks[i].mlp if r < 0 else model.repeat_mlp[r]
        attn_on = model.blocks[b].attn_enabled
        slots.append({"q": lin.c_q if attn_on else None, "k": lin.c_k if attn_on else None,
                      "v": lin.c_v if attn_on else None, "o": model.blocks[b].attn if attn_on else None, "mlp": mlp})
    return slots


class DocAdapters(nn.Module):
    """The TTT adapters of one batch of `bsz` documents on `model` (hooks attached until `remove()`).

    `kinds`: which of q/k/v/o/mlp (the head adapter always exists); `alpha` None: no alpha/r scale.
    """

    def __init__(self, model: nn.Module, bsz: int, *, rank: int, kinds: tuple[str, ...], alpha: float | None = None):
        super().__init__()
        if rank <= 0:
            raise PgolfError(f"eval.ttt.ttt_lora_rank={rank} must be positive")
        self.bsz = bsz
        scale = 1.0 if alpha is None else alpha / rank
        dim = model.tok_emb.embedding_dim
        slots = slot_modules(model)
        self.head = BatchedLoRA(bsz, dim, model.tok_emb.num_embeddings, rank, scale)
        self.loras = nn.ModuleDict()
        for kind in KINDS:
            if kind not in kinds:
                continue
            self.loras[kind] = nn.ModuleList(
                BatchedLoRA(bsz, dim, self._out(slot[kind]), rank, scale) if slot[kind] is not None else nn.Identity()
                for slot in slots)
        self._slots = slots
        self._handles: list = []
        self._calls: dict[int, int] = {}
        self.enabled = True  # off while another batch's adapters run (a short batch's own set)
        self._attach(model)

    @staticmethod
    def _out(module: nn.Module) -> int:
        """Output width: a linear's out_features; the attention's and MLP's model dim."""
        if hasattr(module, "out_features"):
            return module.out_features
        if hasattr(module, "num_heads"):
            return module.num_heads * module.head_dim
        return module.proj.out_features

    def _attach(self, model: nn.Module) -> None:
        per_module: dict[int, tuple[nn.Module, list[tuple[str, int]]]] = {}
        for s, slot in enumerate(self._slots):
            for kind in self.loras:
                if slot[kind] is not None:
                    per_module.setdefault(id(slot[kind]), (slot[kind], []))[1].append((kind, s))
        calls = self._calls

        def reset(_mod, _args):
            calls.clear()

        self._handles.append(model.tok_emb.register_forward_pre_hook(reset))
        for key, (module, uses) in per_module.items():
            # one module may carry several kinds (never here) and several slots (looped layers)
            def hook(mod, args, out, key=key, uses=uses):
                if not self.enabled:
                    return out
                k = calls.get(key, 0)
                calls[key] = k + 1
                kind, s = uses[k]
                return out + self.loras[kind][s](args[0]).to(out.dtype)

            self._handles.append(module.register_forward_hook(hook))

    def head_delta(self, h: Tensor) -> Tensor:
        return self.head(h)

    def reset(self, warm_start_a: bool = False) -> None:
        """New documents: B = 0 and (unless warm-starting A, #1767) A redrawn, in #1530's order."""
        self.head.reset(warm_start_a)
        for kind in self.loras:
            for lora in self.loras[kind]:
                if isinstance(lora, BatchedLoRA):
                    lora.reset(warm_start_a)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
