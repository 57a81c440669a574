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

from pgolf.model.block import Block
from pgolf.model.checks import _layer_list, check_model_args
from pgolf.model.docs import DocMask, build_doc_mask, doc_backend
from pgolf.model.embeddings import (BIGRAM_ATTR, BigramHash, ValueEmbedding, orthogonal_init_, overtone_init_,
                                    phase_resid_mix_init_, smear_part)
from pgolf.model.head import asym_softcap
from pgolf.model.linear import CastedLinear
from pgolf.model.mlp import MLP
from pgolf.model.recurrence import describe_loop, layer_plan, layer_schedule, num_skips
from pgolf.model.residual import Layer, Routing, fork
from pgolf.model.roles import CONTROL, EMBED, HEAD, param_groups, roles_of, set_role, with_role
from pgolf.model.rotary import describe_rope, rotary_tables
from pgolf.model.value_residual import VR_DESCRIPTIONS, LayerValues

log = logging.getLogger("pgolf.model")


class GPT(nn.Module):
    """The baseline GPT (U-Net skips, tied embeddings, tanh logit softcap) plus the record parts.

    Keyword arguments mirror the records' environment variables lower-cased. Per-layer options
    take physical layer indices (`xsa_last_n`, `parallel_start_layer`, `ve_layers`, LN scale);
    `layer_index="virtual"` (2026-03-31 #1204) builds one Block per virtual layer (own scalars
    over the physical layer's matrices) and makes `xsa_last_n`, `ve_layers` and LN scale count
    virtual layers (`parallel_start_layer` stays physical, as in #1204).
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
        mlp_mult: float = 2.0,
        mlp_hidden: int | None = None,
        mlp_activation: str = "relu2",
        negative_slope: float = 0.5,
        tie_embeddings: bool = True,
        tied_embed_init_std: float = 0.005,
        logit_softcap: float = 30.0,
        asym_logit_rescale: bool = False,
        asym_logit_trainable: bool = False,
        rope_base: float = 10000.0,
        rope_dims: int = 0,
        rope_train_seq_len: int = 0,
        qk_gain_init: float = 1.5,
        ln_scale: bool = False,
        xsa_last_n: int = 0,
        skip_gates_enabled: bool = False,
        attn_out_gate_enabled: bool = False,
        attn_out_gate_src: str = "proj",
        gated_attn_enabled: bool = False,
        gated_attn_init_std: float = 0.01,
        sparse_attn_gate_enabled: bool = False,
        sparse_attn_gate_init_std: float = 0.0,
        sparse_attn_gate_scale: float = 1.0,
        gate_window: int = 12,
        parallel_start_layer: int = 0,
        parallel_residual: str = "routed_2x2",
        parallel_final_lane: str = "mean",
        num_loops: int = 0,
        loop_start: int = 0,
        loop_end: int = 0,
        loop_untie_mlp: bool = False,
        layer_index: str = "physical",
        disable_layer0_attn: bool = False,
        num_skip_weights: int | None = None,
        ve_enabled: bool = False,
        ve_dim: int = 128,
        ve_layers: list[int] | None = None,
        value_residual: str = "none",
        smear_gate: str = "none",
        smear_bos_mask: bool = True,
        bos_id: int = 1,
        doc_attention: bool = False,
        bigram_buckets: int = 0,
        bigram_dim: int = 128,
        bigram_hash: str = "mul",
        bigram_init: str = "normal",
        bigram_scale_init: float | None = None,
        ortho_init: bool = False,
        ortho_min_dim: int = 0,
        ortho_proj_scale: bool = False,
        overtone_init: bool = False,
        phase_resid_mix_init: bool = False,
        qat_bits: int = 0,
        qat_clip: str = "percentile",
    ):
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_model_args(**args)
        hidden = mlp_hidden if mlp_hidden is not None else int(mlp_mult * model_dim)
        qat = {"qat_bits": qat_bits, "qat_clip": qat_clip}
        head_dim = model_dim // num_heads
        self.tie_embeddings = tie_embeddings
        self.logit_softcap = logit_softcap
        self.asym_logit_rescale = asym_logit_rescale
        if asym_logit_rescale:  # AsymLogit (#1923, head.py): the records' keys, init = the scalar cap
            self.softcap_pos = nn.Parameter(torch.tensor(float(logit_softcap)), requires_grad=asym_logit_trainable)
            self.softcap_neg = nn.Parameter(torch.tensor(float(logit_softcap)), requires_grad=asym_logit_trainable)
            set_role(self, "softcap_pos", CONTROL)
            set_role(self, "softcap_neg", CONTROL)
            log.info("asym logit: softcap_pos/softcap_neg init %s, %s", logit_softcap,
                     "trained with the scalars" if asym_logit_trainable else "never updated (as the records: identity)")
        self.rope_base, self.rope_train_seq_len = rope_base, rope_train_seq_len
        self.rope_dims = rope_dims or head_dim
        self.tok_emb = with_role(nn.Embedding(vocab_size, model_dim), EMBED)
        # Embedding-path parts live under their records' attribute names (see embeddings.py).
        self.bigram_attr = BIGRAM_ATTR.get(bigram_hash, "bigram") if bigram_buckets else None
        if self.bigram_attr:
            setattr(self, self.bigram_attr, BigramHash(model_dim, buckets=bigram_buckets, dim=bigram_dim,
                                                       hash=bigram_hash, init=bigram_init, scale_init=bigram_scale_init,
                                                       qat=qat))
        self.bos_id = bos_id
        # SmearGate (embeddings.py): the part holds its parameters, registered here under its record's names.
        self.smear_part = smear_part(smear_gate, model_dim, gate_window=gate_window, bos_mask=smear_bos_mask,
                                     bos_id=bos_id)
        for name, (member, role) in (self.smear_part.members.items() if self.smear_part else ()):
            setattr(self, name, member)
            if role is not None:
                set_role(self, name, role)
        # Document-aware attention (docs.py, #1530's VarLen): no position sees another document.
        self.doc_attention = doc_attention
        if doc_attention:
            log.info("doc attention: on (BOS id %d starts a document; kernel %s on CUDA, sdpa mask on CPU); "
                     "SmearGate and BigramHash restart at each BOS", bos_id, doc_backend(torch.device("cuda")))
        if smear_gate == "window" and not smear_bos_mask:  # under doc attention too, as #1667's packed eval
            log.warning("model.smear_bos_mask=false: SmearGate mixes the previous document's last token into "
                        "each BOS position (the cross-document leak of #1667 and #2135), doc_attention or not; "
                        "use it only to reproduce those records")
        if value_residual != "none":
            log.info("value residual: %s (every attention mixes in the first layer's raw v; %s per layer)",
                     value_residual, "vr_lambda" if value_residual == "lambda" else "vrl_alpha")
        # Depth recurrence: one (encoder, decoder) schedule per number of extra passes.
        loop = {"num_loops": num_loops, "loop_start": loop_start, "loop_end": loop_end}
        self.num_loops = num_loops
        self.init_description = [text for on, text in (
            (overtone_init, "overtone embedding init: spectrum S_k = S_1/sqrt(k) (2026-03-19 OvertoneInit)"),
            (phase_resid_mix_init, "phase-transition resid_mix init (2026-03-19 OvertoneInit)")) if on]
        self.schedules = [layer_schedule(num_layers, passes=p, **loop) for p in range(num_loops + 1)]
        # Per virtual position: (block_idx, physical_idx, repeat_mlp_idx) (recurrence.layer_plan).
        virtual = layer_index == "virtual"
        self.plans = [layer_plan(num_layers, passes=p, virtual_blocks=virtual, untie_mlp=loop_untie_mlp, **loop)
                      for p in range(num_loops + 1)]
        n_blocks = len(sum(self.schedules[num_loops], ())) if virtual else num_layers
        self.loop_passes = num_loops
        self.loop_description = describe_loop(**loop, virtual_blocks=virtual, untie_mlp=loop_untie_mlp)
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        # U-Net skip rows: min(|enc|, |dec|) of the looped schedule, or as many as a record allocated
        # (04-04 #1334 sizes them by the unlooped split and leaves the first encoder output unused).
        n_skips = num_skip_weights if num_skip_weights is not None else num_skips(num_layers, **loop)
        self.num_skip_weights = n_skips
        self.skip_weights = nn.Parameter(torch.ones(n_skips, model_dim, dtype=torch.float32))
        # Sigmoid skip gates (#1089 via 2026-04-01 #1218): x <- lerp(w*skip, x, sigmoid(g)), g init 0.
        self.skip_gates = nn.Parameter(torch.zeros(n_skips, model_dim)) if skip_gates_enabled else None
        attn_gate = ("attn_out" if attn_out_gate_enabled else "dense" if gated_attn_enabled
                     else "sparse" if sparse_attn_gate_enabled else "none")
        attn = dict(attn_gate=attn_gate, gate_window=gate_window, attn_out_gate_src=attn_out_gate_src,
                    gated_attn_init_std=gated_attn_init_std, sparse_attn_gate_init_std=sparse_attn_gate_init_std,
                    sparse_attn_gate_scale=sparse_attn_gate_scale, value_residual_form=value_residual)
        # Blocks 0..L-1 own physical layer i's matrices; under layer_index=virtual, blocks L.. hold
        # only the scalars of the later virtual layers (#1204: blocks.11/12 at 11 layers).
        mlp = dict(activation=mlp_activation, negative_slope=negative_slope)
        self.blocks = nn.ModuleList(
            Block(model_dim, num_heads, num_kv_heads, hidden, qk_gain_init, qat, layer_idx=i, ln_scale=ln_scale,
                  attn=dict(attn, xsa=i >= n_blocks - xsa_last_n), mlp=mlp, linears=i < num_layers,
                  attn_enabled=not (disable_layer0_attn and i == 0))
            for i in range(n_blocks)
        )
        if disable_layer0_attn:
            log.info("layer-0 attention: off (block 0 runs its MLP only; no blocks.0.attn matrices, as #1204)")
        # Untied MLP copies for the extra passes (#1204 REPEAT_UNTIE_MLP=full): repeat_mlp.{k}.fc/proj,
        # zero at init and copied from the shared MLPs when looping switches on (set_looping).
        span = loop_end - loop_start + 1
        self.repeat_mlp = nn.ModuleList(MLP(model_dim, hidden, qat, **mlp) for _ in range(num_loops * span)) \
            if loop_untie_mlp and num_loops else None
        if self.repeat_mlp is not None:
            for m in self.repeat_mlp.modules():
                if isinstance(m, CastedLinear):
                    m._zero_init = True
        # Residual routing per physical layer (residual.py); its lane scalars cover every layer, as the
        # records, and sit at top level under the records' names.
        self.routing = Routing(parallel_residual, parallel_final_lane, num_layers, parallel_start_layer)
        for name, (param, role) in self.routing.params.items():
            setattr(self, name, param)
            set_role(self, name, role)
        # Value embeddings on the listed physical layers (2026-03-22 #414 / #374).
        self.ve_slot = {layer: k for k, layer in enumerate(_layer_list(ve_layers))} if ve_enabled else {}
        self.ve_shared = ValueEmbedding(vocab_size, ve_dim, num_kv_heads * head_dim) if self.ve_slot else None
        if self.ve_slot:
            scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in self.ve_slot)
            self.ve_layer_scales = with_role(scales, CONTROL)
        # Skip weights and gates steer the stream: Adam at scalar_lr, fp32, kept float.
        for name in ("skip_weights", "skip_gates"):
            if self._parameters.get(name) is not None:
                set_role(self, name, CONTROL)
        # The final RMSNorm as a module (no parameters): calibration hooks its output, the tied head's input.
        self.final_norm = nn.RMSNorm(model_dim, elementwise_affine=False)
        self.lm_head = None if tie_embeddings else with_role(CastedLinear(model_dim, vocab_size), HEAD)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=tied_embed_init_std)
            if overtone_init:
                overtone_init_(self.tok_emb.weight)
        if ortho_init:
            orthogonal_init_(self, min_dim=ortho_min_dim,
                             proj_scale=1.0 / math.sqrt(2 * num_layers) if ortho_proj_scale else 1.0)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)
        if phase_resid_mix_init:
            phase_resid_mix_init_(self.blocks)
        roles_of(self)  # every parameter has a role (roles.py), else one error naming it
        log.info("model parts: %s", "; ".join(self.describe()) or "the baseline's")

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
