"""`python -m pgolf.gpucheck --tiny`: the GPU check's CPU twin runs every kind of check and passes."""

from __future__ import annotations

import json

import pytest

from pgolf import gpucheck


def test_tiny_runs_every_check_and_passes(tmp_path, capsys, fast_cache):
    out = tmp_path / "gpucheck.json"
    # Two presets stand for all in the trace (tests/test_compile.py traces every preset); the
    # rest is the whole command: timed steps, sliding and TTT evals of #1855 and #2135, bf16 against
    # fp32, a 1-rank gloo run on the suite's shared smoke data, the time plan.
    code = gpucheck.main(["--tiny", "--presets", "smoke", "record_0427_pr1855_lqer", "--steps", "2", "--json", str(out),
                          "--data-cache", fast_cache.split("=", 1)[1]])
    printed = capsys.readouterr().out
    assert code == 0, printed
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert all(checks[f"trace {p}"]["ok"] for p in ("smoke", "record_0427_pr1855_lqer"))
    assert checks["trace record_0427_pr1855_lqer"]["figure"] == "1 graph(s), 0 break(s)"
    assert checks["step record_0427_pr1855_lqer"]["ok"] and "steps in 600 s" in checks["step record_0427_pr1855_lqer"][
        "detail"]
    assert checks["eval record_0427_pr1855_lqer"]["ok"]
    for p in gpucheck.TIMED:  # both frontier presets: step, sliding eval and the TTT eval, projected
        assert checks[f"step {p}"]["ok"] and checks[f"eval {p}"]["ok"], checks
        ttt = checks[f"ttt eval {p}"]
        assert ttt["ok"] and "full SP8192 val on 8 GPUs" in ttt["detail"]
        assert ttt["tolerance"].startswith("projected <= 600")
        assert ttt["budget_s"] == gpucheck.PLAN["ttt eval"] and ttt["seconds"] > 0
    assert "PhasedTTT" in checks["ttt eval record_0501_pr2135_ngram_calib32"]["figure"]
    assert "ngram_tilt:on" in checks["ttt eval record_0501_pr2135_ngram_calib32"]["figure"]
    assert " scored:0 " not in checks["ttt eval record_0501_pr2135_ngram_calib32"]["figure"]
    assert "no n-gram tilt" in checks["ttt eval record_0427_pr1855_lqer"]["figure"]
    assert checks["bf16 cpu vs fp32 cpu (record_0427_pr1855_lqer)"]["ok"]
    assert checks["1-rank gloo run"]["ok"], checks["1-rank gloo run"]
    plan = checks["time plan"]
    assert plan["ok"] and plan["budget_s"] == gpucheck.TOTAL_BUDGET_S == 480
    assert plan["seconds"] == pytest.approx(sum(c["seconds"] for n, c in checks.items() if n != "time plan"))
    assert all(c["tolerance"] for c in checks.values()), [n for n, c in checks.items() if not c["tolerance"]]
    assert "failed, " in printed.splitlines()[-1] and printed.startswith("gpucheck on cpu (--tiny)")


def test_the_time_plan_fits_eight_minutes():
    """Every preset's trace plus each timed preset's step, evals and reference, the numerics, the
    torchrun check and the baseline, at their budgets, within the 480 s the issue allows."""
    per_preset = sum(gpucheck.PLAN[k] for k in ("step", "eval", "ttt eval", "reference"))
    total = (gpucheck.PLAN["trace"] * len(gpucheck.presets()) + per_preset * len(gpucheck.TIMED)
             + gpucheck.PLAN["bf16"] + gpucheck.PLAN["1-rank"] + gpucheck.PLAN["baseline"])
    assert total <= gpucheck.TOTAL_BUDGET_S, total


def test_a_graph_break_is_reported_with_its_reason(monkeypatch):
    import torch

    from pgolf.model import GPT

    real = GPT.forward

    def breaking(self, *a, **k):  # a break between two pieces of work
        loss = real(self, *a, **k)
        torch._dynamo.graph_break()
        return loss * 1.0

    monkeypatch.setattr(GPT, "forward", breaking)
    c = gpucheck.trace("smoke", True, torch.device("cpu"), torch.bfloat16)
    assert c.ok is False and "1 break(s)" in c.figure and c.line().startswith("FAIL trace smoke")


def test_without_a_gpu_the_full_check_says_how_to_run_the_twin(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpucheck.main([]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_a_wrapped_record_script_is_decoded_both_ways():
    import base64
    import lzma

    from pgolf.gpucheck_ref import decode_wrapper

    src = "class GPT:\n    pass\n"
    raw = lzma.compress(src.encode(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    for blob in (lzma.compress(src.encode()), raw):
        wrapped = f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{base64.b85encode(blob).decode()}")))'
        assert decode_wrapper(wrapped) == src
    assert decode_wrapper(src) == src


def test_the_record_step_is_skipped_with_one_line_where_it_cannot_run(tmp_path):
    import torch

    from pgolf.gpucheck_ref import NEEDS, RECORD_SCRIPTS

    cpu = torch.device("cpu")
    name = "record_0427_pr1855_lqer"
    missing = gpucheck.record_step(tmp_path, name, object(), cpu)
    assert missing.ok is None and "not found (on main)" in missing.detail and "2026-04-27_SP8192" in missing.detail
    script = tmp_path / RECORD_SCRIPTS[name][0]
    script.parent.mkdir(parents=True)
    script.write_text("raise SystemExit('never imported')\n")
    if not any(__import__("importlib").util.find_spec(m) is None for m in NEEDS):
        pytest.skip("FlashAttention 3 and Triton import here")
    no_fa = gpucheck.record_step(tmp_path, name, object(), cpu)
    assert no_fa.ok is None and "GPU-only" in no_fa.detail and no_fa.line().startswith("skip reference step")
