"""`python -m pgolf.audit RUN_DIR` passes on a legal smoke run and fails, one line each, on
copies of it made illegal on purpose (calibration after the cap, a validation document in the
training shards, a tilt that does not normalise, an update before its targets were scored)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pgolf import audit
from pgolf.data import load_validation_tokens
from pgolf.data.shards import read_shard, write_shard
from pgolf.ttt.ngram import NgramTilt
from runs import FAST, ROOT, run_py


@pytest.fixture(scope="module")
def legal_run(tmp_path_factory, fast_cache):
    """One smoke run with the tilt (order 4, so it fires on 8 steps of training) and AsymLogit on."""
    d = tmp_path_factory.mktemp("audit")
    r = run_py([*FAST, fast_cache, "logger=none", f"hydra.run.dir={d / 'run'}", "eval.ngram_tilt_enabled=true",
                "eval.token_order=4", "eval.token_threshold=0.5", "model.head.asym_logit_rescale=true"], cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "run"


def doctored(legal_run, tmp_path, name: str):
    run = tmp_path / name
    shutil.copytree(legal_run, run)
    return run


def fails(run) -> list[str]:
    return [line for ok, line in audit.audit(run) if not ok]


def test_legal_run_passes_with_one_line_per_check(legal_run):
    r = subprocess.run([sys.executable, "-m", "pgolf.audit", str(legal_run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    names = [ln.split()[1].rstrip(":") for ln in lines[:-1]]
    assert names == ["val_bytes", "overlap", "causal", "normalised", "score_first", "single_pass", "calibration",
                     "bytes"]
    assert all(ln.startswith("PASS") for ln in lines[:-1]) and "tilt fired on" in lines[3]


def test_calibration_after_the_cap_fails(legal_run, tmp_path):
    run = doctored(legal_run, tmp_path, "late_calibration")
    m = json.loads((run / "metrics.json").read_text())
    m["calibration"] = {"source": "train", "batches": 32, "seconds": 6.9, "last_train_token_s": 606.9, "cap_s": 600.0,
                        "after_cap": True}
    (run / "metrics.json").write_text(json.dumps(m))
    bad = fails(run)
    assert len(bad) == 1 and bad[0].startswith("FAIL calibration:") and "after the training budget" in bad[0]
    r = subprocess.run([sys.executable, "-m", "pgolf.audit", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL calibration" in r.stdout


def test_validation_document_in_training_shards_fails(legal_run, tmp_path):
    run = doctored(legal_run, tmp_path, "overlap")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = tmp_path / "data_overlap"
    shutil.copytree(cfg["data"]["cache_dir"], data)
    val = read_shard(next(data.glob("fineweb_val_*.bin"))).numpy()
    starts = np.flatnonzero(val == 1)
    doc = val[starts[1]:starts[2]]  # a whole validation document, BOS included
    assert len(doc) >= 64
    last = sorted(data.glob("fineweb_train_*.bin"))[-1]
    write_shard(last, np.concatenate([read_shard(last).numpy(), doc]))
    cfg["data"]["cache_dir"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    bad = fails(run)
    assert len(bad) == 1 and bad[0].startswith("FAIL overlap: 1 of 5 validation documents")


def test_tilt_that_does_not_normalise_fails(legal_run, monkeypatch):
    monkeypatch.setattr(NgramTilt, "log_z", lambda self, log_q: torch.zeros_like(log_q))  # #886's bug: no Z
    bad = fails(legal_run)
    assert len(bad) == 1 and bad[0].startswith("FAIL normalised:")


def test_update_before_score_fails(legal_run, tmp_path):
    run = doctored(legal_run, tmp_path, "ledger")
    cache = yaml.safe_load((run / "config.yaml").read_text())["data"]["cache_dir"]
    n = load_validation_tokens(f"{cache}/fineweb_val_*.bin", 128).numel() - 1  # FAST: eval seq_len 128
    events = [("score", [[0, 100]]), ("update", [[0, 150]]), ("score", [[100, n]]), ("score", [[10, 12]])]
    (run / "ttt_ledger.rank0.jsonl").write_text("".join(json.dumps({"kind": k, "runs": r}) + "\n" for k, r in events))
    bad = fails(run)
    assert [b.split(":")[0] for b in bad] == ["FAIL score_first", "FAIL single_pass"]
    assert "50 trained targets not scored before" in bad[0] and "2 more than once" in bad[1]


def test_missing_run_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pgolf.audit", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "config.yaml" in r.stderr


def test_rescore_reproduces_the_run_and_isolates_each_option(legal_run):
    """pgolf.ttt.rescore: the artifact's score equals the run's; the tilt lowers it; caps never
    updated (the records' AsymLogit) score exactly as the scalar cap."""
    from pgolf.ttt.rescore import rescore

    rows = {name: bpb for name, _, bpb, _ in rescore(legal_run)}
    m = json.loads((legal_run / "metrics.json").read_text())
    assert rows["artifact"] == pytest.approx(m["final/quant_sliding_bpb"], rel=1e-12)
    assert rows["tilt on"] == rows["artifact"] and rows["tilt on"] < rows["tilt off"]
    assert rows["caps at 30, tilt off"] == rows["tilt off"]


def test_ledger_check_across_ranks():
    """Rank 1 may train on targets rank 0 scored (phased TTT's global step); nobody may train on a
    target no rank scored, and every target is scored once over all ranks."""
    r0 = [("score", np.arange(0, 50)), ("update", np.arange(0, 50))]
    r1 = [("score", np.arange(50, 100)), ("update", np.arange(0, 100))]
    assert all(ok for ok, _ in audit.check_ledger([r0, r1], 100))
    r1_bad = [("update", np.arange(90, 110)), ("score", np.arange(50, 100))]
    lines = audit.check_ledger([r0, r1_bad], 110)
    assert [ok for ok, _ in lines] == [False, False]
    assert "20 trained targets" in lines[0][1] and "10 never" in lines[1][1]


def test_overlap_finds_a_document_cut_by_a_shard_boundary():
    g = np.random.default_rng(0)
    docs = [np.concatenate([[1], g.integers(2, 100, n)]) for n in (80, 120, 70, 90)]
    val = np.concatenate([docs[0], docs[1]])
    train = np.concatenate([docs[2], docs[1], docs[3]])
    cut = len(docs[2]) + 50  # docs[1] spans the two shards
    ok, line = audit.check_overlap(val, iter([train[:cut], train[cut:]]), bos_id=1)
    assert not ok and line.startswith("FAIL overlap: 1 of 2 validation documents") and "(3 training documents)" in line
    ok, _ = audit.check_overlap(val, iter([docs[2], docs[3]]), bos_id=1)
    assert ok


def test_artifact_over_the_cap_fails(legal_run, tmp_path):
    run = doctored(legal_run, tmp_path, "big")
    artifact = next(run.glob("*.ptz"))
    with open(artifact, "ab") as f:
        f.write(b"\0" * 16_000_000)
    bad = fails(run)
    assert len(bad) == 1 and bad[0].startswith("FAIL bytes:") and "not the one the run scored" in bad[0]
