"""Causal self-attention and its parts: GQA, q/k RMSNorm + QK-gain, (partial) RoPE, XSA,
value embeddings, and the three attention output gates.

Order inside one attention call, as in the records: q, k, v projections (+ value embedding
on v, then value residual) -> per-head RMSNorm of q, k -> RoPE -> q * q_gain -> causal SDPA -> XSA -> output
gate -> output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.docs import DocMask, causal_attention
from pgolf.model.linear import CastedLinear
from pgolf.model.roles import CONTROL, set_role, with_role
from pgolf.model.rotary import apply_rotary
from pgolf.model.value_residual import LayerValues, add_value_residual_params, value_residual

# attn_gate value -> the record that introduced it.
ATTN_GATES = ("none", "attn_out", "dense", "sparse")


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA (2026-03-20 #265): remove from each head's output its component along the token's own
    value vector, y <- y - (y . v^) v^ with v^ = v/|v|. GQA-aware: y (B, T, H, D) is viewed as
    (B, T, Hkv, H/Hkv, D) against v (B, T, Hkv, D) broadcast, never repeating K/V."""
    B, T, H, D = y.shape
    y_g = y.reshape(B, T, v.size(-2), H // v.size(-2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)  # (B, T, Hkv, 1, D)
    return (y_g - (y_g * vn).sum(dim=-1, keepdim=True) * vn).reshape(B, T, H, D)


def attn_out_gate(attn: "CausalSelfAttention", y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    """AttnOutGate (2026-04-16 #1667): y_h <- 2*sigmoid(W s[..., :w]) * y_h, W (H, w) zero-init,
    so the gate is 1 at init; s is the attention input (`attn_out_gate_src=proj`) or q (`q`)."""
    src = q_raw if attn.attn_out_gate_src == "q" else x
    g = 2.0 * torch.sigmoid(attn.attn_gate_proj(src[..., : attn.gate_window].contiguous()))  # (B, T, H)
    return y * g[..., None]


def dense_attn_gate(attn: "CausalSelfAttention", y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    """Gated attention (2026-04-19 #1736, Qwen G1 head-wise): y_h <- sigmoid(W x) * y_h with
    W (H, dim) ~ N(0, gated_attn_init_std^2), so the gate is about 0.5 at init."""
    g = torch.sigmoid(F.linear(x.contiguous(), attn.attn_gate_w.to(x.dtype)))
    return y * g[..., None]


def sparse_attn_gate(attn: "CausalSelfAttention", y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
    """SparseAttnGate (2026-04-23 #1787): y_h <- sigmoid(scale * W x[..., :w]) * y_h, W (H, w)
    zero-init (0.5 at init); scale 1.0 in #1787, 0.5 in #1855."""
    gate_in = x[..., : attn.gate_window].contiguous()
    g = torch.sigmoid(attn.sparse_attn_gate_scale * F.linear(gate_in, attn.attn_gate_w.to(x.dtype)))
    return y * g[..., None]


class CausalSelfAttention(nn.Module):
    """GQA attention on (B, T, dim) -> (B, T, dim). Parameters keep the records' names:
    c_q, c_k, c_v, proj, q_gain, and attn_gate_proj / attn_gate_w for the gates.

    `linears=False` builds one without c_q/c_k/c_v/proj (2026-03-31 #1204: a per-virtual-layer
    block past the physical layers, or layer 0 with its attention disabled); such a module runs
    with another one's linears (`lin` in forward), its own q_gain, XSA flag and gate."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, qat: dict, *,
                 xsa: bool = False, attn_gate: str = "none", gate_window: int = 12, attn_out_gate_src: str = "proj",
                 gated_attn_init_std: float = 0.01, sparse_attn_gate_init_std: float = 0.0,
                 sparse_attn_gate_scale: float = 1.0, value_residual_form: str = "none", linears: bool = True):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        if linears:
            self.c_q = CastedLinear(dim, dim, **qat)
            self.c_k = CastedLinear(dim, kv_dim, **qat)
            self.c_v = CastedLinear(dim, kv_dim, **qat)
            self.proj = CastedLinear(dim, dim, **qat)
            self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        set_role(self, "q_gain", CONTROL)
        self.use_xsa = xsa
        add_value_residual_params(self, value_residual_form)  # value_residual.py
        self.gate_window = gate_window
        self.output_gate = {"none": None, "attn_out": attn_out_gate, "dense": dense_attn_gate,
                            "sparse": sparse_attn_gate}[attn_gate]
        if attn_gate == "attn_out":
            self.attn_out_gate_src = attn_out_gate_src
            self.attn_gate_proj = with_role(CastedLinear(gate_window, num_heads), CONTROL)  # Adam, fp32, kept float
            self.attn_gate_proj._zero_init = True
        elif attn_gate == "dense":
            self.attn_gate_w = nn.Parameter(torch.randn(num_heads, dim) * gated_attn_init_std)
            set_role(self, "attn_gate_w", CONTROL)
        elif attn_gate == "sparse":
            self.sparse_attn_gate_scale = sparse_attn_gate_scale
            self.attn_gate_w = nn.Parameter(torch.randn(num_heads, gate_window) * sparse_attn_gate_init_std)
            set_role(self, "attn_gate_w", CONTROL)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, values: LayerValues | None = None,
                docs: DocMask | None = None, lin: "CausalSelfAttention | None" = None) -> Tensor:
        """x (B, T, dim) normalised block input; cos, sin (1, 1, T, rd/2); values: this layer's value
        embedding and the forward's v0 store (value_residual.py) or None; docs: the document mask
        (docs.py) or None for plain causal attention; lin: the module whose c_q/c_k/c_v/proj to use
        (None: this one's)."""
        B, T, C = x.shape
        lin = self if lin is None else lin
        q_raw = lin.c_q(x)
        q = q_raw.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = lin.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = lin.c_v(x)
        if values is not None and values.ve is not None:  # value embedding (#374 via 2026-03-22), before heads
            v = v + values.ve
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        if self.value_residual is not None:  # value residual (2026-03-23 #549 / 03-25): v0 of the first layer
            v = value_residual(self, v, values.v0)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        y = causal_attention(q, k, v.transpose(1, 2), docs)  # (B, T, H, D)
        # XSA and the output gates act per token (own value, own input): nothing crosses a document.
        if self.use_xsa:
            y = exclusive_self_attention(y, v)
        if self.output_gate is not None:
            y = self.output_gate(self, y, x, q_raw)
        return lin.proj(y.contiguous().reshape(B, T, C))
