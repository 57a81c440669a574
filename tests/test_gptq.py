"""The GPTQ family against the records' own functions, and calibration on the one forward path.

tests/goldens/gptq.pt holds codes and scales computed by the records' functions on golden.py's
`gptq_inputs` / `gptq_state_dict` (GPTQ of 03-25 #1019 and 03-29 #1060, SDClip of 04-05 #1394,
Hessian-aware SDClip of 04-06 #1412, the quant-gate and per-class clips of 04-27 #1855, AWQ-lite of
#1945 at 70067534) and the Hessians of #1855's `collect_hessians` on its own GPT (reftools, small
shape, loops on) for golden weights and tokens; see tests/goldens/README.md.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import pytest
import torch

from golden import gptq_inputs, gptq_state_dict, seeded_tokens
from runs import FAST, metrics, run_py
from pgolf.errors import PgolfError
from pgolf.quant import (PRESETS, HessianHooks, QuantSpec, Treatment, collect_hessians, export, generate_tokens,
                         load_artifact, quantize_state_dict, quantize_weight)
from pgolf.quant.calibrate import calibrate, check_calibration_budget

GOLD = torch.load(Path(__file__).parent / "goldens" / "gptq.pt", weights_only=True)
CASES = GOLD["cases"]


def fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def same_codes(q: torch.Tensor, want) -> bool:
    if isinstance(want, dict):
        return fingerprint(q) == want["sha256"]
    return torch.equal(q, want)


# case -> (input, treatment)
SINGLE = {
    "0325_pctsearch_int6": ("w", "gptq:int6:pctsearch"),
    "0329_pctsearch_int6": ("w", "gptq:int6:pctsearch"),
    "0405_sdclip_int6_k12.85": ("w", "gptq:int6:sdclip:k12.85"),
    "0405_sdclip_int8_k20_embed": ("e", "gptq:int8:sdclip:k20"),
    "0406_hsdclip_int6_k12.85_l0.175": ("w", "gptq:int6:sdclip:k12.85:l0.175"),
}


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_gptq_codes_and_scales_equal_the_records(case):
    which, spec = SINGLE[case]
    w, H = gptq_inputs(64, 320, seed=3) if which == "w" else gptq_inputs(160, 96, seed=4)
    r = quantize_weight(w, Treatment.parse(spec), hessian=H)
    assert torch.equal(r.scale, CASES[case]["s"])
    assert torch.equal(r.q, CASES[case]["q"]), f"{int((r.q != CASES[case]['q']).sum())} codes differ"
    assert torch.equal(r.dequantized, r.q.float() * r.scale.float()[:, None])


def test_gate_int8_row_equals_the_record():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(5)) * 0.3
    r = quantize_weight(w, Treatment.parse("int8:gate"))
    assert torch.equal(r.q, CASES["1855_gate_int8_row"]["q"]) and torch.equal(r.scale, CASES["1855_gate_int8_row"]["s"])


def _calibration():
    sd, hs, rms = gptq_state_dict()
    return sd, types.SimpleNamespace(hessians=hs, act_rms=rms)


@pytest.mark.parametrize("preset,case", [("gptq_1855", "1855_mixed"), ("gptq_awq", "1945_awq")])
def test_per_class_gate_and_awq_equal_the_records(preset, case):
    sd, cal = _calibration()
    obj, stats = quantize_state_dict(sd, rules=preset, calibration=cal)
    want, meta = CASES[case]["result"], CASES[case]["meta"]
    for name, info in meta.items():
        if info.startswith("gptq"):
            assert same_codes(obj["quantized"][name], want[name + ".q"]), name
            assert torch.equal(obj["scales"][name], want[name + ".scale"]), name
            assert stats["tensors"][name]["bits"] == int(info[len("gptq (int"):][0])
        elif info == "gate_int8_row":
            assert torch.equal(obj["quantized"][name], want[name + ".gq"])
            assert torch.equal(obj["scales"][name], want[name + ".gs"])
        else:
            assert torch.equal(obj["passthrough"][name], want[name])
        if "awqgrpint8" in info:  # the one protected group, its start and its int8 scale
            q = obj["qmeta"][name]
            assert q["starts"] == want[name + ".awqg_start"].tolist() and q["group_size"] == 64
            assert torch.equal(q["scale_hi"], want[name + ".awqg_s_hi"])
    assert ("awqgrpint8" in str(meta)) == (preset == "gptq_awq")


def test_awq_artifact_round_trip(tmp_path):
    sd, cal = _calibration()
    obj, _ = quantize_state_dict(sd, rules="gptq_awq", calibration=cal)
    name = "tok_emb.weight"
    q, s, m = obj["quantized"][name], obj["scales"][name], obj["qmeta"][name]
    a = m["starts"][0]
    want = q.float() * s.float()[:, None]
    want[:, a:a + 64] = q[:, a:a + 64].float() * m["scale_hi"].float()[:, None]  # #1945 dequantize_mixed
    export(sd, tmp_path / "a.ptz", rules="gptq_awq", calibration=cal)
    assert torch.equal(load_artifact(tmp_path / "a.ptz")[name], want)


def test_gptq_beats_round_to_nearest_on_the_hessian_weighted_error():
    sd, cal = _calibration()
    gptq = quantize_state_dict(sd, rules="gptq_1855", calibration=cal)[1]["tensors"]
    rtn = quantize_state_dict(sd, rules=PRESETS["sdclip_rtn"], calibration=cal)[1]["tensors"]
    for name in ("tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight"):
        assert gptq[name]["weighted"] and rtn[name]["weighted"]
        assert gptq[name]["error"] < rtn[name]["error"], name


# -----------------------------
# CALIBRATION
# -----------------------------


@pytest.fixture(scope="module")
def model_1855():
    from test_records_frontier import record_model

    return record_model("pr1855_lqer_bossmear")


def test_hooked_hessians_equal_the_records_collect_hessians(model_1855):
    gold = GOLD["hessians"]
    batches = [seeded_tokens(1)[0], seeded_tokens(2)[0]]
    hessians, act_rms, n = collect_hessians(model_1855, batches)
    assert n == 2 and set(gold["hessians"]) <= set(hessians)
    for name, g in gold["hessians"].items():
        H = hessians[name]
        assert float(H.double().sum()) == pytest.approx(g["sum"], rel=1e-5), name
        assert float(H.double().square().sum()) == pytest.approx(g["sumsq"], rel=1e-5), name
        torch.testing.assert_close(H.diag()[:64], g["diag"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(H[1, :64], g["row1"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(act_rms[name], gold["act_rms"][name], rtol=1e-5, atol=1e-7)


def test_looped_layers_accumulate_every_pass_and_hooks_come_off(model_1855):
    x = seeded_tokens(1)[0]  # (2, 128); layers 1..3 run three times per forward (num_loops=2)
    with HessianHooks(model_1855) as hooks:
        with torch.no_grad():
            model_1855.forward_logits(x)
    assert hooks.rows["blocks.0.mlp.fc.weight"] == 256 and hooks.rows["blocks.2.mlp.fc.weight"] == 3 * 256
    assert hooks.rows["tok_emb.weight"] == 256  # the tied head, through final_norm
    assert all(not m._forward_hooks for m in model_1855.modules())


def test_generated_calibration_is_seeded_and_model_made():
    from test_records_frontier import record_model

    m = record_model("pr1855_lqer_bossmear")
    kw = dict(num_seqs=3, seq_len=6, vocab_size=1024, temperature=0.8, seed=7, batch_size=2)
    a, b = generate_tokens(m, **kw), generate_tokens(m, **kw)
    assert [t.shape for t in a] == [(1, 6)] * 3 and all(torch.equal(s, t) for s, t in zip(a, b))
    logs: list[str] = []
    cal = calibrate(source="generated", model=m, names=["blocks.0.mlp.fc.weight", "tok_emb.weight"], num_batches=1,
                    next_batch=lambda: pytest.fail("generated calibration read training data"), train_s=10.0,
                    cap_s=600.0, log=logs.append, generate={k: v for k, v in kw.items() if k != "vocab_size"},
                    vocab_size=1024)
    assert cal.batches == 3 and cal.record()["source"] == "generated" and cal.record()["last_train_token_s"] is None
    assert "calibration: source:generated batches:3" in logs[0]


def test_train_calibration_records_its_last_token_against_the_cap(model_1855):
    logs: list[str] = []
    it = iter([seeded_tokens(1)[0], seeded_tokens(2)[0]])
    cal = calibrate(source="train", model=model_1855, names=["blocks.0.mlp.fc.weight"], num_batches=2,
                    next_batch=lambda: next(it), train_s=599.9, cap_s=600.0, log=logs.append, generate={},
                    vocab_size=1024)
    rec = cal.record()
    assert set(rec) == {"source", "batches", "seconds", "last_train_token_s", "cap_s", "after_cap"}
    assert rec["source"] == "train" and rec["batches"] == 2 and rec["last_train_token_s"] >= 599.9
    if rec["after_cap"]:
        assert any("ERROR read training data" in line for line in logs)


def test_calibration_sources_are_checked_before_training():
    with pytest.raises(PgolfError, match="validation data is never calibration data"):
        QuantSpec(preset="gptq_1855", calibration="val")
    with pytest.raises(PgolfError, match="needs input Hessians|need input Hessians"):
        QuantSpec(preset="gptq_1855", calibration="none")
    spec = QuantSpec(preset="gptq_1855", calibration="train")
    with pytest.raises(PgolfError, match="after the cap"):
        check_calibration_budget(spec, types.SimpleNamespace(max_wallclock_seconds=600.0, gptq_reserve_seconds=0.0))
    check_calibration_budget(spec, types.SimpleNamespace(max_wallclock_seconds=600.0, gptq_reserve_seconds=4.0))
    check_calibration_budget(spec, types.SimpleNamespace(max_wallclock_seconds=0.0, gptq_reserve_seconds=0.0))
    import pgolf

    with pytest.raises(PgolfError, match="validation data is never calibration data"):  # at compose time
        pgolf.compose(["experiment=smoke", "quant=gptq_1855", "quant.calibration=val"])
    with pytest.raises(PgolfError, match="after the cap"):
        pgolf.compose(["experiment=smoke", "quant=gptq_1855", "schedule.max_wallclock_seconds=600"])


@pytest.mark.slow
def test_smoke_run_calibrates_inside_the_budget_exports_and_scores(tmp_path, fast_cache):
    """The issue's done-when on a short smoke job: train-data Hessians after the loop, inside a
    600 s cap with a reserve; GPTQ rows in the export table; the artifact reloads and scores."""
    r = run_py([*FAST, fast_cache, "quant=gptq_1855", "quant.small_numel=4096", "quant.gptq_calibration_batches=2",
                "schedule.max_wallclock_seconds=600", "schedule.gptq_reserve_seconds=5", "logger=none",
                "hydra.run.dir=run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = metrics(tmp_path / "run")
    cal = m["calibration"]
    assert cal["source"] == "train" and cal["batches"] == 2 and cal["cap_s"] == 600.0 and not cal["after_cap"]
    assert 0 < cal["last_train_token_s"] < 600.0 and m["quant/gap_bpb"]["standard"] == m["final/quant_gap_bpb"]
    log = r.stdout + r.stderr
    assert "calibration: source:train batches:2" in log and "last training token read" in log
    assert any(line.startswith("tok_emb.weight") and "gptq:int7:sdclip:k14" in line and line.rstrip().endswith(" H")
               for line in log.splitlines())
    assert 0 < m["final/quant_bpb"] < 20 and (tmp_path / "run" / "calibration.pt").is_file()


def test_treatment_specs_round_trip_and_bad_ones_name_the_fix():
    for spec in ("gptq:int6:sdclip:k12.85", "gptq:int7:sdclip:k14", "gptq:int6:sdclip:k12.85:l0.175",
                 "gptq:int6:pctsearch", "int6:sdclip:k11.5", "int8:gate"):
        assert Treatment.parse(spec).label == spec
    with pytest.raises(PgolfError, match="sdclip needs k"):
        Treatment.parse("gptq:int6:sdclip")
    with pytest.raises(PgolfError, match="drop the :g group"):
        Treatment.parse("gptq:int6:sdclip:k12:g64")


def test_saved_calibration_reloads_for_a_resumed_export(tmp_path):
    from pgolf.quant.calibrate import Calibration, keep_calibration

    _, cal = _calibration()
    made = Calibration(cal.hessians, cal.act_rms, source="train", batches=16, seconds=1.5, last_train_token_s=596.2,
                       cap_s=600.0)
    assert keep_calibration(tmp_path, made) is made and keep_calibration(tmp_path / "none", None) is None
    back = keep_calibration(tmp_path, None)
    assert back.record() == made.record()
    assert all(torch.equal(back.hessians[k], v) for k, v in made.hessians.items())


def test_collection_damping_of_the_march_records(model_1855):
    x = seeded_tokens(1)[0]
    kw = dict(source="train", model=model_1855, names=["blocks.0.mlp.fc.weight"], num_batches=1, train_s=0.0,
              cap_s=None, log=lambda _: None, generate={}, vocab_size=1024)
    plain = calibrate(next_batch=lambda: x, **kw).hessians["blocks.0.mlp.fc.weight"]
    damped = calibrate(next_batch=lambda: x, damp=0.01, **kw).hessians["blocks.0.mlp.fc.weight"]
    want = plain + 0.01 * torch.diag(plain).mean().clamp_min(1e-6) * torch.eye(plain.shape[0])  # 03-29 _finalize_hessians
    assert torch.equal(damped, want) and not torch.equal(damped, plain)
