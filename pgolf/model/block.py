"""The transformer block skeleton shared by every record.

x_in = resid_mix[0]*x + resid_mix[1]*x0 (x0 = the normalised embedding); then
x <- x_in + attn_scale * Attn(norm(x_in) * s); x <- x + mlp_scale * MLP(norm(x) * s), where s is
the LN scale 1/sqrt(layer_idx + 1) of 2026-03-21 #315 (1 when `ln_scale` is off; layer_idx is
physical, or virtual under `layer_index=virtual`). The residual routings of residual.py call the
same three pieces (`mix`, `attn_branch`, `mlp_branch`), so every design runs the same attention
and MLP.

A block owns its scalars (`attn_scale`, `mlp_scale`, `resid_mix`, `attn.q_gain`) and, unless
built with `linears=False`, its matrices (`attn.c_q/c_k/c_v/proj`, `mlp.fc/proj`). The branches
take the attention linears (`lin`) and the MLP to run as arguments, so the per-virtual-layer
blocks of 2026-03-31 #1204 run their own scalars over a physical layer's (or an untied copy's)
matrices. `attn_enabled=False` (#1204's DISABLE_LAYER0_ATTN) drops the attention half:
x_out = x_in, then the MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.attention import AttentionConfig, CausalSelfAttention
from pgolf.model.mlp import MLP, MLPConfig
from pgolf.model.roles import CONTROL, set_role


class Block(nn.Module):
    """One layer: `attn`, `mlp`, `attn_scale`, `mlp_scale`, `resid_mix` (records' names)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, attn: AttentionConfig,
                 qat: dict, *, layer_idx: int = 0, ln_scale: bool = False, xsa: bool = False,
                 value_residual: str = "none", mlp: MLPConfig | None = None, linears: bool = True,
                 attn_enabled: bool = True):
        super().__init__()
        self.attn_enabled = attn_enabled
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, attn, qat, xsa=xsa,
                                        value_residual_form=value_residual, linears=linears and attn_enabled)
        if linears:
            mlp = mlp or MLPConfig()
            self.mlp = MLP(dim, mlp_hidden, qat, activation=mlp.mlp_activation, negative_slope=mlp.negative_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Row 0 weighs the residual stream, row 1 the embedding x0.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        for name in ("attn_scale", "mlp_scale", "resid_mix"):
            set_role(self, name, CONTROL)
        self.ln_scale_factor = 1.0 / math.sqrt(layer_idx + 1) if ln_scale else 1.0

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        return mix[0][None, None, :] * x + mix[1][None, None, :] * x0

    def attn_branch(self, x_in: Tensor, rope: tuple[Tensor, Tensor], values=None, docs=None,
                    lin: CausalSelfAttention | None = None) -> Tensor:
        a = self.attn(F.rms_norm(x_in, (x_in.size(-1),)) * self.ln_scale_factor, *rope, values, docs, lin)
        return self.attn_scale.to(dtype=x_in.dtype)[None, None, :] * a

    def mlp_branch(self, x: Tensor, mlp: MLP | None = None) -> Tensor:
        mlp = self.mlp if mlp is None else mlp
        h = mlp(F.rms_norm(x, (x.size(-1),)) * self.ln_scale_factor)
        return self.mlp_scale.to(dtype=x.dtype)[None, None, :] * h

    def forward(self, x: Tensor, x0: Tensor, rope: tuple[Tensor, Tensor], values=None, docs=None,
                lin: CausalSelfAttention | None = None, mlp: MLP | None = None) -> Tensor:
        x = self.mix(x, x0)
        if self.attn_enabled:
            x = x + self.attn_branch(x, rope, values, docs, lin)
        return x + self.mlp_branch(x, mlp)
