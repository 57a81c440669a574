"""The GPT of the Parameter Golf baseline, and the record techniques as keyword options.

The module tree and state_dict keys are exactly those of the challenge's `train_gpt.py`
(`tok_emb.weight`, `skip_weights`, `blocks.{i}.attn.c_q.weight`, ...), so a checkpoint
loads with `strict=True` in either direction. Every extra technique adds its own
parameters under the names its record used and is off by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.layers import CastedLinear, apply_rotary, rotary_tables
from pgolf.techniques import BIGRAM_ATTR, SMEAR_ATTR, SMEAR_VARIANTS, BigramHash, SigmoidSmear, orthogonal_init_, token_smear

# Small per-channel tensors that steer the residual stream. The baseline keeps them in
# fp32, trains them with Adam at scalar_lr, and never quantizes them.
CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights",
)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float, qat: dict):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.rope_base = rope_base
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, **qat)
        self.c_k = CastedLinear(dim, kv_dim, **qat)
        self.c_v = CastedLinear(dim, kv_dim, **qat)
        self.proj = CastedLinear(dim, dim, **qat)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.proj(y.transpose(1, 2).contiguous().reshape(B, T, C))


class MLP(nn.Module):
    # relu^2 MLP from modded-nanogpt.
    def __init__(self, dim: int, hidden: int, qat: dict):
        super().__init__()
        self.fc = CastedLinear(dim, hidden, **qat)
        self.proj = CastedLinear(hidden, dim, **qat)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, rope_base: float,
                 qk_gain_init: float, qat: dict):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init, qat)
        self.mlp = MLP(dim, mlp_hidden, qat)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        # Row 0 weighs the residual stream, row 1 the embedding x0 (value residual).
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x = x + self.attn_scale.to(dtype=x.dtype)[None, None, :] * self.attn(F.rms_norm(x, (x.size(-1),)), cos, sin)
        x = x + self.mlp_scale.to(dtype=x.dtype)[None, None, :] * self.mlp(F.rms_norm(x, (x.size(-1),)))
        return x


class GPT(nn.Module):
    """The baseline GPT with U-Net skips, tied embeddings and a tanh logit softcap.

    Keyword arguments mirror the challenge's environment variables (`NUM_LAYERS`,
    `MODEL_DIM`, ...). `mlp_mult` may be fractional; `mlp_hidden` overrides it. The
    record options (`smear_gate`, `bigram_*`, `ortho_init`, `qat_*`) are off by default.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 1024,
        num_layers: int = 9,
        model_dim: int = 512,
        num_heads: int = 8,
        num_kv_heads: int = 4,
        mlp_mult: float = 2.0,
        mlp_hidden: int | None = None,
        tie_embeddings: bool = True,
        tied_embed_init_std: float = 0.005,
        logit_softcap: float = 30.0,
        rope_base: float = 10000.0,
        qk_gain_init: float = 1.5,
        smear_gate: str = "none",
        bigram_buckets: int = 0,
        bigram_dim: int = 128,
        bigram_hash: str = "mul",
        bigram_init: str = "normal",
        bigram_scale_init: float | None = None,
        ortho_init: bool = False,
        ortho_min_dim: int = 0,
        ortho_proj_scale: bool = False,
        qat_bits: int = 0,
        qat_clip: str = "percentile",
    ):
        super().__init__()
        check_model_args(vocab_size=vocab_size, num_layers=num_layers, model_dim=model_dim, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, logit_softcap=logit_softcap, smear_gate=smear_gate,
                         bigram_buckets=bigram_buckets, bigram_hash=bigram_hash, bigram_init=bigram_init,
                         qat_bits=qat_bits, qat_clip=qat_clip)
        hidden = mlp_hidden if mlp_hidden is not None else int(mlp_mult * model_dim)
        qat = {"qat_bits": qat_bits, "qat_clip": qat_clip}
        self.tie_embeddings = tie_embeddings
        self.logit_softcap = logit_softcap
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        # Technique modules live under their records' attribute names (see pgolf.techniques).
        self.bigram_attr = BIGRAM_ATTR.get(bigram_hash, "bigram") if bigram_buckets else None
        if self.bigram_attr:
            setattr(self, self.bigram_attr, BigramHash(model_dim, buckets=bigram_buckets, dim=bigram_dim,
                                                       hash=bigram_hash, init=bigram_init, scale_init=bigram_scale_init,
                                                       qat=qat))
        self.smear_variant = smear_gate
        if smear_gate in SMEAR_ATTR:
            setattr(self, SMEAR_ATTR[smear_gate], SigmoidSmear(model_dim, pre_norm=smear_gate == "pre_norm"))
        elif smear_gate == "token":
            self.smear_gate = nn.Linear(model_dim, 1, bias=False)
            self.smear_gate._zero_init = True
            self.smear_lambda = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(
            Block(model_dim, num_heads, num_kv_heads, hidden, rope_base, qk_gain_init, qat) for _ in range(num_layers)
        )
        self.lm_head = None if tie_embeddings else CastedLinear(model_dim, vocab_size)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=tied_embed_init_std)
        if ortho_init:
            orthogonal_init_(self, min_dim=ortho_min_dim,
                             proj_scale=1.0 / math.sqrt(2 * num_layers) if ortho_proj_scale else 1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def hidden(self, input_ids: Tensor) -> Tensor:
        """Final-normed hidden states (B, T, D) for token ids (B, T)."""
        x = self.tok_emb(input_ids)
        if self.bigram_attr:
            x = x + getattr(self, self.bigram_attr)(input_ids)
        if self.smear_variant == "pre_norm":
            x = self.smeargate(x)
        elif self.smear_variant == "token":
            x = token_smear(x, self.smear_gate, self.smear_lambda)
        x = F.rms_norm(x, (x.size(-1),))
        if self.smear_variant == "post_norm":
            x = self.smear(x)
        x0 = x
        # RoPE tables once per forward, shared by every layer (all layers have the same head_dim).
        attn = self.blocks[0].attn
        cos, sin = rotary_tables(input_ids.size(1), attn.head_dim, attn.rope_base, x.device)  # (1, 1, T, hd/2)
        skips: list[Tensor] = []
        # First half stores skips; second half adds them back in reverse order.
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0, cos, sin)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(dtype=x.dtype)[None, None, :] * skips.pop()
            x = self.blocks[self.num_encoder_layers + i](x, x0, cos, sin)
        return F.rms_norm(x, (x.size(-1),))

    def logits(self, h: Tensor) -> Tensor:
        """Softcapped logits for hidden states of any leading shape (..., D) -> (..., V)."""
        proj = F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        return self.logit_softcap * torch.tanh(proj / self.logit_softcap)

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        return self.logits(self.hidden(input_ids))

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats, computed in fp32 as the baseline does."""
        h = self.hidden(input_ids).reshape(-1, self.tok_emb.weight.size(1))
        return F.cross_entropy(self.logits(h).float(), target_ids.reshape(-1), reduction="mean")

    def set_qat(self, enabled: bool) -> None:
        """Turn fake quantization on or off in every QAT linear (takes effect in compiled graphs)."""
        for m in self.modules():
            if isinstance(m, CastedLinear) and m.qat_bits:
                m.qat_enabled.fill_(float(enabled))

    def optimizer_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by optimizer role, following the baseline's split.

        `matrix`: 2-D block weights (Muon). `scalar`: vectors and control tensors (Adam at
        scalar_lr). `embed`: the token embedding; `head`: the untied head; `bigram` and
        `smear` are separate so their records' learning rates can apply.
        """
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"embed": [], "head": [], "matrix": [], "scalar": [],
                                                              "bigram": [], "smear": []}
        for name, p in self.named_parameters():
            if name == "tok_emb.weight":
                groups["embed"].append((name, p))
            elif name.startswith("lm_head."):
                groups["head"].append((name, p))
            elif name.split(".")[0] in ("smeargate", "smear", "smear_gate", "smear_lambda"):
                groups["smear"].append((name, p))
            elif self.bigram_attr and name.startswith(self.bigram_attr + "."):
                role = "scalar" if p.ndim < 2 else ("matrix" if ".proj." in name else "bigram")
                groups[role].append((name, p))
            elif p.ndim == 2 and not any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS):
                groups["matrix"].append((name, p))
            else:
                groups["scalar"].append((name, p))
        return groups


def check_model_args(*, vocab_size: int = 1024, num_layers: int = 9, model_dim: int = 512, num_heads: int = 8,
                     num_kv_heads: int = 4, logit_softcap: float = 30.0, smear_gate: str = "none",
                     bigram_buckets: int = 0, bigram_hash: str = "mul", bigram_init: str = "normal", qat_bits: int = 0,
                     qat_clip: str = "percentile", **_: object) -> None:
    """Reject inconsistent shapes and unknown technique options with one line naming the field
    and the fix. Allocates nothing, so `pgolf.compose` runs it on every config."""
    from pgolf.quant.treatments import CLIPS

    for field, value in (("vocab_size", vocab_size), ("num_layers", num_layers), ("model_dim", model_dim),
                         ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if value <= 0:
            raise PgolfError(f"model.{field}={value} must be positive")
    if model_dim % num_heads:
        raise PgolfError(f"model.model_dim={model_dim} is not divisible by model.num_heads={num_heads}; "
                         f"pick num_heads among {[h for h in range(1, 33) if model_dim % h == 0]}")
    if num_heads % num_kv_heads:
        raise PgolfError(f"model.num_heads={num_heads} is not divisible by model.num_kv_heads={num_kv_heads}; "
                         f"pick num_kv_heads among {[h for h in range(1, num_heads + 1) if num_heads % h == 0]}")
    if (model_dim // num_heads) % 2:
        raise PgolfError(f"head_dim = model.model_dim/model.num_heads = {model_dim // num_heads} is odd; "
                         "RoPE needs an even head_dim")
    if logit_softcap <= 0:
        raise PgolfError(f"model.logit_softcap={logit_softcap} must be positive")
    choices = (("smear_gate", smear_gate, SMEAR_VARIANTS), ("bigram_hash", bigram_hash, tuple(BIGRAM_ATTR)),
               ("bigram_init", bigram_init, ("normal", "zeros")), ("qat_clip", qat_clip, CLIPS))
    for field, value, allowed in choices:
        if value not in allowed:
            raise PgolfError(f"model.{field}={value!r} is not one of {', '.join(allowed)}")
    if bigram_buckets == 1 or bigram_buckets < 0:
        raise PgolfError(f"model.bigram_buckets={bigram_buckets} must be 0 (off) or at least 2")
    if qat_bits and not 4 <= qat_bits <= 8:
        raise PgolfError(f"model.qat_bits={qat_bits} must be 0 (off) or in 4..8 (the exporter's range)")
