"""The embedding path and the inits: SmearGate variants, BigramHash, value embeddings,
OrthoInit, the overtone embedding init and the phase-transition resid_mix init.

Each one keeps the parameter names of the record that introduced it, so a record's
checkpoint loads into pgolf with `strict=True`:
- SmearGate `pre_norm`, record 2026-03-19_smeargate_orthoinit_muonwd (#65): `smeargate.gate`,
  init 3.0, out = g*x + (1-g)*x_prev with g = sigmoid(gate), before the embedding RMSNorm.
- SmearGate `post_norm`, records of 2026-03-20: `smear.gate`, init 0,
  out = (1-g)*x + g*x_prev, after the embedding RMSNorm.
- SmearGate `token`, PR #192: x_t + lam * sigmoid(w . x_t) * x_{t-1}, top-level `smear_gate.weight`
  (1, dim; a plain nn.Linear, so it stays bf16 on GPU and gets no QAT) and `smear_lambda` (1,),
  both zero-init, so it starts as the identity.
- SmearGate `window`, 2026-04-16 #1667 (input-dependent, modded-nanogpt style): on the raw
  embedding, x_t + lam * sigmoid(w . x_t[:gate_window]) * x_{t-1}; `smear_gate.weight` (1, 12)
  CastedLinear and `smear_lambda` (1,), both zero-init. The previous-token term is masked where
  the current token is BOS (2026-04-27 #1855's fix of the cross-document leak) unless
  `smear_bos_mask=false`, which reproduces #1667's (and #2135's, SMEAR_GATE_BOS_FIX=0) unmasked
  number, under document attention too: their packed eval keeps the previous document's term.
- BigramHash `mul` (#65): `bigram_hash.table`, (prev*92821 + cur) % buckets, prev=0 at t=0.
- BigramHash `xor` (2026-03-20 records): `bigram.embed`, (36313*cur ^ 27191*prev) % (buckets-1),
  first position mapped to buckets-1, optional `bigram.scale`.

Document starts (`model.attention.doc_attention`, docs.py): every part that reads the previous position
takes `starts` (B, T) bool, True at a BOS, and treats such a position like position 0 of a row:
the SmearGates drop the previous-token term, BigramHash uses its first-position bucket. The one
exception is the `window` SmearGate with `smear_bos_mask=false`: #1667 and #2135 ignore document
boundaries in it (their packed eval smears a document's BOS with the previous document's last
token), so it keeps that term, as they do. Value embeddings are a per-token lookup and mix nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.model.linear import CastedLinear
from pgolf.model.roles import BIGRAM_TABLE, CONTROL, EMBED, EMBED_PROJ, SMEAR, set_role, with_role

SMEAR_VARIANTS = ("none", "pre_norm", "post_norm", "token", "window")
# Attribute (and so state_dict prefix) of each variant, as in its record.
SMEAR_ATTR = {"pre_norm": "smeargate", "post_norm": "smear"}
BIGRAM_ATTR = {"mul": "bigram_hash", "xor": "bigram"}
BIGRAM_INITS = ("normal", "zeros")



def layer_list(layers: list[int] | str | None) -> list[int]:
    """`[9, 10]` or the records' env form "9,10" -> [9, 10]."""
    if isinstance(layers, str):
        return [int(s) for s in layers.split(",") if s.strip()]
    return [int(i) for i in layers or ()]


@dataclass
class EmbeddingsConfig:
    """`model.embeddings`: the embedding-path parts. SmearGate (`smear_gate`: none | pre_norm (#65)
    | post_norm (2026-03-20) | token (PR #192) | window (2026-04-16 #1667, over the first
    `gate_window` dims, BOS-masked unless `smear_bos_mask=false`), BigramHash (`bigram_buckets`
    0 = off), value embeddings on `ve_layers` (physical, or virtual under
    recurrence.layer_index=virtual) and the value residual (none | lambda (#549) | sigmoid)."""

    smear_gate: str = "none"
    smear_bos_mask: bool = True
    gate_window: int = 12
    bigram_buckets: int = 0
    bigram_dim: int = 128
    bigram_hash: str = "mul"
    bigram_init: str = "normal"
    bigram_scale_init: float | None = None
    ve_enabled: bool = False
    ve_dim: int = 128
    ve_layers: list[int] | str | None = None
    value_residual: str = "none"

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        from pgolf.model.value_residual import VALUE_RESIDUALS

        for field, value, allowed in (("smear_gate", self.smear_gate, SMEAR_VARIANTS),
                                      ("bigram_hash", self.bigram_hash, tuple(BIGRAM_ATTR)),
                                      ("bigram_init", self.bigram_init, BIGRAM_INITS),
                                      ("value_residual", self.value_residual, VALUE_RESIDUALS)):
            if value not in allowed:
                raise PgolfError(f"model.embeddings.{field}={value!r} is not one of {', '.join(allowed)}")
        if self.smear_gate == "window" and not 1 <= self.gate_window <= model.model_dim:
            raise PgolfError(f"model.embeddings.gate_window={self.gate_window} must be in "
                             f"1..model_dim={model.model_dim}")
        if self.bigram_buckets == 1 or self.bigram_buckets < 0:
            raise PgolfError(f"model.embeddings.bigram_buckets={self.bigram_buckets} must be 0 (off) or at least 2")
        kind, n_idx = model.recurrence.num_indexed(model.num_layers)
        layers = layer_list(self.ve_layers)
        if self.ve_enabled and (not layers or any(not 0 <= i < n_idx for i in layers) or len(set(layers)) < len(layers)):
            raise PgolfError(f"model.embeddings.ve_layers={self.ve_layers!r} must list distinct {kind} layers in "
                             f"0..{n_idx - 1}, e.g. [9,10]")
        if self.ve_enabled and self.ve_dim <= 0:
            raise PgolfError(f"model.embeddings.ve_dim={self.ve_dim} must be positive")


@dataclass
class InitConfig:
    """`model.init`: the tied embedding's std, OrthoInit (#65; `ortho_min_dim` 64 and
    `ortho_proj_scale` 1/sqrt(2L) in the 2026-03-20 records), and the overtone embedding and
    phase-transition resid_mix inits (2026-03-19 OvertoneInit)."""

    tied_embed_init_std: float = 0.005
    ortho_init: bool = False
    ortho_min_dim: int = 0
    ortho_proj_scale: bool = False
    overtone_init: bool = False
    phase_resid_mix_init: bool = False

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        if self.ortho_min_dim < 0:
            raise PgolfError(f"model.init.ortho_min_dim={self.ortho_min_dim} must be >= 0")

    def describe(self) -> list[str]:
        return [text for on, text in (
            (self.overtone_init, "overtone embedding init: spectrum S_k = S_1/sqrt(k) (2026-03-19 OvertoneInit)"),
            (self.phase_resid_mix_init, "phase-transition resid_mix init (2026-03-19 OvertoneInit)")) if on]


def shift_right(x: Tensor, starts: Tensor | None = None) -> Tensor:
    """x_{t-1} along dim 1, zeros at t=0 and where `starts` (B, T) is True: (B, T, ...) -> (B, T, ...)."""
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    if starts is None:
        return prev
    return prev.masked_fill(starts.reshape(starts.shape + (1,) * (x.dim() - 2)), 0)


class SigmoidSmear(nn.Module):
    """Per-dimension learned blend of each position with the previous one (dim params).

    pre_norm (#65): g = sigmoid(gate) in fp32, out = g*x + (1-g)*x_prev, gate init 3.0.
    post_norm (2026-03-20): g = sigmoid(gate) in the activation dtype, out = (1-g)*x + g*x_prev, init 0.
    """

    def __init__(self, dim: int, *, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.gate = nn.Parameter(torch.full((dim,), 3.0 if pre_norm else 0.0, dtype=torch.float32))
        set_role(self, "gate", SMEAR)

    def forward(self, x: Tensor, starts: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            g = torch.sigmoid(self.gate).to(dtype=x.dtype)
            return g * x + (1.0 - g) * shift_right(x, starts)
        g = torch.sigmoid(self.gate.to(dtype=x.dtype))[None, None, :]
        return (1 - g) * x + g * shift_right(x, starts)


def token_smear(x: Tensor, gate: nn.Linear, lam: Tensor, starts: Tensor | None = None) -> Tensor:
    """PR #192's token-dependent gate: x_t + lam * sigmoid(w . x_t) * x_{t-1}; (B, T, D) -> (B, T, D)."""
    g = lam.to(dtype=x.dtype) * torch.sigmoid(gate(x))  # (B, T, 1)
    return x + g * shift_right(x, starts)


def window_smear(x: Tensor, gate: nn.Module, lam: Tensor, window: int, keep_prev: Tensor | None) -> Tensor:
    """#1667's SmearGate on the raw embedding x (B, T, D): for t >= 1,
    x_t + lam * sigmoid(gate(x_t[:window])) * x_{t-1} * keep_prev_t, where keep_prev (B, T-1, 1)
    is 0 where token t is BOS (#1855) or None (unmasked, #1667)."""
    g = lam.to(dtype=x.dtype) * torch.sigmoid(gate(x[:, 1:, :window].contiguous()))  # (B, T-1, 1)
    prev = x[:, :-1] if keep_prev is None else x[:, :-1] * keep_prev
    return torch.cat([x[:, :1], x[:, 1:] + g * prev], dim=1)


class SmearPart:
    """One SmearGate variant wired for a model: `stage` ("pre" or "post" the embedding RMSNorm),
    `members` (record name -> (module or parameter, role) for the model to register at top level),
    called as part(x (B, T, D), ids (B, T), starts (B, T) or None) -> (B, T, D)."""

    stage = "pre"
    members: dict = {}

    def describe(self) -> str:
        return SMEAR_DESCRIPTIONS[self.variant]


class SigmoidSmearPart(SmearPart):
    """`pre_norm` (#65, `smeargate.gate`) or `post_norm` (2026-03-20, `smear.gate`)."""

    def __init__(self, variant: str, model_dim: int):
        self.variant, self.stage = variant, "pre" if variant == "pre_norm" else "post"
        self.module = SigmoidSmear(model_dim, pre_norm=variant == "pre_norm")
        self.members = {SMEAR_ATTR[variant]: (self.module, None)}

    def __call__(self, x: Tensor, ids: Tensor, starts: Tensor | None = None) -> Tensor:
        return self.module(x, starts)


class TokenSmearPart(SmearPart):
    """PR #192: `smear_gate` (a plain nn.Linear on all dims, bf16 in a bf16 run) and `smear_lambda`."""

    variant = "token"

    def __init__(self, model_dim: int):
        self.gate = with_role(nn.Linear(model_dim, 1, bias=False), replace(SMEAR, fp32=False))
        self.gate._zero_init = True
        self.lam = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.members = {"smear_gate": (self.gate, None), "smear_lambda": (self.lam, SMEAR)}

    def __call__(self, x: Tensor, ids: Tensor, starts: Tensor | None = None) -> Tensor:
        return token_smear(x, self.gate, self.lam, starts)


class WindowSmearPart(SmearPart):
    """#1667 / #1855: `smear_gate` (CastedLinear on the first `gate_window` dims) and `smear_lambda`;
    the previous token is masked where the current one is BOS unless `bos_mask` is off (#1667,
    #2135), with or without a document mask: the records' SmearGate never reads cu_seqlens."""

    variant = "window"

    def __init__(self, gate_window: int, bos_mask: bool, bos_id: int):
        self.window, self.bos_mask, self.bos_id = gate_window, bos_mask, bos_id
        self.gate = with_role(CastedLinear(gate_window, 1), SMEAR)
        self.gate._zero_init = True
        self.lam = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.members = {"smear_gate": (self.gate, None), "smear_lambda": (self.lam, SMEAR)}

    def __call__(self, x: Tensor, ids: Tensor, starts: Tensor | None = None) -> Tensor:
        keep = (ids[:, 1:] != self.bos_id).to(x.dtype).unsqueeze(-1) if self.bos_mask else None
        return window_smear(x, self.gate, self.lam, self.window, keep)

    def describe(self) -> str:
        mask = "BOS-masked (2026-04-27 #1855)" if self.bos_mask else "unmasked across BOS (2026-04-16 #1667)"
        return f"SmearGate x_t + lam*sigmoid(w.x_t[:{self.window}])*x_(t-1) on the raw embedding, {mask}"


SMEAR_DESCRIPTIONS = {
    "pre_norm": "SmearGate before the embedding norm, gate init 3 (#65)",
    "post_norm": "SmearGate after the embedding norm, gate init 0 (2026-03-20 records)",
    "token": "per-token SmearGate x_t + lam*sigmoid(w.x_t)*x_(t-1) (PR #192)",
}


def smear_part(variant: str, model_dim: int, *, gate_window: int, bos_mask: bool, bos_id: int) -> SmearPart | None:
    """The SmearGate part of a variant in SMEAR_VARIANTS ("none": None)."""
    if variant in SMEAR_ATTR:
        return SigmoidSmearPart(variant, model_dim)
    if variant == "token":
        return TokenSmearPart(model_dim)
    if variant == "window":
        return WindowSmearPart(gate_window, bos_mask, bos_id)
    return None


class ValueEmbedding(nn.Module):
    """Value embeddings (#374, in the 2026-03-22 #414 to 2026-04-04 records): one shared table
    `embed` (V, ve_dim) ~ N(0, 0.01^2), projected by `proj` (zero-init; absent when ve_dim equals
    kv_dim) and scaled by `scale` (init 0.1). Each VE layer adds it, times its own
    `ve_layer_scales.{k}` (init 1), to the attention values: (B, T) -> (B, T, kv_dim)."""

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int):
        super().__init__()
        self.embed = with_role(nn.Embedding(vocab_size, ve_dim), EMBED)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = with_role(CastedLinear(ve_dim, kv_dim), EMBED_PROJ) if ve_dim != kv_dim else None
        if self.proj is not None:
            self.proj._zero_init = True
        self.scale = nn.Parameter(torch.tensor(0.1, dtype=torch.float32))
        set_role(self, "scale", CONTROL)

    def describe(self, layers: list[int]) -> str:
        proj = f", projected to {self.proj.out_features}" if self.proj is not None else ""
        return (f"value embeddings: one {self.embed.num_embeddings} x {self.embed.embedding_dim} table{proj}, "
                f"added to v on layers {layers} (#374 via 2026-03-22 #414)")

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(dtype=h.dtype)


class BigramHash(nn.Module):
    """A hashed (previous, current) token-pair embedding projected to model dim.

    `hash="mul"` follows record #65 (table `table`, zero-init projection); `hash="xor"`
    follows the 2026-03-20 records (table `embed`, projection only when dim != model_dim,
    optional learned output scale).
    """

    def __init__(self, model_dim: int, *, buckets: int, dim: int, hash: str, init: str, scale_init: float | None,
                 qat: dict | None = None):
        super().__init__()
        if hash not in BIGRAM_ATTR:
            raise PgolfError(f"model.embeddings.bigram_hash={hash!r} is not one of {', '.join(BIGRAM_ATTR)}")
        if init not in BIGRAM_INITS:
            raise PgolfError(f"model.embeddings.bigram_init={init!r} is not one of normal, zeros")
        if buckets < 2:
            raise PgolfError(f"model.embeddings.bigram_buckets={buckets} must be 0 (off) or at least 2")
        self.buckets, self.hash = buckets, hash
        self.table_name = "table" if hash == "mul" else "embed"
        table = with_role(nn.Embedding(buckets, dim), BIGRAM_TABLE)
        if init == "normal":
            nn.init.normal_(table.weight, std=0.01)
        else:
            nn.init.zeros_(table.weight)
        setattr(self, self.table_name, table)
        # A CastedLinear like the block matrices, so QAT (record #65) fake-quantizes it too.
        self.proj = CastedLinear(dim, model_dim, **(qat or {})) if (hash == "mul" or dim != model_dim) else None
        if self.proj is not None:
            set_role(self.proj, "weight", EMBED_PROJ)
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            # #65 flags it zero-init; the xor records zero it here but let OrthoInit overwrite it.
            self.proj._zero_init = hash == "mul"
        self.scale_init, self.init = scale_init, init
        self.scale = None if scale_init is None else nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))
        if self.scale is not None:
            set_role(self, "scale", CONTROL)

    def describe(self) -> str:
        table = getattr(self, self.table_name)
        scale = f", learned scale init {self.scale_init:g}" if self.scale_init is not None else ""
        record = "#65" if self.hash == "mul" else "2026-03-20 records"
        return (f"BigramHash: {self.buckets} buckets x {table.embedding_dim} dim, {self.hash} hash, {self.init} init"
                f"{scale} ({record})")

    def indices(self, ids: Tensor, starts: Tensor | None = None) -> Tensor:
        """Bucket index of each (previous, current) pair: (B, T) -> (B, T) int64. Positions where
        `starts` is True (document starts) get the first position's bucket."""
        if self.hash == "mul":
            prev = shift_right(ids, starts)
            return (prev.long() * 92821 + ids.long()) % self.buckets
        t = ids.to(torch.int32)
        mod = self.buckets - 1
        rest = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % mod
        first = torch.full_like(t[:, :1], mod)
        idx = torch.cat([first, rest], dim=1)
        return (idx if starts is None else idx.masked_fill(starts, mod)).long()

    def forward(self, ids: Tensor, starts: Tensor | None = None) -> Tensor:
        h = getattr(self, self.table_name)(self.indices(ids, starts))  # (B, T, dim)
        if self.proj is not None:
            h = self.proj(h)
        if self.scale is not None:
            h = h * self.scale.to(dtype=h.dtype)
        return h


@torch.no_grad()
def orthogonal_init_(model: nn.Module, *, min_dim: int, proj_scale: float) -> None:
    """Orthogonal init (gain 1) for every linear not flagged `_zero_init`.

    `min_dim` skips matrices with a side below it (64 in the 2026-03-20 records, 0 in #65);
    `proj_scale` multiplies output projections (`.proj`) by 1/sqrt(2*num_layers) as the
    2026-03-20 records do. Zero-init layers are zeroed by the caller afterwards.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or getattr(module, "_zero_init", False):
            continue
        if min(module.weight.shape) < min_dim:
            continue
        nn.init.orthogonal_(module.weight, gain=1.0)
        if name.endswith(".proj") or ".proj." in name:
            module.weight.mul_(proj_scale)


@torch.no_grad()
def overtone_init_(weight: Tensor) -> None:
    """Overtone init (2026-03-19_SlidingWindow_FP16Emb_10L_MuonWD_OvertoneInit): keep the
    embedding's singular vectors, reshape its spectrum to a power law, S_k = S_1 / sqrt(k)."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    target = S[0] * (1.0 / torch.arange(1, S.shape[0] + 1, dtype=S.dtype)) ** 0.5
    weight.copy_((U * target[None, :]) @ Vh)


@torch.no_grad()
def phase_resid_mix_init_(blocks) -> None:
    """Phase-transition resid_mix init (same record): layer i of L weighs the stream by
    p = sigmoid(3 (i/(L-1) - 1/2)) and x0 by 1-p, so early layers lean on the embedding."""
    n = len(blocks)
    for i, block in enumerate(blocks):
        phase = torch.sigmoid(torch.tensor(3.0 * (i / max(n - 1, 1) - 0.5)))
        block.resid_mix[0].fill_(float(phase))
        block.resid_mix[1].fill_(float(1 - phase))
