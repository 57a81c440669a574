"""The GPT of the Parameter Golf baseline, composed from parts chosen once from config.

The module tree and state_dict keys are those of the records' scripts (`tok_emb.weight`,
`skip_weights`, `blocks.{i}.attn.c_q.weight`, `skip_gates`, `parallel_post_lambdas`,
`smear_lambda`, `ve_shared.*`, ...), so a checkpoint loads with `strict=True` in either
direction (banked checkpoints through pgolf.model.banks). Every technique is off by default;
`__init__` wires its part (attention.py, mlp.py, block.py, residual.py, recurrence.py,
embeddings.py) and `hidden` runs whatever was wired, the same for training, every eval and
adapters attached from outside.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.attention import AttentionConfig
from pgolf.model.block import Block
from pgolf.model.config import ModelConfig
from pgolf.model.docs import DocMask, build_doc_mask, doc_backend
from pgolf.model.embeddings import (BIGRAM_ATTR, BigramHash, EmbeddingsConfig, InitConfig, ValueEmbedding,
                                    layer_list, orthogonal_init_, overtone_init_, phase_resid_mix_init_, smear_part)
from pgolf.model.head import HeadConfig, asym_softcap
from pgolf.model.linear import CastedLinear, QATConfig
from pgolf.model.mlp import MLP, MLPConfig
from pgolf.model.recurrence import RecurrenceConfig, describe_loop, layer_plan, layer_schedule, num_skips
from pgolf.model.residual import Layer, ResidualConfig, Routing, fork
from pgolf.model.roles import CONTROL, EMBED, HEAD, param_groups, roles_of, set_role, with_role
from pgolf.model.rotary import describe_rope, rotary_tables
from pgolf.model.value_residual import VR_DESCRIPTIONS, LayerValues

log = logging.getLogger("pgolf.model")


class GPT(nn.Module):
    """The baseline GPT (U-Net skips, tied embeddings, tanh logit softcap) plus the record parts.

    Keywords: the shape, then one config per part family (config.py; a dict as Hydra gives it,
    or the dataclass); leaf names are the records' environment variables lower-cased
    (`GPT(**from_flat(...))` takes the records' flat names). Per-layer options take physical
    layer indices (`attention.xsa_last_n`, `residual.parallel_start_layer`, `embeddings.ve_layers`,
    LN scale); `recurrence.layer_index="virtual"` (2026-03-31 #1204) builds one Block per virtual
    layer (own scalars over the physical layer's matrices) and makes `xsa_last_n`, `ve_layers` and
    LN scale count virtual layers (`parallel_start_layer` stays physical, as in #1204).
    Looping runs `num_loops` extra passes over [loop_start, loop_end]; a model is built with
    looping on (what eval and a loaded checkpoint need) and the trainer sets the passes from the
    schedule's loop phase (`set_looping`; when is `pgolf.schedule`'s, which layers the model's).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 1024,
        num_layers: int = 9,
        model_dim: int = 512,
        num_heads: int = 8,
        num_kv_heads: int = 4,
        tie_embeddings: bool = True,
        bos_id: int = 1,
        attention: AttentionConfig | dict | None = None,
        mlp: MLPConfig | dict | None = None,
        residual: ResidualConfig | dict | None = None,
        recurrence: RecurrenceConfig | dict | None = None,
        embeddings: EmbeddingsConfig | dict | None = None,
        head: HeadConfig | dict | None = None,
        init: InitConfig | dict | None = None,
        qat: QATConfig | dict | None = None,
    ):
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config = cfg = ModelConfig.of(**args).check()  # config.py: each family's options and checks
        self.tie_embeddings, self.bos_id = tie_embeddings, bos_id
        self._build_head(cfg)
        self._build_embedding_path(cfg)
        self._build_layers(cfg)
        self._init_weights(cfg)
        roles_of(self)  # every parameter has a role (roles.py), else one error naming it
        log.info("model parts: %s", "; ".join(self.describe()) or "the baseline's")

    def _register(self, host: nn.Module, members: dict) -> None:
        """Register a part's members (record name -> (module or Parameter, role or None)) on `host`."""
        for name, (member, role) in members.items():
            setattr(host, name, member)
            if role is not None:
                set_role(host, name, role)

    def _build_head(self, cfg: ModelConfig) -> None:
        """Token embedding, softcap (AsymLogit's two caps, head.py, #1923) and the untied head."""
        h = cfg.head
        self.logit_softcap, self.asym_logit_rescale = h.logit_softcap, h.asym_logit_rescale
        if h.asym_logit_rescale:  # the records' keys, init = the scalar cap
            self.softcap_pos = nn.Parameter(torch.tensor(float(h.logit_softcap)), requires_grad=h.asym_logit_trainable)
            self.softcap_neg = nn.Parameter(torch.tensor(float(h.logit_softcap)), requires_grad=h.asym_logit_trainable)
            set_role(self, "softcap_pos", CONTROL)
            set_role(self, "softcap_neg", CONTROL)
            log.info("asym logit: softcap_pos/softcap_neg init %s, %s", h.logit_softcap,
                     "trained with the scalars" if h.asym_logit_trainable else "never updated (as the records: identity)")
        self.tok_emb = with_role(nn.Embedding(cfg.vocab_size, cfg.model_dim), EMBED)
        # The final RMSNorm as a module (no parameters): calibration hooks its output, the tied head's input.
        self.final_norm = nn.RMSNorm(cfg.model_dim, elementwise_affine=False)
        self.lm_head = None if cfg.tie_embeddings else with_role(CastedLinear(cfg.model_dim, cfg.vocab_size), HEAD)
        if self.lm_head is not None:
            self.lm_head._zero_init = True

    def _build_embedding_path(self, cfg: ModelConfig) -> None:
        """BigramHash, SmearGate and value embeddings (embeddings.py), under their records' names."""
        e, dim, qat = cfg.embeddings, cfg.model_dim, cfg.qat.linear_kwargs()
        self.bigram_attr = BIGRAM_ATTR.get(e.bigram_hash, "bigram") if e.bigram_buckets else None
        if self.bigram_attr:
            setattr(self, self.bigram_attr, BigramHash(dim, buckets=e.bigram_buckets, dim=e.bigram_dim,
                                                       hash=e.bigram_hash, init=e.bigram_init,
                                                       scale_init=e.bigram_scale_init, qat=qat))
        # SmearGate: the part holds its parameters, registered here under its record's names.
        self.smear_part = smear_part(e.smear_gate, dim, gate_window=e.gate_window, bos_mask=e.smear_bos_mask,
                                     bos_id=cfg.bos_id)
        self._register(self, self.smear_part.members if self.smear_part else {})
        # Document-aware attention (docs.py, #1530's VarLen): no position sees another document.
        self.doc_attention = cfg.attention.doc_attention
        if self.doc_attention:
            log.info("doc attention: on (BOS id %d starts a document; kernel %s on CUDA, sdpa mask on CPU); "
                     "SmearGate and BigramHash restart at each BOS", cfg.bos_id, doc_backend(torch.device("cuda")))
        if e.smear_gate == "window" and not e.smear_bos_mask:  # under doc attention too, as #1667's packed eval
            log.warning("model.embeddings.smear_bos_mask=false: SmearGate mixes the previous document's last token "
                        "into each BOS position (the cross-document leak of #1667 and #2135), doc_attention or "
                        "not; use it only to reproduce those records")
        if e.value_residual != "none":
            log.info("value residual: %s (every attention mixes in the first layer's raw v; %s per layer)",
                     e.value_residual, "vr_lambda" if e.value_residual == "lambda" else "vrl_alpha")
        # Value embeddings on the listed layers (2026-03-22 #414 / #374).
        self.ve_slot = {layer: k for k, layer in enumerate(layer_list(e.ve_layers))} if e.ve_enabled else {}
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.ve_shared = ValueEmbedding(cfg.vocab_size, e.ve_dim, kv_dim) if self.ve_slot else None
        if self.ve_slot:
            scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in self.ve_slot)
            self.ve_layer_scales = with_role(scales, CONTROL)
        a = cfg.attention
        self.rope_base, self.rope_train_seq_len = a.rope_base, a.rope_train_seq_len
        self.rope_dims = a.rope_dims or cfg.head_dim

    def _build_layers(self, cfg: ModelConfig) -> None:
        """Depth-recurrence plans, U-Net skips, the blocks, untied repeat MLPs and the residual routing."""
        rec, res, n = cfg.recurrence, cfg.residual, cfg.num_layers
        loop, virtual, hidden, qat = rec.loop, rec.layer_index == "virtual", cfg.mlp.hidden(cfg.model_dim), \
            cfg.qat.linear_kwargs()
        self.num_loops = self.loop_passes = rec.num_loops
        # One (encoder, decoder) schedule per number of extra passes; per virtual position
        # (block_idx, physical_idx, repeat_mlp_idx) (recurrence.layer_plan).
        self.schedules = [layer_schedule(n, passes=p, **loop) for p in range(rec.num_loops + 1)]
        self.plans = [layer_plan(n, passes=p, virtual_blocks=virtual, untie_mlp=rec.loop_untie_mlp, **loop)
                      for p in range(rec.num_loops + 1)]
        n_blocks = len(sum(self.schedules[rec.num_loops], ())) if virtual else n
        self.loop_description = describe_loop(**loop, virtual_blocks=virtual, untie_mlp=rec.loop_untie_mlp)
        self.num_encoder_layers, self.num_decoder_layers = n // 2, n - n // 2
        # U-Net skip rows: min(|enc|, |dec|) of the looped schedule, or as many as a record allocated
        # (04-04 #1334 sizes them by the unlooped split and leaves the first encoder output unused).
        self.num_skip_weights = res.num_skip_weights if res.num_skip_weights is not None else num_skips(n, **loop)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skip_weights, cfg.model_dim, dtype=torch.float32))
        # Sigmoid skip gates (#1089 via 2026-04-01 #1218): x <- lerp(w*skip, x, sigmoid(g)), g init 0.
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skip_weights, cfg.model_dim)) \
            if res.skip_gates_enabled else None
        for name in ("skip_weights", "skip_gates"):  # Adam at scalar_lr, fp32, kept float
            if self._parameters.get(name) is not None:
                set_role(self, name, CONTROL)
        # Blocks 0..L-1 own physical layer i's matrices; under layer_index=virtual, blocks L.. hold
        # only the scalars of the later virtual layers (#1204: blocks.11/12 at 11 layers).
        a = cfg.attention
        self.blocks = nn.ModuleList(
            Block(cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, hidden, a, qat, layer_idx=i, ln_scale=res.ln_scale,
                  xsa=i >= n_blocks - a.xsa_last_n, value_residual=cfg.embeddings.value_residual, mlp=cfg.mlp,
                  linears=i < n, attn_enabled=not (a.disable_layer0_attn and i == 0))
            for i in range(n_blocks))
        if a.disable_layer0_attn:
            log.info("layer-0 attention: off (block 0 runs its MLP only; no blocks.0.attn matrices, as #1204)")
        # Untied MLP copies for the extra passes (#1204 REPEAT_UNTIE_MLP=full): repeat_mlp.{k}.fc/proj,
        # zero at init and copied from the shared MLPs when looping switches on (set_looping).
        span = rec.loop_end - rec.loop_start + 1
        self.repeat_mlp = nn.ModuleList(MLP(cfg.model_dim, hidden, qat, activation=cfg.mlp.mlp_activation,
                                            negative_slope=cfg.mlp.negative_slope)
                                        for _ in range(rec.num_loops * span)) \
            if rec.loop_untie_mlp and rec.num_loops else None
        for m in self.repeat_mlp.modules() if self.repeat_mlp is not None else ():
            if isinstance(m, CastedLinear):
                m._zero_init = True
        # Residual routing per physical layer (residual.py); its lane scalars cover every layer, as the
        # records, and sit at top level under the records' names.
        self.routing = Routing(res.parallel_residual, res.parallel_final_lane, n, res.parallel_start_layer)
        self._register(self, self.routing.params)

    def _init_weights(self, cfg: ModelConfig) -> None:
        """The records' inits in their order: tied embedding (+ overtone), OrthoInit, zero-init
        layers, phase resid_mix (embeddings.py)."""
        i = cfg.init
        self.init_description = i.describe()
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=i.tied_embed_init_std)
            if i.overtone_init:
                overtone_init_(self.tok_emb.weight)
        if i.ortho_init:
            orthogonal_init_(self, min_dim=i.ortho_min_dim,
                             proj_scale=1.0 / math.sqrt(2 * cfg.num_layers) if i.ortho_proj_scale else 1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)
        if i.phase_resid_mix_init:
            phase_resid_mix_init_(self.blocks)

    def describe(self) -> list[str]:
        """One line per technique part this model wires (the parts describe themselves), for the
        run log and the generated record README; the baseline's parts are not listed."""
        attn = [b.attn for b in self.blocks]
        xsa = [i for i, a in enumerate(attn) if a.use_xsa]
        gate = next((a.output_gate for a in attn if a.output_gate is not None), None)
        vr = next((a.value_residual for a in attn if a.value_residual is not None), None)
        lines = [self.blocks[0].mlp.describe(),
                 describe_rope(self.rope_dims, attn[0].head_dim, self.rope_train_seq_len),
                 "LN scale 1/sqrt(layer+1) (2026-03-21 #315)" if self.blocks[-1].ln_scale_factor != 1.0 else None,
                 f"XSA on {len(xsa)} of {len(attn)} layers ({xsa[0]}..{xsa[-1]}; 2026-03-20 #265)" if xsa else None,
                 gate.describe() if gate else None, VR_DESCRIPTIONS[vr.form] if vr else None,
                 self.ve_shared.describe(sorted(self.ve_slot)) if self.ve_shared is not None else None,
                 self.smear_part.describe() if self.smear_part else None,
                 getattr(self, self.bigram_attr).describe() if self.bigram_attr else None,
                 "sigmoid-gated U-Net skips (#1089 via 2026-04-01 #1218)" if self.skip_gates is not None else None,
                 self.routing.describe(), self.loop_description,
                 "layer-0 attention off (2026-03-31 #1204)" if not self.blocks[0].attn_enabled else None,
                 "document-aware attention: no token attends across a BOS (2026-04-10 #1530)"
                 if self.doc_attention else None, *self.init_description]
        return [line for line in lines if line]

    def set_looping(self, passes: int) -> None:
        """Run `passes` extra passes over the loop span from the next forward on (0 = off).

        A Python int on purpose: the layer sequence changes, so torch.compile recompiles once per
        distinct value (at most num_loops + 1 graphs), never per step; the switch is logged."""
        passes = min(max(int(passes), 0), self.num_loops)
        if passes and not self.loop_passes and self.repeat_mlp is not None:
            self._copy_shared_mlps()
        if passes != self.loop_passes:
            log.info("depth recurrence: %d extra pass(es) over the loop span from now on (recompiles once): "
                     "encoder %s decoder %s", passes, *self.schedules[passes])
            self.loop_passes = passes

    @torch.no_grad()
    def _copy_shared_mlps(self) -> None:
        """Untied repeat MLPs start as copies of the shared ones when looping switches on (#1204's
        `_sync_repeat_mlp_from_base`)."""
        for _, p, r in sum(self.plans[self.num_loops], ()):
            if r >= 0:
                self.repeat_mlp[r].load_state_dict(self.blocks[p].mlp.state_dict())
        log.info("depth recurrence: untied repeat MLPs copied from the shared MLPs")

    def _skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        scaled = self.skip_weights[j].to(dtype=x.dtype)[None, None, :] * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j].to(dtype=x.dtype))[None, None, :])

    def _layer(self, b: int, i: int, r: int) -> Layer:
        """What runs at one virtual position: block b's scalars over physical layer i's attention
        matrices and its MLP (or untied copy r)."""
        return Layer(self.blocks[b], i, self.blocks[i].attn, self.blocks[i].mlp if r < 0 else self.repeat_mlp[r])

    def _values(self, i: int, ve: Tensor | None, v0: list[Tensor]) -> LayerValues:
        """Layer i's value embedding (scaled) and the forward's v0 store (value_residual.py)."""
        if i not in self.ve_slot:
            return LayerValues(None, v0)
        return LayerValues(ve * self.ve_layer_scales[self.ve_slot[i]].to(dtype=ve.dtype), v0)

    def hidden(self, input_ids: Tensor, docs: DocMask | None = None) -> Tensor:
        """Final-normed hidden states (B, T, D) for token ids (B, T).

        Under doc attention the document mask comes from the BOS tokens of `input_ids` (or from
        `docs`, built by a loader that knows its documents with docs.build_doc_mask)."""
        if self.doc_attention and docs is None:
            docs = build_doc_mask(input_ids, self.bos_id)
        starts = docs.starts if docs is not None else None  # (B, T) bool or None
        x = self.tok_emb(input_ids)
        if self.bigram_attr:
            x = x + getattr(self, self.bigram_attr)(input_ids, starts)
        if self.smear_part is not None and self.smear_part.stage == "pre":
            x = self.smear_part(x, input_ids, starts)
        x = F.rms_norm(x, (x.size(-1),))
        if self.smear_part is not None and self.smear_part.stage == "post":
            x = self.smear_part(x, input_ids, starts)
        x0 = x
        # RoPE tables once per forward, shared by every layer: (1, 1, T, rope_dims/2) each. Scores
        # depend only on q-k offsets, so a document scores the same wherever it sits in the row.
        rope = rotary_tables(input_ids.size(1), self.rope_dims, self.rope_base, x.device, self.rope_train_seq_len)
        # Value embeddings: a per-token lookup, so nothing to mask at a document start.
        ve = self.ve_shared(input_ids) if self.ve_shared is not None else None  # (B, T, kv_dim)
        v0: list[Tensor] = []  # value residual: the first attention's raw v (B, T, Hkv, D), when on
        encoder, decoder = self.plans[self.loop_passes]
        lanes: tuple[Tensor, ...] = (x,)
        skips: list[Tensor] = []
        # U-Net: the encoder stores skips, the decoder adds them back (to lane 0, or every lane
        # for #1204) in reverse order. b: block (scalars) index, i: physical index, r: repeat MLP.
        for b, i, r in encoder:
            lanes = self.routing.steps[i](self.routing, self._layer(b, i, r), lanes, x0, rope,
                                          self._values(b, ve, v0), docs)
            skips.append(lanes[0])
        for j, (b, i, r) in enumerate(decoder):
            # 2x2 lanes fork before the skip (it goes to lane 0 only); lane_merge after it (#1477).
            lanes = fork(lanes, self.routing.fork_before_skip[i])
            if skips and j < self.num_skip_weights:
                skip = skips.pop()
                lanes = tuple(self._skip(j, lane, skip) if k == 0 or self.routing.skip_all_lanes else lane
                              for k, lane in enumerate(lanes))
            lanes = fork(lanes, self.routing.two_lane[i])
            lanes = self.routing.steps[i](self.routing, self._layer(b, i, r), lanes, x0, rope,
                                          self._values(b, ve, v0), docs)
        x = self.routing.merge_lanes(lanes)
        return self.final_norm(x)

    def logits(self, h: Tensor, head_delta: Tensor | None = None) -> Tensor:
        """Softcapped logits for hidden states of any leading shape (..., D) -> (..., V).
        `head_delta` (..., V) is added before the softcap: the LM-head LoRA of TTT (pgolf/ttt/lora.py)."""
        proj = F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        if head_delta is not None:
            proj = proj + head_delta
        if self.asym_logit_rescale:
            return asym_softcap(proj, self.softcap_pos, self.softcap_neg)
        return self.logit_softcap * torch.tanh(proj / self.logit_softcap)

    def forward_logits(self, input_ids: Tensor, docs: DocMask | None = None) -> Tensor:
        return self.logits(self.hidden(input_ids, docs))

    def forward(self, input_ids: Tensor, target_ids: Tensor, docs: DocMask | None = None) -> Tensor:
        """Mean next-token cross-entropy in nats, computed in fp32 as the baseline does."""
        h = self.hidden(input_ids, docs).reshape(-1, self.tok_emb.weight.size(1))
        return F.cross_entropy(self.logits(h).float(), target_ids.reshape(-1), reduction="mean")

    def set_qat(self, enabled: bool) -> None:
        """Turn fake quantization on or off in every QAT linear (takes effect in compiled graphs)."""
        for m in self.modules():
            if isinstance(m, CastedLinear) and m.qat_bits:
                m.qat_enabled.fill_(float(enabled))

    def optimizer_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by optimizer group, from the roles their parts declared (roles.py)."""
        return param_groups(self)
