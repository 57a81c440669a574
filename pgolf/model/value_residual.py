"""Value residual (VR): every attention reuses the raw values v0 of the first layer.

The first virtual layer's attention (physical 0; with depth recurrence still physical 0, whose
first pass is the first virtual layer: no record combines VR with recurrence) stores its raw
values v0 (B, T, Hkv, D), taken after the value embedding and before any mixing; every later
attention mixes them into its own v before RoPE/SDPA/XSA, as the records do:

- `lambda` (2026-03-23 #549, `VALUE_RESIDUAL=1`): v <- lam[0]*v0 + lam[1]*v, `vr_lambda` (2,) per
  layer, init [0.5, 0.5];
- `sigmoid` (2026-03-25 ValCalib_GPTQ_XSA_BigramHash3072, "PR #569 style"): v <- v + sigmoid(a)*v0,
  `vrl_alpha` (1,) per layer, init 0.

Every layer holds its parameter (`blocks.{i}.attn.vr_lambda` / `.vrl_alpha`), the first one
unused, as in the records. Both forms act per token (v0 at the same position), so nothing crosses
a document under doc attention. Off in every record run (VALUE_RESIDUAL=0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pgolf.model.roles import CONTROL, set_role

VALUE_RESIDUALS = ("none", "lambda", "sigmoid")


class LayerValues(NamedTuple):
    """What one attention call adds to its values: the value embedding (B, T, kv_dim) or None, and
    the forward's shared store of v0 (empty until the first attention with VR has run)."""
    ve: Tensor | None
    v0: list[Tensor]


class LambdaResidual:
    """#549: v <- lam[0]*v0 + lam[1]*v, v and v0 (B, T, Hkv, D); `vr_lambda` (2,) init [0.5, 0.5]."""

    def __init__(self):
        self.lam = nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float32))
        self.members = {"vr_lambda": (self.lam, CONTROL)}

    form = "lambda"

    def __call__(self, v: Tensor, v0: Tensor) -> Tensor:
        lam = self.lam.to(dtype=v.dtype)
        return lam[0] * v0 + lam[1] * v


class SigmoidResidual:
    """03-25: v <- v + sigmoid(alpha)*v0, v and v0 (B, T, Hkv, D); `vrl_alpha` (1,) init 0."""

    def __init__(self):
        self.alpha = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.members = {"vrl_alpha": (self.alpha, CONTROL)}

    form = "sigmoid"

    def __call__(self, v: Tensor, v0: Tensor) -> Tensor:
        return v + torch.sigmoid(self.alpha.to(dtype=v.dtype)) * v0


VR_DESCRIPTIONS = {"lambda": "value residual v <- l0*v0 + l1*v on every attention (2026-03-23 #549)",
                "sigmoid": "value residual v <- v + sigmoid(a)*v0 on every attention (2026-03-25, PR #569 style)"}


def add_value_residual_params(attn: nn.Module, form: str) -> None:
    """Give one attention module its record's VR part (`attn.value_residual`), whose parameter the
    attention registers under the record's name (`vr_lambda` / `vrl_alpha`)."""
    part = {"none": None, "lambda": LambdaResidual, "sigmoid": SigmoidResidual}[form]
    attn.value_residual = part and part()
    for name, (param, role) in (attn.value_residual.members.items() if attn.value_residual else ()):
        setattr(attn, name, param)
        set_role(attn, name, role)


def value_residual(part, v: Tensor, store: list[Tensor]) -> Tensor:
    """The first call stores v as v0 and returns it unchanged; later calls mix v0 in with `part`."""
    if not store:
        store.append(v)
        return v
    return part(v, store[0])
