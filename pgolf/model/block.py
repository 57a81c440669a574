"""The transformer block skeleton shared by every record.

x_in = resid_mix[0]*x + resid_mix[1]*x0 (x0 = the normalised embedding); then
x <- x_in + attn_scale * Attn(norm(x_in) * s); x <- x + mlp_scale * MLP(norm(x) * s), where s is
the LN scale 1/sqrt(physical_idx + 1) of 2026-03-21 #315 (1 when `ln_scale` is off). The
residual routings of residual.py call the same three pieces (`mix`, `attn_branch`,
`mlp_branch`), so every design runs the same attention and MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.attention import CausalSelfAttention
from pgolf.model.mlp import MLP


class Block(nn.Module):
    """One physical layer: `attn`, `mlp`, `attn_scale`, `mlp_scale`, `resid_mix` (records' names)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, qk_gain_init: float,
                 qat: dict, *, physical_idx: int = 0, ln_scale: bool = False, attn: dict | None = None,
                 mlp: dict | None = None):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, qk_gain_init, qat, **(attn or {}))
        self.mlp = MLP(dim, mlp_hidden, qat, **(mlp or {}))
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Row 0 weighs the residual stream, row 1 the embedding x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.ln_scale_factor = 1.0 / math.sqrt(physical_idx + 1) if ln_scale else 1.0

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        return mix[0][None, None, :] * x + mix[1][None, None, :] * x0

    def attn_branch(self, x_in: Tensor, rope: tuple[Tensor, Tensor], values=None, docs=None) -> Tensor:
        a = self.attn(F.rms_norm(x_in, (x_in.size(-1),)) * self.ln_scale_factor, *rope, values, docs)
        return self.attn_scale.to(dtype=x_in.dtype)[None, None, :] * a

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.mlp_scale.to(dtype=x.dtype)[None, None, :] * self.mlp(F.rms_norm(x, (x.size(-1),)) * self.ln_scale_factor)

    def forward(self, x: Tensor, x0: Tensor, rope: tuple[Tensor, Tensor], values=None, docs=None) -> Tensor:
        x = self.mix(x, x0)
        x = x + self.attn_branch(x, rope, values, docs)
        return x + self.mlp_branch(x)
