"""Causal self-attention and its parts: GQA, q/k RMSNorm + QK-gain, (partial) RoPE, XSA,
value embeddings, and the three attention output gates.

Order inside one attention call, as in the records: q, k, v projections (+ value embedding
on v, then value residual) -> per-head RMSNorm of q, k -> RoPE -> q * q_gain -> causal SDPA -> XSA -> output
gate -> output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.docs import DocMask, causal_attention
from pgolf.model.linear import CastedLinear
from pgolf.model.roles import CONTROL, set_role, with_role
from pgolf.model.rotary import apply_rotary
from pgolf.errors import PgolfError
from pgolf.model.value_residual import LayerValues, add_value_residual_params, value_residual



@dataclass
class AttentionConfig:
    """`model.attention`: options of the attention part family (records' env names lower-cased).

    `gate` picks one output gate from `ATTENTION_GATES` (the records' mutually exclusive
    ATTN_OUT_GATE_ENABLED / GATED_ATTN_ENABLED / SPARSE_ATTN_GATE_ENABLED); the gates' options sit
    beside it. `xsa_last_n` counts physical layers (virtual under `recurrence.layer_index=virtual`)."""

    qk_gain_init: float = 1.5
    rope_base: float = 10000.0
    rope_dims: int = 0            # 0 = all head dims; 16 = partial RoPE (2026-03-21 #315)
    rope_train_seq_len: int = 0   # NTK base rescale past this length; 0 = off
    xsa_last_n: int = 0           # XSA on the last N layers (2026-03-20 #265)
    gate: str = "none"            # a key of ATTENTION_GATES
    gate_window: int = 12         # input dims of the windowed gates
    attn_out_gate_src: str = "proj"
    gated_attn_init_std: float = 0.01
    sparse_attn_gate_init_std: float = 0.0
    sparse_attn_gate_scale: float = 1.0
    disable_layer0_attn: bool = False  # block 0 runs its MLP only (2026-03-31 #1204)
    doc_attention: bool = False   # no query attends across a BOS (docs.py, 2026-04-10 #1530)

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        """One PgolfError line naming the option and the fix; allocates nothing."""
        head_dim = model.head_dim
        if self.gate not in ATTENTION_GATES:
            raise PgolfError(f"model.attention.gate={self.gate!r} is not one of {', '.join(ATTENTION_GATES)}")
        if self.attn_out_gate_src not in ("proj", "q"):
            raise PgolfError(f"model.attention.attn_out_gate_src={self.attn_out_gate_src!r} is not one of proj, q")
        gate = ATTENTION_GATES[self.gate]
        if gate is not None and getattr(gate, "windowed", False) and not 1 <= self.gate_window <= model.model_dim:
            raise PgolfError(f"model.attention.gate_window={self.gate_window} must be in 1..model_dim={model.model_dim}")
        if self.rope_dims and not (2 < self.rope_dims <= head_dim and self.rope_dims % 2 == 0):
            raise PgolfError(f"model.attention.rope_dims={self.rope_dims} must be 0 (all {head_dim} head dims) "
                             f"or an even number in 4..{head_dim}")
        if self.rope_train_seq_len < 0:
            raise PgolfError(f"model.attention.rope_train_seq_len={self.rope_train_seq_len} must be 0 "
                             "(no NTK rescale) or the RoPE length")
        if self.xsa_last_n < 0:
            raise PgolfError(f"model.attention.xsa_last_n={self.xsa_last_n} must be >= 0 "
                             "(0 = off, >= num_layers = every layer)")
        rec = model.recurrence
        if self.disable_layer0_attn and rec.layer_index == "virtual" and rec.num_loops and rec.loop_start == 0:
            raise PgolfError("model.attention.disable_layer0_attn=true with model.recurrence.layer_index=virtual "
                             "turns off virtual layer 0 only, but the loop repeats physical layer 0, whose attention "
                             "matrices it drops: use model.recurrence.loop_start >= 1")
        if not isinstance(self.doc_attention, bool):
            raise PgolfError(f"model.attention.doc_attention={self.doc_attention!r} must be true or false")


# The output gates by `model.attention.gate` name. Adding one: a class registered here with
# `@register_gate("name")` (docs/adding-a-technique.md); the YAML choice, compose-time check, the
# bundle's reach table and the env entry's record flag all read this registry.
ATTENTION_GATES: dict[str, type | None] = {"none": None}


def register_gate(name: str):
    """Class decorator: make a gate selectable as `model.attention.gate=<name>`.

    A gate class is built as `cls(dim, num_heads, cfg: AttentionConfig)`, holds `members` (record
    name -> (module or Parameter, role or None), registered on the attention module), is called as
    `gate(y (B, T, H, D), x (B, T, dim), q_raw (B, T, dim)) -> (B, T, H, D)` and has `describe()`.
    Optional class attributes: `record_flag` (the record's boolean env name, e.g.
    "sparse_attn_gate_enabled", which the env entry maps onto the choice) and `windowed` (its
    input is x[..., :gate_window], checked against model_dim)."""

    def register(cls: type) -> type:
        cls.choice = name
        ATTENTION_GATES[name] = cls
        return cls

    return register

def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA (2026-03-20 #265): remove from each head's output its component along the token's own
    value vector, y <- y - (y . v^) v^ with v^ = v/|v|. GQA-aware: y (B, T, H, D) is viewed as
    (B, T, Hkv, H/Hkv, D) against v (B, T, Hkv, D) broadcast, never repeating K/V."""
    B, T, H, D = y.shape
    y_g = y.reshape(B, T, v.size(-2), H // v.size(-2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)  # (B, T, Hkv, 1, D)
    return (y_g - (y_g * vn).sum(dim=-1, keepdim=True) * vn).reshape(B, T, H, D)


@register_gate("attn_out")
class AttnOutGate:
    """AttnOutGate (2026-04-16 #1667): y_h <- 2*sigmoid(W s[..., :w]) * y_h, W (H, w) zero-init,
    so the gate is 1 at init; s is the attention input (`attn_out_gate_src=proj`) or q (`q`).
    `members`: what the attention registers under the record's names (`attn_gate_proj`)."""

    record_flag, windowed = "attn_out_gate_enabled", True

    def __init__(self, dim: int, num_heads: int, cfg: AttentionConfig):
        self.window, self.src = cfg.gate_window, cfg.attn_out_gate_src
        self.proj = with_role(CastedLinear(self.window, num_heads), CONTROL)  # Adam, fp32, kept float
        self.proj._zero_init = True
        self.members = {"attn_gate_proj": (self.proj, None)}

    def __call__(self, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
        src = q_raw if self.src == "q" else x
        g = 2.0 * torch.sigmoid(self.proj(src[..., : self.window].contiguous()))  # (B, T, H)
        return y * g[..., None]

    def describe(self) -> str:
        return f"attention output gate 2*sigmoid(W s[:{self.window}]) per head, s = {self.src} (2026-04-16 #1667)"


@register_gate("gated")
class DenseAttnGate:
    """Gated attention (2026-04-19 #1736, Qwen G1 head-wise): y_h <- sigmoid(W x) * y_h with
    W (H, dim) ~ N(0, gated_attn_init_std^2), so the gate is about 0.5 at init (`attn_gate_w`)."""

    record_flag = "gated_attn_enabled"

    def __init__(self, dim: int, num_heads: int, cfg: AttentionConfig):
        self.w = nn.Parameter(torch.randn(num_heads, dim) * cfg.gated_attn_init_std)
        self.members = {"attn_gate_w": (self.w, CONTROL)}

    def __call__(self, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
        g = torch.sigmoid(F.linear(x.contiguous(), self.w.to(x.dtype)))
        return y * g[..., None]

    def describe(self) -> str:
        return "dense gated attention sigmoid(W x) per head, W (H, dim) (2026-04-19 #1736)"


@register_gate("sparse")
class SparseAttnGate:
    """SparseAttnGate (2026-04-23 #1787): y_h <- sigmoid(scale * W x[..., :w]) * y_h, W (H, w)
    zero-init (0.5 at init); scale 1.0 in #1787, 0.5 in #1855 (`attn_gate_w`)."""

    record_flag, windowed = "sparse_attn_gate_enabled", True

    def __init__(self, dim: int, num_heads: int, cfg: AttentionConfig):
        self.window, self.scale = cfg.gate_window, cfg.sparse_attn_gate_scale
        self.w = nn.Parameter(torch.randn(num_heads, self.window) * cfg.sparse_attn_gate_init_std)
        self.members = {"attn_gate_w": (self.w, CONTROL)}

    def __call__(self, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
        g = torch.sigmoid(self.scale * F.linear(x[..., : self.window].contiguous(), self.w.to(x.dtype)))
        return y * g[..., None]

    def describe(self) -> str:
        return (f"sparse attention gate sigmoid({self.scale:g} * W x[:{self.window}]) per head "
                "(2026-04-23 #1787, scale 0.5 in #1855)")


class CausalSelfAttention(nn.Module):
    """GQA attention on (B, T, dim) -> (B, T, dim). Parameters keep the records' names:
    c_q, c_k, c_v, proj, q_gain, and attn_gate_proj / attn_gate_w for the gates.

    `linears=False` builds one without c_q/c_k/c_v/proj (2026-03-31 #1204: a per-virtual-layer
    block past the physical layers, or layer 0 with its attention disabled); such a module runs
    with another one's linears (`lin` in forward), its own q_gain, XSA flag and gate."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, cfg: AttentionConfig, qat: dict, *,
                 xsa: bool = False, value_residual_form: str = "none", linears: bool = True):
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
        self.q_gain = nn.Parameter(torch.full((num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        set_role(self, "q_gain", CONTROL)
        self.use_xsa = xsa
        add_value_residual_params(self, value_residual_form)  # value_residual.py
        # The output gate part holds its parameters; they sit here under the records' names.
        gate = ATTENTION_GATES[cfg.gate]
        self.output_gate = gate(dim, num_heads, cfg) if gate is not None else None
        for name, (member, role) in (self.output_gate.members.items() if self.output_gate else ()):
            setattr(self, name, member)
            if role is not None:
                set_role(self, name, role)

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
            v = value_residual(self.value_residual, v, values.v0)
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
            y = self.output_gate(y, x, q_raw)
        return lin.proj(y.contiguous().reshape(B, T, C))
