"""`python -m pgolf.bench` measures a config, a comparison, and pgolf against the records' scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pgolf import bench_reference
from pgolf.bench import main
from pgolf.bench_reference import RECORD_192
from pgolf.quant.treatments import CLIP_Q, clip_quantile


def test_bench_prints_table_and_ratios(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    assert main(["experiment=smoke", "--compare", "experiment=smoke model.mlp.mlp_mult=3.0", "--steps", "2",
                 "--warmup", "1", "--eval-windows", "8", "--eval-rounds", "1", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "train step (median)" in table and "sliding eval tokens/s" in table and "x" in table
    out = json.loads(out_json.read_text())
    a, b = out["results"]
    assert b["params"] > a["params"] and a["step_ms"] > 0 and a["artifact_model_bytes"] > 0
    assert out["ratios"]["step_ms"] == b["step_ms"] / a["step_ms"]
    assert a["projected_steps_in_cap"] == "no cap"


def test_bench_bad_override_is_one_line(capsys):
    assert main(["model.num_heads=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.model_dim=512 is not divisible")


def test_reference_needs_a_checkout(tmp_path, capsys):
    assert main(["--reference", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_gpt.py not found" in err[0]


def test_alternate_clocks_reads_wall_and_cpu_of_every_call():
    """The export comparison's timer: both clocks per call, sides alternated (order reversed each round)."""
    calls: list[str] = []
    out = bench_reference.alternate_clocks({"a": lambda i: calls.append("a"), "b": lambda i: calls.append("b")}, 3)
    assert calls == ["b", "a", "a", "b", "b", "a"]
    for side in out.values():
        assert set(side) == {"wall_min", "wall_median", "cpu_min", "cpu_median"}
        assert 0 <= side["wall_min"] <= side["wall_median"] and 0 <= side["cpu_min"] <= side["cpu_median"]


def test_threads_option_is_restored(tmp_path):
    """An in-process benchmark (--threads 1, the reference's default) must not leave torch on one thread."""
    before = torch.get_num_threads()
    target = 1 if before > 1 else 2
    assert main(["--reference", str(tmp_path)]) == 2  # fails after entering its one-thread block
    assert main(["experiment=smoke", "--threads", str(target), "--steps", "1", "--warmup", "0", "--eval-windows", "2",
                 "--eval-rounds", "1"]) == 0
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_reference_comparison_runs_on_identical_inputs(tmp_path):
    """Live against the records' scripts: same weights, same codes, the same artifact bytes."""
    repo = os.environ.get("PGOLF_REFERENCE_REPO")
    if not repo:
        pytest.skip("set PGOLF_REFERENCE_REPO to an openai/parameter-golf checkout for the live comparison")
    if not (Path(repo) / RECORD_192).exists():
        pytest.skip(f"{RECORD_192} is missing (PR #192 lives on refs/pull/192/head)")
    out_json = tmp_path / "ref.json"
    assert bench_reference.main([repo, "--rounds", "1", "--export-rounds", "1", "--export-layers", "1",
                                 "--eval-targets", "2048", "--json", str(out_json)]) == 0
    out = json.loads(out_json.read_text())
    ts, sw, ex = out["train_step"], out["sliding_eval"], out["export"]
    assert ts["bf16_ns_weights_identical"] and ts["pgolf_ms"] > 0 and ts["baseline_ms"] > 0
    assert sw["pgolf_bpb"] == pytest.approx(sw["record_bpb"], rel=0.05)  # the records score the edges differently
    assert ex["same_quantized_values"] and ex["same_bytes_before_compression"]
    assert ex["pgolf_artifact_decompresses_to_record_bytes"]
    assert ex["pgolf_bytes"] <= ex["record_bytes"]  # zstd's multithreaded framing: equal, or smaller on big inputs


# -----------------------------
# FAST PATHS KEEP THE NUMBERS
# -----------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (511,), (3, 512), (37, 1536), (5, 3, 64), (2, 70001), (1, 1)])
def test_topk_clip_quantile_is_torch_quantile(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).abs()
    assert torch.equal(clip_quantile(x), torch.quantile(x, CLIP_Q, dim=-1))
    ties = torch.round(x * 2) / 2  # repeated maxima
    assert torch.equal(clip_quantile(ties), torch.quantile(ties, CLIP_Q, dim=-1))
    if x.ndim > 1:
        x[0, ..., 0] = float("nan")
        x[-1, ..., -1] = float("inf")
        want = torch.quantile(x, CLIP_Q, dim=-1)
        assert torch.equal(clip_quantile(x).isnan(), want.isnan())
        assert torch.equal(clip_quantile(x).nan_to_num(0.5), want.nan_to_num(0.5))
