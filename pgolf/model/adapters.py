"""Adapters that attach to a model's linears from outside (test-time training, later issues).

The records re-implemented their blocks for LoRA TTT (`_block_with_lora`) and lost a gate on the
way (2026-04-23 #1787: post-TTT bpb 1.908). Here an adapter is a forward hook on a CastedLinear:
the model runs its one forward path and each adapted linear returns W x + (alpha/r) B A x. B is
zero at attach, so attaching changes nothing until the adapter is trained. Shared (looped) layers
share their adapter across passes here; TTT's batched per-document adapters, one per virtual slot
(#1530), are pgolf/ttt/adapters.py (the same hooks, with a per-module call counter).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.model.linear import CastedLinear

# The linears #1530's batched LoRA adapts (q, k, v, attention output, MLP in and out).
LORA_TARGETS = (".attn.c_q", ".attn.c_k", ".attn.c_v", ".attn.proj", ".mlp.fc", ".mlp.proj")


class LoRA(nn.Module):
    """Low-rank update (..., in) -> (..., out): (alpha/rank) B A x, A ~ kaiming-uniform, B = 0."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.to(x.dtype).t()) @ self.B.to(x.dtype).t() * self.scale


class Adapters(nn.Module):
    """The adapters of one model, keyed by linear name ('.' -> '_'); `remove()` detaches them."""

    def __init__(self):
        super().__init__()
        self.lora = nn.ModuleDict()
        self._handles: list = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_lora(model: nn.Module, *, rank: int = 4, alpha: float | None = None,
                targets: tuple[str, ...] = LORA_TARGETS) -> Adapters:
    """Attach a LoRA to every CastedLinear whose name ends with one of `targets`; returns them.

    Identity at attach (B = 0). The model's own parameters and state_dict are untouched."""
    if rank <= 0:
        raise PgolfError(f"adapter rank={rank} must be positive")
    adapters = Adapters()
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and name.endswith(targets):
            lora = LoRA(module.in_features, module.out_features, rank=rank, alpha=alpha if alpha is not None else rank)
            adapters.lora[name.replace(".", "_")] = lora.to(module.weight.device)

            def hook(mod: nn.Module, args: tuple, out: Tensor, lora: LoRA = lora) -> Tensor:
                return out + lora(args[0]).to(out.dtype)

            adapters._handles.append(module.register_forward_hook(hook))
    if not adapters.lora:
        raise PgolfError(f"no linear of the model matches the adapter targets {targets}")
    return adapters
