"""LQER against 2026-04-27 #1855's own functions, and LQER through pgolf's export.

tests/goldens/lqer_pergroup_1855.json holds hashes of #1855's `gptq_mixed_quantize` outputs
(identity Hessians, so GPTQ's codes are round-to-nearest with SDClip scales), of its LQER
factors and of its `dequantize_mixed` result on seeded weights (see tests/goldens/README.md).
pgolf is handed the same codes and must produce the same factors and the same weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pgolf.bench import cpu_threads
from pgolf.errors import PgolfError
from pgolf.quant import QuantRules, QuantSpec, dequantize_state_dict, quantize_state_dict
from pgolf.quant.lqer import LQER, apply_lqer

GOLDEN = json.loads((Path(__file__).parent / "goldens" / "lqer_pergroup_1855.json").read_text())


def th(t: torch.Tensor) -> str:
    digest = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{digest}"


def golden_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in GOLDEN["shapes"].items()}
    sd["blocks.1.mlp.fc.weight"] *= 3
    sd["blocks.0.mlp.proj.weight"] *= 2
    return sd


def sdclip_codes(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    # What #1855's GPTQ yields under an identity Hessian: s = k * std_row / R (fp16, floor
    # 1e-10), q = clamp(round(w / s), -R, R). k and bits per class as the golden's hparams.
    hp = GOLDEN["hparams"]
    k = hp["embed_clip_sigmas"] if "tok_emb" in name else hp["mlp_clip_sigmas"] if ".mlp." in name else hp["attn_clip_sigmas"]
    r = 2 ** ((hp["embed_bits"] if "tok_emb" in name else hp["matrix_bits"]) - 1) - 1
    s = (k * w.std(dim=1) / r).clamp_min(1e-10).to(torch.float16)
    return torch.clamp(torch.round(w / s.float()[:, None]), -r, r).to(torch.int8), s


@pytest.fixture(scope="module")
def golden_object():
    """pgolf's quantized object holding #1855's codes (checked against the golden hashes)."""
    sd = golden_weights()
    obj = {"__quant_format__": "int8_clean_per_row_v1", "quantized": {}, "scales": {}, "dtypes": {}, "passthrough": {},
           "passthrough_orig_dtypes": {}, "qmeta": {}}
    for name, w in sd.items():
        if w.ndim != 2:
            obj["passthrough"][name] = w.half()
            obj["passthrough_orig_dtypes"][name] = "float32"
            continue
        q, s = sdclip_codes(w, name)
        assert th(q) == GOLDEN["result"][name + ".q"] and th(s) == GOLDEN["result"][name + ".scale"], name
        obj["quantized"][name], obj["scales"][name], obj["dtypes"][name] = q, s, "float32"
        obj["qmeta"][name] = {"scheme": "per_row", "axis": 0}
    return sd, obj


def test_lqer_factors_equal_1855(golden_object):
    sd, obj = golden_object
    hp = GOLDEN["hparams"]
    spec = LQER(rank=hp["lqer_rank"], factor_bits=hp["lqer_factor_bits"], asym=hp["lqer_asym_enabled"],
                asym_group=hp["lqer_asym_group"], top_k=hp["lqer_top_k"])
    with cpu_threads(1):  # the SVD's last bits depend on LAPACK's thread count; the golden used one
        factors = apply_lqer(sd, obj, spec)
    chosen = {n: m.split("+")[1] for n, m in GOLDEN["meta"].items() if "+" in m}
    assert {n: ("lqer_asym" if f["A_scale"].ndim == 0 else "lqer") for n, f in factors.items()} == chosen
    assert "lqer" in chosen.values() and "lqer_asym" in chosen.values()  # both forms are exercised
    suffix = {"lqer_asym": ("lqA_a", "lqAs_a", "lqB_a", "lqBs_a"), "lqer": ("lqA", "lqAs", "lqB", "lqBs")}
    for name, f in factors.items():
        keys = suffix[chosen[name]]
        for ours, theirs in zip(("A", "A_scale", "B", "B_scale"), keys):
            assert th(f[ours]) == GOLDEN["result"][f"{name}.{theirs}"], (name, ours)
    # Dequantized weights, W_hat + A_hat @ B_hat cast back: equal to dequantize_mixed's, bit for bit.
    out = dequantize_state_dict({**obj, "lqer": factors})
    assert {k: th(v) for k, v in out.items()} == GOLDEN["dequantized"]


def test_lqer_through_the_export_lowers_the_error_and_is_reported():
    sd = golden_weights()
    plain = QuantRules(default="int6:rowmax", small_numel=0)
    with_lqer = QuantRules(default="int6:rowmax", small_numel=0, lqer={"top_k": 2})
    (o0, _), (o1, st1) = quantize_state_dict(sd, rules=plain), quantize_state_dict(sd, rules=with_lqer)
    d0, d1 = dequantize_state_dict(o0), dequantize_state_dict(o1)
    err = {k: float((d0[k] - sd[k]).norm()) for k in sd}
    top2 = sorted(err, key=lambda k: -err[k])[:2]
    assert sorted(o1["lqer"]) == sorted(top2)
    for k in sd:
        e1 = float((d1[k] - sd[k]).norm())
        assert (e1 < err[k]) if k in top2 else (e1 == err[k]), k
        assert ("+lqer" in st1["tensors"][k]["treatment"]) == (k in top2)
        if k in top2:  # the table's error is the corrected one
            assert st1["tensors"][k]["error"] == pytest.approx(e1 ** 2 / float(sd[k].float().pow(2).sum()), rel=1e-4)
    assert torch.equal(o1["quantized"]["tok_emb.weight"], o0["quantized"]["tok_emb.weight"])  # codes untouched


def test_lqer_options_checked():
    with pytest.raises(PgolfError, match="rank"):
        LQER(rank=0)
    with pytest.raises(PgolfError, match="not understood"):
        QuantRules(lqer={"ranks": 4})
    spec = QuantSpec(preset="int6", lqer={"scope": [".mlp.fc."]})
    with pytest.raises(PgolfError, match="matches no parameter"):
        spec.check_names({"blocks.0.attn.c_q.weight": (256, 256)})
    assert QuantSpec(preset="int6", lqer=False).plan.lqer is None
    assert QuantSpec(preset="int6", lqer=True).plan.lqer == LQER()
