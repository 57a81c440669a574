"""Which treatment each tensor gets: rules as data, the records' presets, and validation.

A rule set is an ordered list of (pattern, treatment) plus the fixed steps every record's
exporter takes before its name rules: non-float tensors pass through exactly, small float
tensors are kept as float (fp32 for control tensors, fp16 otherwise), and tensors that are
not 2-D may get a different integer treatment. Patterns are substrings of the parameter
name, as in the records; `re:` makes a regex (re.search) and a leading `?` marks a rule that
may match nothing (a module some model variants lack, like the bigram hash).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pgolf.errors import PgolfError
from pgolf.quant.lqer import LQER
from pgolf.quant.treatments import FP16, FP32, GPTQ_CLIPS, INT8, Treatment

# Baseline CONTROL_TENSOR_NAME_PATTERNS: per-channel gains and mixes that stay fp32.
CONTROL_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights",
)  # fmt: skip
# The 2026-03-20 records add their SmearGate gate and bigram scale.
CONTROL_PATTERNS_0320 = (*CONTROL_PATTERNS, "smear", "bigram.scale")


@dataclass(frozen=True)
class QuantRules:
    """An export plan. For each float tensor, in this order (the records' order):

    0. the first `first` rule whose pattern matches (before any size step: the records route
       the attention-gate weights to int8 this way, 04-19 #1736's quant-gate);
    1. numel <= small_numel: `control_small` if a control pattern matches, else `small`;
    2. a control pattern matches and `control_large` is set: `control_large`;
    3. the first rule whose pattern matches, else `default`;
    4. an `int` result on a tensor that is not 2-D becomes `vector` when that is set.
    Treatments may be given as spec strings ("int6:rowmax"); they are parsed on creation.
    `quant_format` is the artifact's `__quant_format__` tag; None writes the baseline's (or
    pgolf's grouped tag when a rule groups). A preset whose record writes its own tag uses
    it, so that for the same codes the artifact is the record's, byte for byte.
    `lqer` (an LQER or its keyword mapping) adds low-rank error factors to the `top_k` worst
    integer tensors after every tensor has its codes, whatever treatment made them.
    `awq_lite_bits` > 0 turns on AWQ-lite (#1908): the model's top `awq_lite_group_top_k`
    salient `awq_lite_group_size`-column groups of GPTQ tensors get that many bits (state.py).
    """

    rules: tuple[tuple[str, Treatment], ...] = ()
    default: Treatment = INT8
    small_numel: int = 65_536
    small: Treatment = FP16
    control_patterns: tuple[str, ...] = CONTROL_PATTERNS
    control_small: Treatment = FP32
    control_large: Treatment | None = None
    vector: Treatment | None = None
    quant_format: str | None = None
    lqer: LQER | None = None
    first: tuple[tuple[str, Treatment], ...] = ()
    awq_lite_bits: int = 0
    awq_lite_group_size: int = 64
    awq_lite_group_top_k: int = 1
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", _parse_rules(self.rules))
        object.__setattr__(self, "first", _parse_rules(self.first))
        if self.awq_lite_bits and not (4 <= self.awq_lite_bits <= 8 and self.awq_lite_group_size > 0
                                       and self.awq_lite_group_top_k > 0):
            raise PgolfError(f"awq_lite_bits={self.awq_lite_bits} group_size={self.awq_lite_group_size} "
                             f"top_k={self.awq_lite_group_top_k}: use bits 4..8 (#1908: 8), a positive group "
                             "size (64) and top_k (1), or awq_lite_bits=0 for off")
        object.__setattr__(self, "control_patterns", tuple(self.control_patterns))
        for key in ("default", "small", "control_small", "control_large", "vector"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, Treatment.parse(value))
        if isinstance(self.lqer, Mapping):
            try:
                object.__setattr__(self, "lqer", LQER(**self.lqer))
            except TypeError:
                raise PgolfError(f"lqer options {sorted(self.lqer)} are not understood; use rank, factor_bits, asym, "
                                 "asym_group, top_k, scope") from None
        for pattern in self.lqer.scope if self.lqer else ():
            _check_pattern(pattern)
        if self.small_numel < 0:
            raise PgolfError(f"small_numel={self.small_numel} is negative; use 0 to quantize every float tensor")

    def treatment_for(self, name: str, shape: Sequence[int]) -> Treatment:
        """The treatment of a float tensor called `name` with this shape."""
        return self._decide(name, tuple(shape))[0]

    def _decide(self, name: str, shape: tuple[int, ...]) -> tuple[Treatment, int | None]:
        # Returns the treatment and the index of the rule that chose it (None: a fixed step).
        numel = 1
        for d in shape:
            numel *= d
        for i, (pattern, treatment) in enumerate(self.first):
            if matches(pattern, name):
                return treatment, len(self.rules) + i
        control = any(p in name for p in self.control_patterns)
        if numel <= self.small_numel:
            return (self.control_small if control else self.small), None
        if control and self.control_large is not None:
            return self.control_large, None
        chosen, index = self.default, None
        for i, (pattern, treatment) in enumerate(self.rules):
            if matches(pattern, name):
                chosen, index = treatment, i
                break
        if chosen.kind == "int" and len(shape) != 2 and self.vector is not None:
            chosen = self.vector
        return chosen, index


def _parse_rules(entries) -> tuple[tuple[str, Treatment], ...]:
    rules = []
    for entry in entries:
        if isinstance(entry, str) or not (isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], str)):
            raise PgolfError(f"quant rule {entry!r} is not a (pattern, treatment) pair; "
                             "write e.g. ('.mlp.', 'int6:rowmax')")
        _check_pattern(entry[0])
        rules.append((entry[0], Treatment.parse(entry[1])))
    return tuple(rules)


def _check_pattern(pattern: str) -> None:
    body = pattern.removeprefix("?")
    if not body or body == "re:":
        raise PgolfError(f"quant rule pattern {pattern!r} is empty; give a substring of a parameter name")
    if body.startswith("re:"):
        try:
            re.compile(body[3:])
        except re.error as e:
            raise PgolfError(f"quant rule pattern {pattern!r} is not a valid regex ({e}); "
                             "fix the expression after 're:'") from None


def matches(pattern: str, name: str) -> bool:
    """Substring match as in the records; `re:` searches a regex; a leading `?` is ignored."""
    body = pattern.removeprefix("?")
    if body.startswith("re:"):
        return re.search(body[3:], name) is not None
    return body in name


def _shapes(params: Mapping[str, object] | Iterable[tuple[str, object]]) -> list[tuple[str, tuple[int, ...]]]:
    items = params.items() if isinstance(params, Mapping) else params
    out = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                continue  # non-float tensors pass through whatever the rules say
            value = value.shape
        out.append((name, tuple(int(d) for d in value)))
    return out


def validate_rules(
    rules: QuantRules | str,
    params: Mapping[str, object] | Iterable[tuple[str, object]],
) -> dict[str, str]:
    """Check a rule set against a model before training; return {name: treatment label}.

    `params` maps float parameter names to shapes (or tensors, e.g. a state dict). Raises
    PgolfError for a rule that matches no tensor or never takes effect (every tensor it
    matches is decided earlier), and for a group size that does not divide a matched row.
    """
    rules = get_rules(rules)
    shapes = _shapes(params)
    names = [n for n, _ in shapes]
    plan: dict[str, str] = {}
    took_effect: set[int] = set()
    for name, shape in shapes:
        treatment, index = rules._decide(name, shape)
        plan[name] = treatment.label
        if index is not None:
            took_effect.add(index)
        per_row_only = treatment.gptq or (treatment.clip in GPTQ_CLIPS and treatment.clip != "pctsearch")
        if treatment.kind == "int" and per_row_only and len(shape) != 2:  # GPTQ-lite rounds vectors per tensor
            raise PgolfError(f"quant rule {treatment.label!r} on {name} {shape}: that scale is per row of a 2-D weight; "
                             "give this tensor its own rule or a narrower pattern")
        g = treatment.group_size
        if treatment.kind == "int" and g and len(shape) == 2 and shape[1] % g:
            raise PgolfError(
                f"quant rule {treatment.label!r} on {name} {shape}: group_size {g} does not divide {shape[1]} columns; "
                "pick a divisor or a narrower pattern"
            )
    for pattern in rules.lqer.scope if rules.lqer else ():
        if not pattern.startswith("?") and not any(matches(pattern, n) for n in names):
            raise PgolfError(f"lqer scope pattern {pattern!r} matches no parameter; fix it or mark it optional with '?'")
    for i, (pattern, _) in enumerate((*rules.rules, *rules.first)):
        if pattern.startswith("?") or i in took_effect:
            continue
        hits = [n for n in names if matches(pattern, n)]
        sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        if not hits:
            raise PgolfError(f"quant rule pattern {pattern!r} matches no parameter (have: {sample}); "
                             "fix the pattern or mark it optional with '?'")
        raise PgolfError(
            f"quant rule pattern {pattern!r} never takes effect: {hits[0]} and any other match is decided earlier "
            "(small-tensor/control step or an earlier rule); reorder or remove it"
        )
    return plan


# -----------------------------
# PRESETS
# -----------------------------
#
# One per record exporter, as plain data. The comments give the record each reproduces;
# tests/test_quant.py holds golden fingerprints of the records' own outputs for each.

_INT6 = Treatment(kind="int", bits=6)
_INT6_ROWMAX = Treatment(kind="int", bits=6, clip="rowmax")
_INT5_ROWMAX = Treatment(kind="int", bits=5, clip="rowmax")
_INT6_FLOOR = Treatment(kind="int", bits=6, clip="rowmax_floor")

PRESETS: dict[str, QuantRules] = {
    # Baseline train_gpt.py: per-row int8 at the 99.99984th percentile; <= 65,536 elements
    # kept as fp16 (controls fp32); vectors per-tensor int8; zlib-9 in the baseline.
    "int8": QuantRules(name="int8"),
    # 2026-03-19_smeargate_orthoinit_muonwd (train_gpt_v5.py, 1.1556): every large matrix
    # int6 at the same percentile, tok_emb and the bigram hash table fp16, vectors int8.
    "int6": QuantRules(
        name="int6",
        rules=(("tok_emb", FP16), ("?bigram_hash", FP16)),
        default=_INT6,
        vector=INT8,
    ),
    # 2026-03-19_MixedQuant_Int6Int8_SlidingWindow: int6 percentile, but tok_emb (no STE
    # during training) keeps int8.
    "mixed_int6_int8": QuantRules(name="mixed_int6_int8", rules=(("tok_emb", INT8),), default=_INT6, vector=INT8),
    # 2026-03-20_Int6_MLP3x_SmearGate_BigramHash_MuonWD_SWA (1.1458): rowmax int6 for
    # `.mlp.` and attention (its `_classify_param`), fp16 tok_emb and blocks.8 c_k,
    # percentile int8 for the rest. Its small step stores controls as fp16 too, and large
    # controls go fp32.
    "int6_rowmax": QuantRules(
        name="int6_rowmax",
        rules=(
            ("tok_emb", FP16), ("blocks.8.attn.c_k", FP16), ("?lm_head", INT8),
            (".mlp.", _INT6_ROWMAX), (".attn.", _INT6_ROWMAX), ("?.proj.", _INT6_ROWMAX),
        ),  # fmt: skip
        control_patterns=CONTROL_PATTERNS_0320,
        control_small=FP16,
        control_large=FP32,
    ),
    # 2026-03-20_10L_Int5MLP_MuonWD04_SWA50 (1.1428): as int6_rowmax with int5 for `.mlp.`,
    # int6 for the bigram module, and a small-tensor threshold of 8,192 elements.
    "int5mlp": QuantRules(
        name="int5mlp",
        rules=(
            ("tok_emb", FP16), ("blocks.8.attn.c_k", FP16), ("?lm_head", INT8),
            (".mlp.", _INT5_ROWMAX), ("?bigram", _INT6_ROWMAX),
            (".attn.", _INT6_ROWMAX), ("?.proj.", _INT6_ROWMAX),
        ),  # fmt: skip
        small_numel=8192,
        control_patterns=CONTROL_PATTERNS_0320,
        control_small=FP16,
        control_large=FP32,
    ),
    # 2026-03-20_11L_EfficientPartialXSA_FA3_SWA120 (#265, 1.1307) and 03-21 #315 (1.1248), the same
    # `mixed_quantize_int6`: rowmax int6 with the scale floored at 1/31 for `.mlp.` and attention
    # (`_classify_param`), percentile int8 for tok_emb and the rest; every tensor of <= 65,536
    # elements fp16 (controls too), large controls fp32; zstd-22.
    "int6_0320": QuantRules(
        name="int6_0320",
        rules=(("tok_emb", INT8), ("?lm_head", INT8), (".mlp.", "int6:rowmax_floor16"),
               (".attn.", "int6:rowmax_floor16"), ("?.proj.", "int6:rowmax_floor16")),
        control_patterns=(*CONTROL_PATTERNS, "smear"), control_small=FP16, control_large=FP32,
    ),
    # 2026-03-22 #414 (1.1228) and 03-23 #549 (1.1194), GPTQ-lite without GPTQ: per row, the clip of
    # five percentiles (99.9 .. 100) with the lowest reconstruction MSE, int6 [-31, 31], the scale
    # floored at 1/31 in fp16; otherwise as int6_0320 (#549 adds its own controls and lzma-6).
    "int6_pctsearch": QuantRules(
        name="int6_pctsearch",
        rules=(("tok_emb", INT8), ("?lm_head", INT8), (".mlp.", "int6:pctsearch"), (".attn.", "int6:pctsearch"),
               ("?.proj.", "int6:pctsearch")),
        control_patterns=(*CONTROL_PATTERNS, "smear", "dtg_gate", "ve_layer_scales", "ve_shared.scale", "attn_gate",
                          "vr_lambda"),
        control_small=FP16, control_large=FP32,
    ),
    # PR #99 "Int6 MLP3x + Late-K Passthrough" (takhir-iota, 1.1605): INT8_KEEP_FLOAT for
    # tok_emb and the last two c_k, LOWBIT_BITS=6 on mlp/c_q/c_v/proj, INT8_GROUP_OVERRIDES
    # .attn.c_k.:64. Its keep-float step runs before the low-bit and group steps.
    "late_k": QuantRules(
        name="late_k",
        rules=(
            ("tok_emb.weight", FP16), ("blocks.7.attn.c_k.weight", FP16), ("blocks.8.attn.c_k.weight", FP16),
            (".mlp.", _INT6_FLOOR), (".attn.c_q.", _INT6_FLOOR), (".attn.c_v.", _INT6_FLOOR),
            (".attn.proj.", _INT6_FLOOR), (".attn.c_k.", Treatment(kind="int", group_size=64)),
        ),  # fmt: skip
        vector=INT8,
    ),
    # 2026-03-19_WarmdownQuantization: int6 percentile everywhere (vectors too), tok_emb and
    # the last two layers' c_k fp16 (the record computes "last two"; blocks.7/8 is 9 layers).
    "int6_warmdown": QuantRules(
        name="int6_warmdown",
        rules=(("tok_emb.weight", FP16), ("re:^blocks\\.(7|8)\\..*c_k\\.weight$", FP16)),
        default=_INT6,
    ),
    # PR #192 (baudrillardsgh0st, 11L int6 QAT, 1.1502) exporter: int6 percentile everywhere,
    # tok_emb fp16. Its QAT rounds with a rowmax scale instead (see fake_quantize notes).
    "int6_pr192": QuantRules(name="int6_pr192", rules=(("tok_emb.weight", FP16),), default=_INT6,
                             quant_format="int6_in_int8_per_row_v1"),
    # --- the GPTQ era (calibration: quant.calibration, calibrate.py) ---
    # 2026-03-25 #1019 (1.1147) / 03-29 #1060 (1.1122): full-Hessian GPTQ int6 on `.mlp.` and
    # attention with GPTQ-lite's five percentiles (lowest MSE kept), int8 percentile for the rest,
    # large control tensors fp32 (`mixed_quantize_int6`).
    "gptq_pctsearch": QuantRules(
        name="gptq_pctsearch",
        rules=((".mlp.", "gptq:int6:pctsearch"), (".attn.", "gptq:int6:pctsearch"), ("?.proj.", "gptq:int6:pctsearch")),
        control_large=FP32,
    ),
    # 2026-04-05 #1394 (1.0856): GPTQ + SDClip for every tensor over 65,536 elements, int6 k=12.85,
    # tok_emb int8 k=20 through its LM-head Hessian; everything smaller fp16 (`gptq_mixed_quantize`).
    "gptq_sdclip": QuantRules(
        name="gptq_sdclip", rules=(("tok_emb", "gptq:int8:sdclip:k20"),), default="gptq:int6:sdclip:k12.85",
        control_small=FP16,
    ),
    # 2026-04-06 #1412 (1.0835): as gptq_sdclip with Hessian-aware SDClip, lambda 0.175.
    "gptq_hsdclip": QuantRules(
        name="gptq_hsdclip", rules=(("tok_emb", "gptq:int8:sdclip:k20:l0.175"),),
        default="gptq:int6:sdclip:k12.85:l0.175", control_small=FP16,
    ),
    # 2026-04-14 #1626 (1.0719) run: per-class clip (MLP 12, attention 13) and int7 tok_emb at 15 sigma.
    "gptq_int7emb": QuantRules(
        name="gptq_int7emb",
        rules=(("tok_emb", "gptq:int7:sdclip:k15"), (".mlp.", "gptq:int6:sdclip:k12"), (".attn.", "gptq:int6:sdclip:k13")),
        default="gptq:int6:sdclip:k12.85", control_small=FP16,
    ),
    # 2026-04-27 #1855 (1.0611) run, without its LQER: MLP 11.5, attention 13, int7 tok_emb at 14,
    # and the quant-gate (GATED_ATTN_QUANT_GATE=1): attn_gate_w int8 per row, before the fp16 step.
    "gptq_1855": QuantRules(
        name="gptq_1855",
        rules=(("tok_emb", "gptq:int7:sdclip:k14"), (".mlp.", "gptq:int6:sdclip:k11.5"),
               (".attn.", "gptq:int6:sdclip:k13")),
        first=(("?re:\\.attn_gate_w$", "int8:gate"),), default="gptq:int6:sdclip:k12.85", control_small=FP16,
    ),
    # #1945 at 70067534 (1.05943): gptq_1855 + AWQ-lite, one 64-column group kept at int8 (#1908).
    "gptq_awq": QuantRules(
        name="gptq_awq",
        rules=(("tok_emb", "gptq:int7:sdclip:k14"), (".mlp.", "gptq:int6:sdclip:k11.5"),
               (".attn.", "gptq:int6:sdclip:k13")),
        first=(("?re:\\.attn_gate_w$", "int8:gate"),), default="gptq:int6:sdclip:k12.85", control_small=FP16,
        awq_lite_bits=8,
    ),
    # gptq_1855's classes, bits and SDClip scales rounded to nearest (no calibration): the
    # baseline GPTQ's gain is measured against (docs/quantization.md).
    "sdclip_rtn": QuantRules(
        name="sdclip_rtn",
        rules=(("tok_emb", "int7:sdclip:k14"), (".mlp.", "int6:sdclip:k11.5"), (".attn.", "int6:sdclip:k13")),
        first=(("?re:\\.attn_gate_w$", "int8:gate"),), default="int6:sdclip:k12.85", control_small=FP16,
    ),
    # No quantization: every float tensor stored fp32 (lossless for fp32 and bf16 models).
    "none": QuantRules(name="none", default=FP32, small=FP32),
}


# The GPTQ era's presets read Hessians (or are their round-to-nearest twin); their goldens are in
# tests/test_gptq.py, computed by the records' own functions on given weights and Hessians.
GPTQ_PRESETS = ("gptq_pctsearch", "gptq_sdclip", "gptq_hsdclip", "gptq_int7emb", "gptq_1855", "gptq_awq", "sdclip_rtn")


def get_rules(rules: QuantRules | str) -> QuantRules:
    """A QuantRules, or the preset of that name."""
    if isinstance(rules, QuantRules):
        return rules
    if rules not in PRESETS:
        raise PgolfError(f"quant preset {rules!r} is unknown; use one of {', '.join(PRESETS)}")
    return PRESETS[rules]
