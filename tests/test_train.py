"""End to end: the smoke preset trains, exports, scores its artifact and logs to W&B offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pgolf



@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, fast_cache):
    """One full `experiment=smoke` run (all 300 steps) through the Python API, W&B in offline mode.

    It scores the suite's shared 5-document validation split (`fast_cache`) instead of the preset's
    50 documents: the same training, a tenth of the eval, and no second dataset build."""
    run_dir = tmp_path_factory.mktemp("smoke")
    os.environ["WANDB_MODE"] = "offline"
    cfg = pgolf.compose(["experiment=smoke", fast_cache, "data.num_val_docs=5", "logger.group=pytest"])
    metrics = pgolf.train(cfg, run_dir=run_dir)
    return run_dir, metrics


@pytest.mark.slow
def test_smoke_run_metrics_are_finite_and_written(smoke_run):
    run_dir, metrics = smoke_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("final/quant_sliding_bpb", "final/quant_bpb", "final/prequant_bpb", "final/quant_sliding_loss_nats"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    assert metrics["status"] == "finished" and metrics["train/steps"] == 300
    assert metrics["final/quant_gap_bpb"] == metrics["final/quant_bpb"] - metrics["final/prequant_bpb"]
    assert abs(metrics["final/quant_gap_bpb"]) < 0.05
    assert "final/prequant_sliding_bpb" not in metrics  # an extra sliding eval only on request (eval.prequant_sliding)
    # Clearly below the unigram floor of the same data.
    assert metrics["final/quant_sliding_bpb"] < metrics["data/unigram_bpb"] - 0.5


@pytest.mark.slow
def test_smoke_run_artifact_and_size_accounting(smoke_run):
    run_dir, metrics = smoke_run
    artifact = run_dir / "final_model.int8.ptz"
    assert artifact.stat().st_size == metrics["artifact/model_bytes"] > 0
    assert metrics["artifact/total_bytes"] == metrics["artifact/model_bytes"] + metrics["artifact/code_bytes"]
    assert metrics["artifact/over_cap"] is False
    assert (run_dir / "final_model.pt").is_file()
    log = (run_dir / "train.log").read_text()
    assert "git_sha:" in log and "torch:" in log and "final_quant_sliding" in log
    assert not list(run_dir.glob(".*.tmp*"))  # atomic writes leave no temp files


@pytest.mark.slow
def test_smoke_run_wandb_offline_summary(smoke_run):
    run_dir, metrics = smoke_run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                          str(runs[0])], capture_output=True, text=True, timeout=120)
    summary = json.loads(out.stdout)["summary"]
    assert summary["final/quant_sliding_bpb"] == pytest.approx(metrics["final/quant_sliding_bpb"])
    assert summary["artifact/total_bytes"] == metrics["artifact/total_bytes"]
