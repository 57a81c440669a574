"""Config checks of the model: every option of `pgolf.model.GPT` validated with one line naming
the field and the fix, allocating nothing, so `pgolf.compose` runs it on every config."""

from __future__ import annotations

from pgolf.errors import PgolfError
from pgolf.model.embeddings import BIGRAM_ATTR, SMEAR_VARIANTS
from pgolf.model.mlp import MLP_ACTIVATIONS
from pgolf.model.recurrence import layer_schedule
from pgolf.model.residual import PARALLEL_FINAL_LANES, PARALLEL_RESIDUALS, TWO_LANE
from pgolf.model.value_residual import VALUE_RESIDUALS


# Which index per-layer options (xsa_last_n, ve_layers, LN scale) and block scalars follow.
LAYER_INDEX = ("physical", "virtual")


def _layer_list(layers: list[int] | str | None) -> list[int]:
    """`[9, 10]` or the records' env form "9,10" -> [9, 10]."""
    if isinstance(layers, str):
        return [int(s) for s in layers.split(",") if s.strip()]
    return [int(i) for i in layers or ()]


def check_model_args(*, vocab_size: int = 1024, num_layers: int = 9, model_dim: int = 512, num_heads: int = 8,
                     num_kv_heads: int = 4, logit_softcap: float = 30.0, smear_gate: str = "none",
                     bigram_buckets: int = 0, bigram_hash: str = "mul", bigram_init: str = "normal", qat_bits: int = 0,
                     qat_clip: str = "percentile", mlp_activation: str = "relu2", negative_slope: float = 0.5,
                     rope_dims: int = 0, rope_train_seq_len: int = 0, xsa_last_n: int = 0,
                     attn_out_gate_enabled: bool = False, attn_out_gate_src: str = "proj",
                     gated_attn_enabled: bool = False, sparse_attn_gate_enabled: bool = False, gate_window: int = 12,
                     parallel_start_layer: int = 0, parallel_residual: str = "routed_2x2",
                     parallel_final_lane: str = "mean", num_loops: int = 0, loop_start: int = 0, loop_end: int = 0,
                     loop_untie_mlp: bool = False, layer_index: str = "physical", disable_layer0_attn: bool = False,
                     ve_enabled: bool = False,
                     ve_dim: int = 128, ve_layers: list[int] | str | None = None, value_residual: str = "none",
                     bos_id: int = 1,
                     num_skip_weights: int | None = None, doc_attention: bool = False,
                     asym_logit_rescale: bool = False, asym_logit_trainable: bool = False,
                     **_: object) -> None:
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
    head_dim = model_dim // num_heads
    if head_dim % 2:
        raise PgolfError(f"head_dim = model.model_dim/model.num_heads = {head_dim} is odd; RoPE needs an even head_dim")
    if logit_softcap <= 0:
        raise PgolfError(f"model.logit_softcap={logit_softcap} must be positive")
    if asym_logit_trainable and not asym_logit_rescale:
        raise PgolfError("model.asym_logit_trainable=true needs model.asym_logit_rescale=true (the caps it trains)")
    choices = (("smear_gate", smear_gate, SMEAR_VARIANTS), ("bigram_hash", bigram_hash, tuple(BIGRAM_ATTR)),
               ("bigram_init", bigram_init, ("normal", "zeros")), ("qat_clip", qat_clip, CLIPS),
               ("mlp_activation", mlp_activation, MLP_ACTIVATIONS), ("attn_out_gate_src", attn_out_gate_src, ("proj", "q")),
               ("parallel_residual", parallel_residual, PARALLEL_RESIDUALS),
               ("parallel_final_lane", parallel_final_lane, PARALLEL_FINAL_LANES),
               ("value_residual", value_residual, VALUE_RESIDUALS), ("layer_index", layer_index, LAYER_INDEX))
    for field, value, allowed in choices:
        if value not in allowed:
            raise PgolfError(f"model.{field}={value!r} is not one of {', '.join(allowed)}")
    if bigram_buckets == 1 or bigram_buckets < 0:
        raise PgolfError(f"model.bigram_buckets={bigram_buckets} must be 0 (off) or at least 2")
    if qat_bits and not 4 <= qat_bits <= 8:
        raise PgolfError(f"model.qat_bits={qat_bits} must be 0 (off) or in 4..8 (the exporter's range)")
    if rope_dims and not (2 < rope_dims <= head_dim and rope_dims % 2 == 0):
        raise PgolfError(f"model.rope_dims={rope_dims} must be 0 (all {head_dim} head dims) or an even number in 4..{head_dim}")
    if rope_train_seq_len < 0:
        raise PgolfError(f"model.rope_train_seq_len={rope_train_seq_len} must be 0 (no NTK rescale) or the RoPE length")
    if not 0 <= xsa_last_n:
        raise PgolfError(f"model.xsa_last_n={xsa_last_n} must be >= 0 (0 = off, >= num_layers = every layer)")
    if negative_slope < 0:
        raise PgolfError(f"model.negative_slope={negative_slope} must be >= 0 (0.5 in the records)")
    gates = [n for n, on in (("attn_out_gate_enabled", attn_out_gate_enabled), ("gated_attn_enabled", gated_attn_enabled),
                             ("sparse_attn_gate_enabled", sparse_attn_gate_enabled)) if on]
    if len(gates) > 1:
        raise PgolfError(f"model.{gates[0]} and model.{gates[1]} are mutually exclusive attention output gates; keep one")
    if (gates and not gated_attn_enabled or smear_gate == "window") and not 1 <= gate_window <= model_dim:
        raise PgolfError(f"model.gate_window={gate_window} must be in 1..model_dim={model_dim}")
    if num_loops < 0:
        raise PgolfError(f"model.num_loops={num_loops} must be >= 0 (0 = no depth recurrence)")
    if num_loops and not 0 <= loop_start <= loop_end < num_layers:
        raise PgolfError(f"model.loop_start={loop_start}, model.loop_end={loop_end} must satisfy "
                         f"0 <= loop_start <= loop_end < num_layers={num_layers} (physical indices, inclusive)")
    if not 0 <= parallel_start_layer < num_layers:
        raise PgolfError(f"model.parallel_start_layer={parallel_start_layer} must be 0 (off) or a physical layer "
                         f"in 1..{num_layers - 1}")
    if parallel_start_layer and parallel_residual in TWO_LANE:
        loop = {"num_loops": num_loops, "loop_start": loop_start, "loop_end": loop_end}
        encoder = layer_schedule(num_layers, passes=num_loops, **loop)[0] + layer_schedule(num_layers)[0]
        if max(encoder, default=-1) >= parallel_start_layer:
            raise PgolfError(f"model.parallel_start_layer={parallel_start_layer} falls in the U-Net encoder "
                             f"(layers {sorted(set(encoder))}); the {parallel_residual} lanes start in the decoder: "
                             f"use at least {max(encoder) + 1}")
    if disable_layer0_attn and layer_index == "virtual" and num_loops and loop_start == 0:
        raise PgolfError("model.disable_layer0_attn=true with model.layer_index=virtual turns off virtual layer 0 "
                         "only, but the loop repeats physical layer 0, whose attention matrices it drops: "
                         "use loop_start >= 1")
    if loop_untie_mlp and not num_loops:
        raise PgolfError("model.loop_untie_mlp=true needs depth recurrence (model.num_loops >= 1)")
    # ve_layers count virtual layers under layer_index=virtual (#1204), physical ones otherwise.
    kind, n_idx = "physical", num_layers
    if layer_index == "virtual":
        kind, n_idx = "virtual", num_layers + num_loops * (loop_end - loop_start + 1) * bool(num_loops)
    layers = _layer_list(ve_layers)
    if ve_enabled and (not layers or any(not 0 <= i < n_idx for i in layers) or len(set(layers)) < len(layers)):
        raise PgolfError(f"model.ve_layers={ve_layers!r} must list distinct {kind} layers in 0..{n_idx - 1}, "
                         "e.g. [9,10]")
    if num_skip_weights is not None and not 0 <= num_skip_weights <= num_layers + num_loops * (loop_end - loop_start + 1):
        raise PgolfError(f"model.num_skip_weights={num_skip_weights} must be null (derived) or a count of U-Net skips")
    if ve_enabled and ve_dim <= 0:
        raise PgolfError(f"model.ve_dim={ve_dim} must be positive")
    if not 0 <= bos_id < vocab_size:
        raise PgolfError(f"model.bos_id={bos_id} must be a token id in 0..{vocab_size - 1}")
    if not isinstance(doc_attention, bool):
        raise PgolfError(f"model.doc_attention={doc_attention!r} must be true or false")
