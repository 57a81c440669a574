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
from pgolf.data import write_shard

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache") / "stdlib_sp1024")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, stdlib_cache):
    """One full `experiment=smoke` run through the Python API, W&B in offline mode."""
    run_dir = tmp_path_factory.mktemp("smoke")
    os.environ["WANDB_MODE"] = "offline"
    cfg = pgolf.compose(["experiment=smoke", f"data.cache_dir={stdlib_cache}", "logger.group=pytest"])
    metrics = pgolf.train(cfg, run_dir=run_dir)
    return run_dir, metrics


@pytest.mark.slow
def test_smoke_run_metrics_are_finite_and_written(smoke_run):
    run_dir, metrics = smoke_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("final/quant_sliding_bpb", "final/quant_bpb", "final/prequant_bpb", "final/prequant_sliding_bpb",
                "final/quant_sliding_loss_nats"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    assert metrics["status"] == "finished" and metrics["train/steps"] == 300
    assert abs(metrics["final/quant_bpb"] - metrics["final/prequant_bpb"]) < 0.05
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


def run_cli(*args: str, cwd: Path, cache: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_tokenizer_vocab_mismatch_fails_before_allocation(tmp_path, stdlib_cache):
    r = run_cli("experiment=smoke", f"data.cache_dir={stdlib_cache}", "model.vocab_size=512", "logger=none",
                "hydra.run.dir=run", cwd=tmp_path, cache=stdlib_cache)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: model.vocab_size=512 does not match the tokenizer")
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "final_model.pt").exists()


def test_corrupt_shard_names_the_file(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world, a b c"] * 50), model_prefix=str(tmp_path / "t"),
                                   vocab_size=64, model_type="bpe", byte_fallback=False, hard_vocab_limit=False)
    write_shard(data / "fineweb_train_000000.bin", list(range(64)) * 50)
    bad = data / "fineweb_val_000000.bin"
    write_shard(bad, list(range(64)) * 50)
    raw = bytearray(bad.read_bytes())
    raw[0:4] = (123).to_bytes(4, "little")
    bad.write_bytes(bytes(raw))
    vocab = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model")).vocab_size()
    r = run_cli("model=tiny", f"model.vocab_size={vocab}", "logger=none", f"data.data_path={data}",
                f"data.tokenizer_path={tmp_path / 't.model'}", "schedule.train_seq_len=32",
                "schedule.train_batch_tokens=256", "eval.stride=16", "hydra.run.dir=run", cwd=tmp_path, cache="")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bad) in last and "20240520" in last
