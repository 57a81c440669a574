"""pgolf.quant reproduces the challenge's exporters bit for bit, and its artifact is safe to load.

Golden fingerprints (GOLDEN, at the bottom) were computed by running each reference
exporter on `golden_state_dict()` (CPU, torch 2.13) with a throwaway script outside this
repository. Sources, all in openai/parameter-golf:
  int8             train_gpt.py @ 4908dc46f (quantize_state_dict_int8)
  int6             records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd/train_gpt_v5.py @ 4908dc46f
  mixed_int6_int8  records/track_10min_16mb/2026-03-19_MixedQuant_Int6Int8_SlidingWindow/train_gpt.py @ 4908dc46f
  int6_warmdown    records/track_10min_16mb/2026-03-19_WarmdownQuantization/train_gpt.py @ 4908dc46f
  int6_rowmax      records/track_10min_16mb/2026-03-20_Int6_MLP3x_SmearGate_BigramHash_MuonWD_SWA/train_gpt.py @ 4908dc46f
  int5mlp          records/track_10min_16mb/2026-03-20_10L_Int5MLP_MuonWD04_SWA50/train_gpt.py @ 4908dc46f
  late_k           PR #99 head 3131670ea, records/track_10min_16mb/2026-03-19_Seed2025_Top2K_Stride64/train_gpt.py
                   (LOWBIT_BITS=6, LOWBIT_NAME_PATTERNS, INT8_KEEP_FLOAT_NAME_PATTERNS, INT8_GROUP_OVERRIDES as in its README)
  int6_pr192       PR #192 head dcac9b577, records/track_10min_16mb/2026-03-20_11L_QAT_SmearGate_WD038/train_gpt.py
                   (quantize_state_dict_int6 with fp16_names={"tok_emb.weight"})
  int6_0320        records/track_10min_16mb/2026-03-20_11L_EfficientPartialXSA_FA3_SWA120/train_gpt.py @ 4908dc46f
                   (mixed_quantize_int6(sd, {"mlp", "attn"}); 2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248's
                   gives the same fingerprint)
  int6_pctsearch   records/track_10min_16mb/2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015_1.1233/train_gpt.py
                   @ 4908dc46f (the same call; 2026-03-23_LeakyReLU_LegalTTT_ParallelMuon's gives the same)
Set PGOLF_REFERENCE_REPO to a checkout of openai/parameter-golf to also compare live.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch

from pgolf.errors import PgolfError
from pgolf.quant import (
    PRESETS,
    GPTQ_PRESETS,
    QuantRules,
    QuantSpec,
    Treatment,
    compress,
    decompress,
    dequantize_state_dict,
    dequantize_tensor,
    detect_compressor,
    export,
    fake_quantize,
    fp16_round,
    load_artifact,
    quantize_state_dict,
    quantize_tensor,
    serialize,
    validate_rules,
)

# -----------------------------
# FIXTURES
# -----------------------------


def golden_state_dict() -> dict[str, torch.Tensor]:
    """Baseline-named tensors with heavy tails, row gains either side of the 1/R scale floor,
    zero rows (zero-init proj), fp16-subnormal scales, a bf16 embedding, large vectors and
    a large control tensor, so every branch of every exporter is exercised."""
    g = torch.Generator().manual_seed(0)

    def mat(rows: int, cols: int, gain: float = 1.0) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=g) * torch.exp(0.5 * torch.randn(rows, cols, generator=g))
        row_gain = torch.logspace(-2.3, 0.0, rows)[torch.randperm(rows, generator=g)]
        return w * row_gain[:, None] * gain

    sd = {
        "tok_emb.weight": mat(1024, 512).bfloat16(),
        "bigram_hash.table.weight": mat(4096, 128),
        "blocks.0.attn_scale": torch.rand(512, generator=g) + 0.5,
        "blocks.0.mlp_scale": torch.rand(512, generator=g) + 0.5,
        "blocks.0.resid_mix": torch.randn(2, 512, generator=g),
        "blocks.0.attn.q_gain": torch.full((8,), 1.5),
        "blocks.0.attn.c_q.weight": mat(512, 512),
        "blocks.0.attn.c_k.weight": mat(256, 512),
        "blocks.0.attn.c_v.weight": mat(256, 512),
        "blocks.0.attn.proj.weight": mat(512, 512),
        "blocks.0.mlp.fc.weight": mat(1536, 512),
        "blocks.0.mlp.proj.weight": mat(512, 1536),
        "blocks.0.mlp.gate_bias": torch.randn(70_000, generator=g) * 0.3,
        "blocks.0.mlp.small_half": torch.randn(64, generator=g).half(),
        "blocks.1.resid_mix": torch.randn(2, 40_000, generator=g),
        "blocks.2.attn.c_q.weight": mat(512, 512, gain=1e-4),
        "blocks.7.attn.c_k.weight": mat(256, 512),
        "blocks.8.attn.c_k.weight": mat(256, 512),
        "skip_weights": torch.ones(4, 512),
        "step": torch.arange(3, dtype=torch.int64),
    }
    sd["blocks.0.attn.proj.weight"][:8] = 0.0
    return sd


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_line(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}{hashlib.sha256(_bytes(t)).hexdigest()}"


def fingerprint_parts(entries: dict[str, tuple]) -> dict[str, str]:
    """{name: ("q", codes, scale) | ("p", kept tensor)} -> {name: sha256 of dtypes, shapes, bytes}."""
    return {n: digest(n + e[0] + "".join(_tensor_line(t) for t in e[1:])) for n, e in entries.items()}


def entries_of(obj: dict) -> dict[str, tuple]:
    out: dict[str, tuple] = {n: ("q", q, obj["scales"][n]) for n, q in obj["quantized"].items()}
    out.update({n: ("p", t) for n, t in obj["passthrough"].items()})
    return out


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return golden_state_dict()


@pytest.fixture(scope="module")
def quantized(sd):
    """preset -> quantize_state_dict(sd) output, computed once per module."""
    cache: dict[str, tuple[dict, dict]] = {}

    def get(preset: str) -> tuple[dict, dict]:
        if preset not in cache:
            cache[preset] = quantize_state_dict(sd, rules=preset)
        return cache[preset]

    return get


# -----------------------------
# EXACTNESS AGAINST THE REFERENCES
# -----------------------------


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p != "none" and p not in GPTQ_PRESETS))
def test_matches_reference_golden(quantized, preset):
    obj, _ = quantized(preset)
    parts = fingerprint_parts(entries_of(obj))
    want = GOLDEN[preset]
    bad = sorted(n for n in parts if parts[n][:12] != want.get(n))
    assert not bad, f"{preset}: tensors differ from the reference exporter: {bad}"
    assert digest("".join(parts[n] for n in sorted(parts))) == want["all"]


def test_golden_exact_values(quantized):
    # A few values read off the references' output, for a human-readable failure.
    for preset, (codes, scales) in EXACT.items():
        obj, _ = quantized(preset)
        assert obj["quantized"]["blocks.0.mlp.fc.weight"][1, :6].tolist() == codes, preset
        assert obj["scales"]["blocks.0.mlp.fc.weight"].flatten()[:3].tolist() == scales, preset
    obj, _ = quantized("late_k")
    assert obj["qmeta"]["blocks.0.attn.c_k.weight"] == {"scheme": "per_row_group", "axis": 0, "group_size": 64}
    assert tuple(obj["scales"]["blocks.0.attn.c_k.weight"].shape) == (256, 8)


def _reference(repo: Path, rel: str, env: dict[str, str] | None = None):
    path = repo / rel
    if not path.exists():
        pytest.skip(f"{rel} is not in {repo} (PR-only records need the PR ref checked out)")
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        spec = importlib.util.spec_from_file_location(f"pgolf_ref_{abs(hash(rel))}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # module level only defines things; main() is guarded
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return mod


def _mixed_entries(result: dict, meta: dict) -> dict[str, tuple]:
    return {n: ("p", result[n]) if isinstance(m, str) else ("q", result[n + ".q"], result[n + ".scale"]) for n, m in meta.items()}


_R = "records/track_10min_16mb/"
_PR99_ENV = {
    "LOWBIT_BITS": "6", "LOWBIT_NAME_PATTERNS": ".mlp.,.attn.c_q.,.attn.c_v.,.attn.proj.",
    "INT8_KEEP_FLOAT_NAME_PATTERNS": "tok_emb.weight,blocks.7.attn.c_k.weight,blocks.8.attn.c_k.weight",
    "INT8_GROUP_OVERRIDES": ".attn.c_k.:64",
}  # fmt: skip
REFERENCES = {
    "int8": ("train_gpt.py", None, lambda m, sd: entries_of(m.quantize_state_dict_int8(sd)[0])),
    "int6": (_R + "2026-03-19_smeargate_orthoinit_muonwd/train_gpt_v5.py", None, lambda m, sd: entries_of(m.quantize_state_dict_int8(sd)[0])),
    "mixed_int6_int8": (_R + "2026-03-19_MixedQuant_Int6Int8_SlidingWindow/train_gpt.py", None, lambda m, sd: entries_of(m.quantize_state_dict_int8(sd)[0])),
    "int6_warmdown": (_R + "2026-03-19_WarmdownQuantization/train_gpt.py", None, lambda m, sd: entries_of(m.quantize_state_dict_int8(sd)[0])),
    "int6_rowmax": (_R + "2026-03-20_Int6_MLP3x_SmearGate_BigramHash_MuonWD_SWA/train_gpt.py", None,
                    lambda m, sd: _mixed_entries(*m.mixed_quantize_int6(sd, {"mlp", "attn"}))),
    "int5mlp": (_R + "2026-03-20_10L_Int5MLP_MuonWD04_SWA50/train_gpt.py", None,
                lambda m, sd: _mixed_entries(*m.mixed_quantize_int6(sd, {"mlp", "attn", "bigram"}))),
    "late_k": (_R + "2026-03-19_Seed2025_Top2K_Stride64/train_gpt.py", _PR99_ENV, lambda m, sd: entries_of(m.quantize_state_dict_int8(sd)[0])),
    "int6_0320": (_R + "2026-03-20_11L_EfficientPartialXSA_FA3_SWA120/train_gpt.py", None,
                  lambda m, sd: _mixed_entries(*m.mixed_quantize_int6(sd, {"mlp", "attn"}))),
    "int6_pctsearch": (_R + "2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015_1.1233/train_gpt.py", None,
                       lambda m, sd: _mixed_entries(*m.mixed_quantize_int6(sd, {"mlp", "attn"}))),
    "int6_pr192": (_R + "2026-03-20_11L_QAT_SmearGate_WD038/train_gpt.py", None,
                   lambda m, sd: entries_of(m.quantize_state_dict_int6(sd, fp16_names={"tok_emb.weight"})[0])),
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(REFERENCES))
def test_matches_reference_live(preset):
    repo = os.environ.get("PGOLF_REFERENCE_REPO")
    if not repo:
        pytest.skip("set PGOLF_REFERENCE_REPO to a checkout of openai/parameter-golf to compare live")
    rel, env, run = REFERENCES[preset]
    mod = _reference(Path(repo), rel, env)
    g = torch.Generator().manual_seed(1234)
    for trial in range(2):
        sd = golden_state_dict() if trial == 0 else {
            k: (torch.randn(v.shape, generator=g) * (0.02 + 2 * torch.rand((), generator=g))).to(v.dtype) if v.is_floating_point() else v
            for k, v in golden_state_dict().items()
        }  # fmt: skip
        obj, _ = quantize_state_dict(sd, rules=preset)
        assert fingerprint_parts(entries_of(obj)) == fingerprint_parts(run(mod, sd))
    if preset == "late_k":  # PR #99's own STE target (LOWBIT_STE=1) is our fake_quantize value
        for w in (sd["blocks.0.mlp.fc.weight"], sd["blocks.0.mlp.fc.weight"].bfloat16()):
            want = mod.quantize_dequantize_float_tensor("blocks.0.mlp.fc.weight", w)
            assert torch.equal(fake_quantize(w, bits=6, clip="rowmax_floor"), want)
    if preset == "int8":  # same object, so the same artifact bytes and the baseline's loader reads ours
        ref_obj, _ = mod.quantize_state_dict_int8(sd)
        assert serialize(obj) == serialize(ref_obj)
        ours, theirs = dequantize_state_dict(obj), mod.dequantize_state_dict_int8(obj)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# -----------------------------
# TENSOR MATH
# -----------------------------


def test_int8_round_trip_error_bound(sd):
    w = sd["blocks.0.mlp.fc.weight"]
    q, s, meta = quantize_tensor(w, Treatment.parse("int8"))
    deq = dequantize_tensor(q, s, dtype=torch.float32, meta=meta)
    clip = torch.quantile(w.abs(), 99.99984 / 100.0, dim=1)
    unclipped = w.abs() <= clip[:, None]
    s32 = s.float()[:, None]
    # Half a step, plus what storing the scale in fp16 (rel. error <= 2**-11) moves a code.
    bound = s32 * (0.5 + 2.0**-11 * (q.abs().float() + 1))
    assert ((w - deq).abs() <= bound)[unclipped].all()
    assert q[~unclipped].abs().max() == 127 and s.dtype == torch.float16


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("clip", ["percentile", "rowmax", "rowmax_floor", "rowmax_floor16"])
def test_intn_code_ranges(sd, bits, clip):
    r = 2 ** (bits - 1) - 1
    lo = -r if clip == "percentile" else -(r + 1)  # rowmax records clamp to [-(R+1), R]
    for name in ("blocks.0.mlp.fc.weight", "blocks.2.attn.c_q.weight", "blocks.0.mlp.gate_bias"):
        q, s, _ = quantize_tensor(sd[name], Treatment(kind="int", bits=bits, clip=clip))
        assert q.dtype == torch.int8 and lo <= int(q.min()) and int(q.max()) <= r
    q, s, _ = quantize_tensor(sd["blocks.0.mlp.fc.weight"], Treatment(kind="int", bits=bits, clip=clip))
    assert int(q.max()) == r and s.dtype == torch.float16 and s.shape == (1536,)
    # The percentile and rowmax_floor scales are floored at 1/R (as in the records), so a
    # matrix of 1e-4-sized weights rounds to all zeros there; rowmax floors at fp16's 2**-14.
    q, s, _ = quantize_tensor(sd["blocks.2.attn.c_q.weight"], Treatment(kind="int", bits=bits, clip=clip))
    assert (int(q.abs().max()) > 0) == (clip == "rowmax")
    assert float(s.min()) == (2.0**-14 if clip == "rowmax" else float(torch.tensor(1.0 / r).half()))


def test_rowmax_handles_zero_and_subnormal_rows(sd):
    q, s, meta = quantize_tensor(sd["blocks.0.attn.proj.weight"], Treatment.parse("int6:rowmax"))
    assert (q[:8] == 0).all() and (s[:8].float() == torch.finfo(torch.float16).tiny).all()
    deq = dequantize_tensor(q, s, dtype=torch.float32, meta=meta)
    assert torch.isfinite(deq).all() and (deq[:8] == 0).all()


def test_fp16_round_matches_half():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=g) / 31, torch.randn(20000, generator=g) * 1e-5,
                   torch.randn(20000, generator=g) * 1e4, torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, 2.0**-25, 3 * 2.0**-26])])  # fmt: skip
    # Exact ties in the normal range: 1 + k * 2**-11 for odd k rounds to even.
    x = torch.cat([x, 1.0 + torch.arange(1, 64, 2) * 2.0**-11, -(0.5 + torch.arange(1, 64, 2) * 2.0**-12)])
    assert torch.equal(fp16_round(x).view(torch.int32), x.half().float().view(torch.int32))


# -----------------------------
# QAT
# -----------------------------

_FAKE_CASES = [(b, c, g) for b in (4, 5, 6, 7, 8) for c in ("percentile", "rowmax", "rowmax_floor") for g in (0, 64)]
_FAKE_CASES += [(6, "rowmax_floor16", 0)]  # the 03-20 #265 / 03-21 #315 export rule


@pytest.mark.parametrize(("bits", "clip", "group_size"), _FAKE_CASES)
def test_fake_quantize_equals_export_round_trip(sd, bits, clip, group_size):
    t = Treatment(kind="int", bits=bits, clip=clip, group_size=group_size)
    # 64 rows of each: ordinary rows, fp16-subnormal scales, and all-zero rows.
    for name in ("blocks.0.attn.c_k.weight", "blocks.2.attn.c_q.weight", "blocks.0.attn.proj.weight"):
        for w in (sd[name][:64], sd[name][:64].bfloat16()):
            q, s, meta = quantize_tensor(w, t)
            want = dequantize_tensor(q, s, dtype=w.dtype, meta=meta)
            got = fake_quantize(w, bits=bits, clip=clip, group_size=group_size)
            assert got.dtype == w.dtype and torch.equal(got, want), (name, w.dtype)


def test_fake_quantize_gradient_is_identity(sd):
    w = sd["blocks.0.attn.c_q.weight"].clone().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (fake_quantize(w, bits=6, clip="rowmax") * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_fake_quantize_rejects_vectors():
    with pytest.raises(PgolfError, match="2-d"):
        fake_quantize(torch.ones(8), bits=6, clip="rowmax")


@pytest.mark.slow
def test_fake_quantize_compiles_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 128, generator=g) * torch.logspace(-4, 0.5, 64)[:, None]).requires_grad_(True)

    def step(w):
        return (fake_quantize(w, bits=6, clip="rowmax") + fake_quantize(w, bits=5, clip="percentile")
                + fake_quantize(w, bits=8, clip="rowmax_floor", group_size=32))  # fmt: skip

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = compiled(w)
    assert torch.equal(got, step(w))  # incl. the fp16 scale rounding inductor would drop
    got.sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: QAT runs on the GPU, the exporter on the CPU")
def test_fake_quantize_on_cuda_compiled_equals_cpu_export(sd):
    torch._dynamo.reset()
    for clip, g in (("rowmax", 0), ("percentile", 0), ("rowmax_floor", 0), ("percentile", 64)):
        for w in (sd["blocks.0.mlp.fc.weight"], sd["blocks.2.attn.c_q.weight"], sd["blocks.0.attn.proj.weight"]):
            t = Treatment(kind="int", bits=6, clip=clip, group_size=g)
            q, s, meta = quantize_tensor(w, t)
            want = dequantize_tensor(q, s, dtype=w.dtype, meta=meta)
            got = torch.compile(fake_quantize, fullgraph=True)(w.cuda(), bits=6, clip=clip, group_size=g)
            assert torch.equal(got.cpu(), want), (clip, g)


# -----------------------------
# RULES
# -----------------------------


def test_first_matching_rule_wins():
    rules = QuantRules(rules=(("c_k", "fp16"), (".attn.", "int6:rowmax"), ("re:c_[kq]", "int5")), default="int8")
    assert rules.treatment_for("blocks.0.attn.c_k.weight", (256, 512)).label == "fp16"
    assert rules.treatment_for("blocks.0.attn.c_q.weight", (512, 512)).label == "int6:rowmax"
    assert rules.treatment_for("blocks.0.mlp.fc.weight", (1024, 512)).label == "int8"
    reordered = QuantRules(rules=((".attn.", "int6:rowmax"), ("c_k", "fp16")))
    assert reordered.treatment_for("blocks.0.attn.c_k.weight", (256, 512)).label == "int6:rowmax"


def test_baseline_small_and_control_rules():
    rules = PRESETS["int8"]
    assert rules.treatment_for("blocks.0.attn_scale", (512,)).label == "fp32"
    assert rules.treatment_for("blocks.0.attn.q_gain", (8,)).label == "fp32"
    assert rules.treatment_for("skip_weights", (4, 512)).label == "fp32"
    assert rules.treatment_for("blocks.0.foo", (256, 256)).label == "fp16"  # 65,536 elements: kept
    assert rules.treatment_for("blocks.0.foo", (65_537,)).label == "int8"
    assert rules.treatment_for("blocks.0.resid_mix", (2, 40_000)).label == "int8"  # the baseline quantizes big controls
    int5 = PRESETS["int5mlp"]
    assert int5.treatment_for("blocks.0.attn_scale", (512,)).label == "fp16"  # small step runs first there
    assert int5.treatment_for("blocks.0.resid_mix", (2, 40_000)).label == "fp32"
    assert int5.treatment_for("blocks.0.mlp.fc.weight", (1536, 512)).label == "int5:rowmax"
    late = PRESETS["late_k"]
    assert late.treatment_for("blocks.8.attn.c_k.weight", (256, 512)).label == "fp16"
    assert late.treatment_for("blocks.3.attn.c_k.weight", (256, 512)).label == "int8:g64"
    assert late.treatment_for("blocks.3.mlp.gate", (70_000,)).label == "int8"  # low-bit is 2-D only


BASELINE_SHAPES = {"tok_emb.weight": (1024, 512), "skip_weights": (4, 512)} | {
    f"blocks.{i}.{k}": s for i in range(9) for k, s in {
        "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512), "attn.q_gain": (8,),
        "attn.c_q.weight": (512, 512), "attn.c_k.weight": (256, 512), "attn.c_v.weight": (256, 512),
        "attn.proj.weight": (512, 512), "mlp.fc.weight": (1536, 512), "mlp.proj.weight": (512, 1536)}.items()
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate_on_baseline_shapes(preset):
    plan = validate_rules(preset, BASELINE_SHAPES)
    assert set(plan) == set(BASELINE_SHAPES)


def test_unmatched_pattern_is_reported_with_real_names():
    rules = QuantRules(rules=((".mlp.", "int5:rowmax"), ("blocks.9.attn.c_k", "fp16")))
    with pytest.raises(PgolfError, match=r"'blocks\.9\.attn\.c_k' matches no parameter \(have: tok_emb\.weight"):
        validate_rules(rules, list(BASELINE_SHAPES.items()))
    validate_rules(QuantRules(rules=((".mlp.", "int5"), ("?blocks.9.attn.c_k", "fp16"))), BASELINE_SHAPES)


def test_shadowed_rule_and_bad_group_are_reported():
    with pytest.raises(PgolfError, match="never takes effect"):
        validate_rules(QuantRules(rules=((".attn.", "int6"), (".attn.c_k.", "fp16"))), BASELINE_SHAPES)
    with pytest.raises(PgolfError, match="never takes effect"):  # only matches small tensors
        validate_rules(QuantRules(rules=(("q_gain", "int6"),)), BASELINE_SHAPES)
    with pytest.raises(PgolfError, match="group_size 96 does not divide 512"):
        validate_rules(QuantRules(rules=((".attn.c_k.", "int8:g96"),)), BASELINE_SHAPES)


@pytest.mark.parametrize("bad", ["int9", "int3", "int6:minmax", "fp8", "int6:g", ""])
def test_bad_treatment_specs_raise(bad):
    with pytest.raises(PgolfError, match="treatment"):
        QuantRules(rules=((".mlp.", bad),))


def test_bad_patterns_and_presets_raise():
    with pytest.raises(PgolfError, match="not a valid regex"):
        QuantRules(rules=(("re:blocks.(", "fp16"),))
    with pytest.raises(PgolfError, match="empty"):
        QuantRules(rules=(("?", "fp16"),))
    with pytest.raises(PgolfError, match="unknown; use one of"):
        quantize_state_dict({}, rules="int4_everything")


def test_treatment_labels_round_trip():
    for spec in ("fp16", "fp32", "int8", "int6:rowmax", "int5:rowmax_floor", "int6:rowmax_floor16", "int8:g64",
                 "int6:rowmax:g128", "int6:pctsearch"):
        assert Treatment.parse(spec).label == spec


# -----------------------------
# STATE DICT ROUND TRIP
# -----------------------------


def test_dequantize_restores_dtypes_and_nonfloats(sd, quantized):
    obj, stats = quantized("int6")
    out = dequantize_state_dict(obj)
    assert set(out) == set(sd)
    assert all(out[k].dtype == v.dtype and out[k].shape == v.shape for k, v in sd.items())
    assert torch.equal(out["step"], sd["step"])
    assert torch.equal(out["blocks.0.attn_scale"], sd["blocks.0.attn_scale"])  # control: fp32, exact
    assert stats["tensors"]["tok_emb.weight"]["treatment"] == "fp16"
    assert stats["num_tensors"] == len(sd) and stats["param_count"] == sum(v.numel() for v in sd.values())


def test_none_preset_is_lossless(sd):
    obj, _ = quantize_state_dict(sd, rules="none")
    out = dequantize_state_dict(obj)
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_quantized_object_is_plain_data(quantized):
    obj, _ = quantized("late_k")
    back = torch.load(io.BytesIO(serialize(obj)), map_location="cpu", weights_only=True)
    assert back["__quant_format__"] == "pgolf_per_row_group_v1"
    assert quantized("int8")[0]["__quant_format__"] == "int8_clean_per_row_v1"


# -----------------------------
# COMPRESSION AND ARTIFACT
# -----------------------------


@pytest.mark.parametrize(("compressor", "level"), [("zlib", None), ("zlib", 1), ("zstd", None), ("zstd", 3)])
def test_compress_round_trip_and_detection(compressor, level):
    raw = bytes(range(256)) * 300 + b"pgolf" * 1000
    blob = compress(raw, compressor=compressor, level=level)
    assert detect_compressor(blob) == compressor and decompress(blob) == raw


def test_default_levels_are_the_records():
    raw = os.urandom(4096) * 8
    assert compress(raw, compressor="zlib") == zlib.compress(raw, level=9)
    zstandard = pytest.importorskip("zstandard")
    assert compress(raw, compressor="zstd") == zstandard.ZstdCompressor(level=22).compress(raw)


def test_decompress_rejects_unknown_and_corrupt():
    with pytest.raises(PgolfError, match="not a zstd, lzma, zlib or brotli stream"):
        decompress(b"PK\x03\x04 not compressed")
    blob = bytearray(compress(b"x" * 1000, compressor="zlib"))
    blob[-1] ^= 0xFF
    with pytest.raises(PgolfError, match="corrupt zlib"):
        decompress(bytes(blob))
    with pytest.raises(PgolfError, match="compressor 'lz4' is unknown"):
        compress(b"", compressor="lz4")


@pytest.mark.parametrize(("preset", "compressor"), [("int8", "zlib"), ("late_k", "zstd")])
def test_export_and_load(tmp_path, sd, quantized, preset, compressor):
    path = tmp_path / "out" / "final_model.ptz"
    report = export(sd, path, rules=preset, compressor=compressor, level=3)
    assert report.total_bytes == path.stat().st_size and detect_compressor(path.read_bytes()) == compressor
    assert abs(sum(r.est_compressed_bytes for r in report.rows) - report.total_bytes) <= len(report.rows)
    assert [r.name for r in report.rows] == list(sd)
    table = report.format_table()
    assert "blocks.0.mlp.fc.weight" in table and f"total {compressor}-3: {report.total_bytes} bytes" in table
    loaded = load_artifact(path)
    obj, _ = quantized(preset)
    want = dequantize_state_dict(obj)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], want[k]) for k in want)
    assert [p.name for p in path.parent.iterdir()] == ["final_model.ptz"]  # no temp file left


def test_export_replaces_atomically(tmp_path, sd, monkeypatch):
    path = tmp_path / "final_model.ptz"
    path.write_bytes(b"old artifact")
    with pytest.raises(PgolfError):
        export(sd, path, rules="int8", compressor="zlib", level=42)
    assert path.read_bytes() == b"old artifact"  # a failed export leaves the old file

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        export({"w": torch.ones(3)}, path, rules="int8", compressor="zlib")
    assert path.read_bytes() == b"old artifact" and [p.name for p in tmp_path.iterdir()] == ["final_model.ptz"]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"__quant_format__": "int8_clean_per_row_v1", "x": _Exploit(marker)}, buf)
    path = tmp_path / "evil.ptz"
    path.write_bytes(compress(buf.getvalue(), compressor="zlib"))
    with pytest.raises(PgolfError, match=r"evil\.ptz holds a pickle that weights_only loading refuses"):
        load_artifact(path)
    assert not marker.exists()
    # The payload is live: plain pickle would have run it.
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()


def test_quant_spec_checks_and_exports(tmp_path, sd):
    spec = QuantSpec(preset="int6", compressor="zstd", level=3, artifact_name="final_model.int6.ptz")
    assert spec.check_names(BASELINE_SHAPES)["blocks.0.mlp.fc.weight"] == "int6"
    report = spec.export(sd, tmp_path / spec.artifact_name)
    assert report.compressor == "zstd" and report.level == 3
    custom = QuantSpec(preset="int8", rules=[[".mlp.", "int5:rowmax"], ["blocks.9.", "fp16"]])
    with pytest.raises(PgolfError, match="'blocks.9.' matches no parameter"):
        custom.check_names(BASELINE_SHAPES)
    with pytest.raises(PgolfError, match="treatment"):
        QuantSpec(rules=[[".mlp.", "int6:bogus"]])


# -----------------------------
# GOLDEN DATA (see the module docstring for provenance)
# -----------------------------

GOLDEN: dict[str, dict[str, str]] = {
    "int5mlp": {
        "all": "cab39d1b01cd3592df64118bcce3e939a2d35110c26686fd20c5816bcc46c3e0",
        "bigram_hash.table.weight": "77c2d44d0a4d", "blocks.0.attn.c_k.weight": "77b3eb42d86b",
        "blocks.0.attn.c_q.weight": "5ba375afebc6", "blocks.0.attn.c_v.weight": "1a73ea833ad8",
        "blocks.0.attn.proj.weight": "014e1e1b825e", "blocks.0.attn.q_gain": "036f508a34a3",
        "blocks.0.attn_scale": "5a73613249b5", "blocks.0.mlp.fc.weight": "6c1791a1818e",
        "blocks.0.mlp.gate_bias": "6c8ba3be4272", "blocks.0.mlp.proj.weight": "8e9c19916045",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "a036f1571b67",
        "blocks.0.resid_mix": "81685a483c5c", "blocks.1.resid_mix": "46f272684114",
        "blocks.2.attn.c_q.weight": "7e475a5c9eca", "blocks.7.attn.c_k.weight": "6597e3808937",
        "blocks.8.attn.c_k.weight": "3d3726c21c97", "skip_weights": "02d90a007eae", "step": "31499a7f3480",
        "tok_emb.weight": "87d506004f3b",
    },
    "int6": {
        "all": "9216b115cef9c2b8964c3f0751bc76208cb029bd2db267007841620ea2db0a8f",
        "bigram_hash.table.weight": "fd356b6c54c6", "blocks.0.attn.c_k.weight": "b4b6b97aec46",
        "blocks.0.attn.c_q.weight": "398e2d9820d0", "blocks.0.attn.c_v.weight": "139831e34ac2",
        "blocks.0.attn.proj.weight": "2ff142f52225", "blocks.0.attn.q_gain": "b01fa27b5c4b",
        "blocks.0.attn_scale": "5afaad484eca", "blocks.0.mlp.fc.weight": "bf8d5b253edc",
        "blocks.0.mlp.gate_bias": "d1ff6cc0125c", "blocks.0.mlp.proj.weight": "6a4236c3c11b",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "8ab84ef9adea",
        "blocks.0.resid_mix": "b7ffe7907793", "blocks.1.resid_mix": "b7140a2a3afc",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "bf75afac819d",
        "blocks.8.attn.c_k.weight": "25682d69000f", "skip_weights": "99e5b0701f05", "step": "31499a7f3480",
        "tok_emb.weight": "87d506004f3b",
    },
    "int6_0320": {
        "all": "03c529848f31bb47fdfc077ffec8a61478582bb7c845b8e2dffc3f045f966ae3",
        "bigram_hash.table.weight": "dc3090f15c32", "blocks.0.attn.c_k.weight": "df74323cc34b",
        "blocks.0.attn.c_q.weight": "8cf44cb7a565", "blocks.0.attn.c_v.weight": "a5338c89fa82",
        "blocks.0.attn.proj.weight": "54ed5acc9b70", "blocks.0.attn.q_gain": "036f508a34a3",
        "blocks.0.attn_scale": "5a73613249b5", "blocks.0.mlp.fc.weight": "f514551611c3",
        "blocks.0.mlp.gate_bias": "5d93aeb61f62", "blocks.0.mlp.proj.weight": "968f1f061ffa",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "a036f1571b67",
        "blocks.0.resid_mix": "81685a483c5c", "blocks.1.resid_mix": "46f272684114",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "eab2456f8791",
        "blocks.8.attn.c_k.weight": "f83258131a15", "skip_weights": "02d90a007eae",
        "step": "31499a7f3480", "tok_emb.weight": "b169819ae6b7",
    },
    "int6_pctsearch": {
        "all": "dfefbddf2b7e7b4d2a77a43854852e2f201b183fac01b66c8ca76978a699149c",
        "bigram_hash.table.weight": "dc3090f15c32", "blocks.0.attn.c_k.weight": "c22d31686f42",
        "blocks.0.attn.c_q.weight": "8d2bf4f69040", "blocks.0.attn.c_v.weight": "b7fc8b3d0506",
        "blocks.0.attn.proj.weight": "64373591ab39", "blocks.0.attn.q_gain": "036f508a34a3",
        "blocks.0.attn_scale": "5a73613249b5", "blocks.0.mlp.fc.weight": "e142944abc57",
        "blocks.0.mlp.gate_bias": "5d93aeb61f62", "blocks.0.mlp.proj.weight": "c4d7cc62badf",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "a036f1571b67",
        "blocks.0.resid_mix": "81685a483c5c", "blocks.1.resid_mix": "46f272684114",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "6cb037d9c017",
        "blocks.8.attn.c_k.weight": "69fac4932d07", "skip_weights": "02d90a007eae",
        "step": "31499a7f3480", "tok_emb.weight": "b169819ae6b7",
    },
    "int6_pr192": {
        "all": "d19fcba56e13f18adac9f241bc47d58f88646a461b093c11104fa99c656c439a",
        "bigram_hash.table.weight": "d4ecae691875", "blocks.0.attn.c_k.weight": "b4b6b97aec46",
        "blocks.0.attn.c_q.weight": "398e2d9820d0", "blocks.0.attn.c_v.weight": "139831e34ac2",
        "blocks.0.attn.proj.weight": "2ff142f52225", "blocks.0.attn.q_gain": "b01fa27b5c4b",
        "blocks.0.attn_scale": "5afaad484eca", "blocks.0.mlp.fc.weight": "bf8d5b253edc",
        "blocks.0.mlp.gate_bias": "1d3315c34d00", "blocks.0.mlp.proj.weight": "6a4236c3c11b",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "8ab84ef9adea",
        "blocks.0.resid_mix": "b7ffe7907793", "blocks.1.resid_mix": "b7140a2a3afc",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "bf75afac819d",
        "blocks.8.attn.c_k.weight": "25682d69000f", "skip_weights": "99e5b0701f05", "step": "31499a7f3480",
        "tok_emb.weight": "87d506004f3b",
    },
    "int6_rowmax": {
        "all": "94029af39abb568af119ae79618fdcdf38f66192843cc93971f1f95e63ec53fc",
        "bigram_hash.table.weight": "dc3090f15c32", "blocks.0.attn.c_k.weight": "77b3eb42d86b",
        "blocks.0.attn.c_q.weight": "5ba375afebc6", "blocks.0.attn.c_v.weight": "1a73ea833ad8",
        "blocks.0.attn.proj.weight": "014e1e1b825e", "blocks.0.attn.q_gain": "036f508a34a3",
        "blocks.0.attn_scale": "5a73613249b5", "blocks.0.mlp.fc.weight": "3376b9d1a8a1",
        "blocks.0.mlp.gate_bias": "5d93aeb61f62", "blocks.0.mlp.proj.weight": "b0bde7ff40c9",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "a036f1571b67",
        "blocks.0.resid_mix": "81685a483c5c", "blocks.1.resid_mix": "46f272684114",
        "blocks.2.attn.c_q.weight": "7e475a5c9eca", "blocks.7.attn.c_k.weight": "6597e3808937",
        "blocks.8.attn.c_k.weight": "3d3726c21c97", "skip_weights": "02d90a007eae", "step": "31499a7f3480",
        "tok_emb.weight": "87d506004f3b",
    },
    "int6_warmdown": {
        "all": "dbea010d4bc3581098fd579fa2fb8c4b58279831ab4bab8008b0cbed487df9ef",
        "bigram_hash.table.weight": "d4ecae691875", "blocks.0.attn.c_k.weight": "b4b6b97aec46",
        "blocks.0.attn.c_q.weight": "398e2d9820d0", "blocks.0.attn.c_v.weight": "139831e34ac2",
        "blocks.0.attn.proj.weight": "2ff142f52225", "blocks.0.attn.q_gain": "b01fa27b5c4b",
        "blocks.0.attn_scale": "5afaad484eca", "blocks.0.mlp.fc.weight": "bf8d5b253edc",
        "blocks.0.mlp.gate_bias": "1d3315c34d00", "blocks.0.mlp.proj.weight": "6a4236c3c11b",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "8ab84ef9adea",
        "blocks.0.resid_mix": "b7ffe7907793", "blocks.1.resid_mix": "b7140a2a3afc",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "bcfe82987bfb",
        "blocks.8.attn.c_k.weight": "3d3726c21c97", "skip_weights": "99e5b0701f05", "step": "31499a7f3480",
        "tok_emb.weight": "87d506004f3b",
    },
    "int8": {
        "all": "db1a43d62ffd48c2220e89a6fe579b000a3f40a1f4a08768615a9afa935e5e84",
        "bigram_hash.table.weight": "dc3090f15c32", "blocks.0.attn.c_k.weight": "c430d3c1b5b1",
        "blocks.0.attn.c_q.weight": "c2d796a4ea09", "blocks.0.attn.c_v.weight": "263ef01a7b55",
        "blocks.0.attn.proj.weight": "320c702e0dc6", "blocks.0.attn.q_gain": "b01fa27b5c4b",
        "blocks.0.attn_scale": "5afaad484eca", "blocks.0.mlp.fc.weight": "57612429f8dc",
        "blocks.0.mlp.gate_bias": "d1ff6cc0125c", "blocks.0.mlp.proj.weight": "5f69efd8f955",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "8ab84ef9adea",
        "blocks.0.resid_mix": "b7ffe7907793", "blocks.1.resid_mix": "6ad98c0c0899",
        "blocks.2.attn.c_q.weight": "51c839bd9d51", "blocks.7.attn.c_k.weight": "5ab3e92896cb",
        "blocks.8.attn.c_k.weight": "d71fcdf18e1a", "skip_weights": "99e5b0701f05", "step": "31499a7f3480",
        "tok_emb.weight": "b169819ae6b7",
    },
    "late_k": {
        "all": "ef52f4f67404cb212bac76c80c76e2fe040bf1075bae9664634dc3c9b4e22eaa",
        "bigram_hash.table.weight": "dc3090f15c32", "blocks.0.attn.c_k.weight": "398519d266ec",
        "blocks.0.attn.c_q.weight": "1c1f747ad772", "blocks.0.attn.c_v.weight": "b59d864cf049",
        "blocks.0.attn.proj.weight": "3ffc86a89311", "blocks.0.attn.q_gain": "b01fa27b5c4b",
        "blocks.0.attn_scale": "5afaad484eca", "blocks.0.mlp.fc.weight": "98090cd5928a",
        "blocks.0.mlp.gate_bias": "d1ff6cc0125c", "blocks.0.mlp.proj.weight": "d176242f0b63",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "8ab84ef9adea",
        "blocks.0.resid_mix": "b7ffe7907793", "blocks.1.resid_mix": "6ad98c0c0899",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "bcfe82987bfb",
        "blocks.8.attn.c_k.weight": "3d3726c21c97", "skip_weights": "99e5b0701f05", "step": "31499a7f3480",
        "tok_emb.weight": "87d506004f3b",
    },
    "mixed_int6_int8": {
        "all": "acc9fe45dcd2e56c9bcf1f4576e58b1efe1c9aa02c36cf6fe5cbbd3e57e9d43f",
        "bigram_hash.table.weight": "d4ecae691875", "blocks.0.attn.c_k.weight": "b4b6b97aec46",
        "blocks.0.attn.c_q.weight": "398e2d9820d0", "blocks.0.attn.c_v.weight": "139831e34ac2",
        "blocks.0.attn.proj.weight": "2ff142f52225", "blocks.0.attn.q_gain": "b01fa27b5c4b",
        "blocks.0.attn_scale": "5afaad484eca", "blocks.0.mlp.fc.weight": "bf8d5b253edc",
        "blocks.0.mlp.gate_bias": "d1ff6cc0125c", "blocks.0.mlp.proj.weight": "6a4236c3c11b",
        "blocks.0.mlp.small_half": "ab13543a6e8c", "blocks.0.mlp_scale": "8ab84ef9adea",
        "blocks.0.resid_mix": "b7ffe7907793", "blocks.1.resid_mix": "b7140a2a3afc",
        "blocks.2.attn.c_q.weight": "443fff4f7de0", "blocks.7.attn.c_k.weight": "bf75afac819d",
        "blocks.8.attn.c_k.weight": "25682d69000f", "skip_weights": "99e5b0701f05", "step": "31499a7f3480",
        "tok_emb.weight": "b169819ae6b7",
    },
}  # fmt: skip
# blocks.0.mlp.fc.weight: codes [1, :6] and scales [:3] as the references wrote them.
EXACT: dict[str, tuple[list[int], list[float]]] = {
    "int8": ([-17, 14, 23, -12, -23, 3], [0.0208282470703125, 0.018585205078125, 0.0295562744140625]),
    "int6": ([-4, 3, 6, -3, -6, 1], [0.0853271484375, 0.07611083984375, 0.12109375]),
    "int5mlp": ([-2, 2, 3, -1, -3, 0], [0.1763916015625, 0.1573486328125, 0.250244140625]),
    "late_k": ([-4, 3, 6, -3, -6, 1], [0.0853271484375, 0.07611083984375, 0.12109375]),
}
