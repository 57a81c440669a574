"""Post-training quantization and the compressed artifact, faithful to the challenge's exporters.

treatments: one tensor's integer math (int8 baseline, intN percentile/rowmax, grouped) and
            the QAT `fake_quantize` that shares it.
gptq:       the GPTQ era's per-tensor math: SDClip / Hessian-aware SDClip / percentile-search /
            gate scales, full-Hessian GPTQ with AWQ-lite's protected group.
calibrate:  input Hessians from hooks on the model's own modules (train batches, generated).
rules:      ordered (pattern, treatment) rule sets, the records' presets, validation.
state:      a state dict through a rule set and back.
lqer:       low-rank factors of the worst tensors' quantization error (#1855).
prune:      selective +-1 pruning to a byte target (#1019).
spec:       QuantSpec, the `quant` config group's target.
codecs:     byte compressors (zlib, zstd, lzma, byte shuffle + brotli) told apart by magic.
pergroup:   the per-group coder of #1855 (role groups, row reordering, zpaq/lrzip back ends).
artifact:   atomic export with a size report, and weights_only loading.
"""

from pgolf.quant.artifact import (
    ExportReport,
    TensorRow,
    check_codec,
    compress,
    decompress,
    detect_compressor,
    encoder,
    export,
    load_artifact,
    load_quantized,
    serialize,
)
from pgolf.quant.calibrate import Calibration, HessianHooks, collect_hessians, generate_tokens
from pgolf.quant.gptq import Quantized, quantize_weight
from pgolf.quant.lqer import LQER
from pgolf.quant.rules import CONTROL_PATTERNS, GPTQ_PRESETS, PRESETS, QuantRules, get_rules, matches, validate_rules
from pgolf.quant.spec import QuantSpec
from pgolf.quant.state import dequantize_state_dict, quantize_state_dict
from pgolf.quant.treatments import (
    CLIP_Q,
    FP16,
    FP32,
    INT8,
    Treatment,
    dequantize_tensor,
    fake_quantize,
    fp16_round,
    quantize_tensor,
)

__all__ = [
    "CLIP_Q", "CONTROL_PATTERNS", "FP16", "FP32", "GPTQ_PRESETS", "INT8", "LQER", "PRESETS", "Calibration",
    "ExportReport", "HessianHooks", "QuantRules", "QuantSpec", "Quantized", "TensorRow", "collect_hessians",
    "generate_tokens", "quantize_weight",
    "Treatment", "check_codec", "compress", "decompress", "dequantize_state_dict", "dequantize_tensor", "detect_compressor",
    "encoder", "export", "fake_quantize", "fp16_round", "get_rules", "load_artifact", "load_quantized", "matches",
    "quantize_state_dict", "quantize_tensor", "serialize", "validate_rules",
]  # fmt: skip
