"""Checkpoints: a run stopped by SIGTERM and resumed ends with the same weights as one run
straight through; a checkpoint from another config, a missing one, a poisoned one, a NaN
loss and a full disk are refused with one line."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import FAST, ROOT, metrics, tree

import pgolf
from pgolf.checkpoint import Checkpointing, config_differences, find_checkpoint, load_checkpoint
from pgolf.errors import PgolfError
from pgolf.model import GPT
from pgolf.trainer import write_atomic

JOB = [*FAST, "schedule.iterations=30", "schedule.train_log_every=1", "logger=none"]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, fast_cache):
    """`python run.py` killed with SIGTERM after step 5: it checkpoints and exits 143."""
    run_dir = tmp_path_factory.mktemp("interrupted")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *JOB, fast_cache, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step:5/30 train_loss"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, "".join(lines)
    return run_dir, "".join(lines)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_no_metrics(interrupted):
    run_dir, out = interrupted
    assert "preempted: stopping at step" in out and f"resume={run_dir}" in out
    assert find_checkpoint(run_dir) == run_dir / "checkpoint"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "final_model.pt").exists()
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["meta.json", "model.pt", "rank0.pt"]


@pytest.mark.slow
def test_resume_with_another_config_is_refused_and_writes_nothing(interrupted, fast_cache):
    run_dir, _ = interrupted
    before = tree(run_dir)
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, fast_cache, "optimizer.matrix_lr=0.05",
                        f"resume={run_dir}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: cannot resume from {run_dir}/checkpoint: its config differs: "
                                "optimizer.matrix_lr=0.04 (checkpoint) vs 0.05 (this run); resume with the same "
                                "config or start a new run")
    assert tree(run_dir) == before


@pytest.mark.slow
def test_resumed_run_equals_a_straight_run(interrupted, fast_cache, tmp_path):
    run_dir, _ = interrupted
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, fast_cache, f"resume={run_dir}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed:" in r.stdout and metrics(run_dir)["train/steps"] == 30
    assert not find_checkpoint(run_dir)  # a finished run drops its checkpoint
    straight = tmp_path / "straight"
    pgolf.train(pgolf.compose([*JOB, fast_cache]), run_dir=straight)
    a, b = weights(run_dir), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(run_dir)["final/quant_sliding_bpb"] == metrics(straight)["final/quant_sliding_bpb"]


def test_resume_from_a_dir_without_checkpoint(tmp_path, fast_cache):
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, fast_cache, f"resume={tmp_path}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"error: resume={tmp_path}: no checkpoint found there")
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_finished_run_is_refused(tmp_path, fast_cache):
    (tmp_path / "metrics.json").write_text('{"status": "finished"}')
    before = tree(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, fast_cache, f"resume={tmp_path}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == (f"error: resume={tmp_path}: that run already finished (metrics.json); there is nothing to "
                        "resume, start a new run\n")
    assert tree(tmp_path) == before


def test_periodic_checkpoint_schedule():
    every = Checkpointing(every_steps=10, every_seconds=60)
    assert not every.due(5, 1000.0, 0, 0.0) and every.due(10, 1000.0, 0, 0.0) and every.due(3, 61_000.0, 0, 0.0)
    assert not Checkpointing().due(10_000, 1e9, 0, 0.0)
    with pytest.raises(PgolfError, match="must be >= 0"):
        Checkpointing(every_steps=-1)


def test_config_differences_ignores_what_a_continuation_may_change():
    a = {"seed": 1, "run_id": "x", "logger": {"name": "a"}, "model": {"num_layers": 9}, "checkpoint": {"every_steps": 1}}
    b = {"seed": 1, "run_id": "y", "logger": {"name": "b"}, "model": {"num_layers": 9}, "checkpoint": {"every_steps": 5}}
    assert config_differences(a, b) == []
    b["model"]["num_layers"] = 10
    assert config_differences(a, b) == ["model.num_layers=9 (checkpoint) vs 10 (this run)"]


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/pgolf-pwned"),))


def test_a_checkpoint_that_would_run_code_is_rejected(tmp_path):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text('{"step": 1, "train_ms": 0, "world_size": 1, "config": {}}')
    torch.save({"model": {}, "swa": None}, ckpt / "model.pt")
    (ckpt / "rank0.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    Path("/tmp/pgolf-pwned").unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(ckpt, rank=0, world_size=1, config={})
    assert not Path("/tmp/pgolf-pwned").exists()


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, fast_cache, monkeypatch):
    # A fault injected into the model: from step 6 on (8 micro-batches a step) its loss is NaN.
    calls, real_forward = [], GPT.forward

    def forward(self, input_ids, target_ids):
        calls.append(1)
        loss = real_forward(self, input_ids, target_ids)
        return loss * float("nan") if len(calls) > 8 * (5 + 2) else loss  # + the 2 warmup steps

    monkeypatch.setattr(GPT, "forward", forward)
    cfg = pgolf.compose([*JOB, fast_cache, "checkpoint.every_steps=1"])
    with pytest.raises(PgolfError, match=r"^train loss is nan at step 6; lower the learning rates or check the data"):
        pgolf.train(cfg, run_dir=tmp_path)
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 5
    state = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "metrics.json").exists() and not list(tmp_path.glob(".*.tmp*"))


def test_a_full_disk_fails_before_training(tmp_path, fast_cache, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(PgolfError, match=rf"{tmp_path} has 0.0 MB free but this run writes up to 5.8 MB"):
        pgolf.train(pgolf.compose([*JOB, fast_cache]), run_dir=tmp_path)
    assert not (tmp_path / "final_model.pt").exists()


def test_a_failed_write_names_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def no_space(self, data):
        Path.touch(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(PgolfError, match=f"could not write {tmp_path}/metrics.json: No space left on device"):
        write_atomic(tmp_path / "metrics.json", b"{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_ranks_resume_equals_a_straight_run(tmp_path, fast_cache):
    """torchrun forwards SIGTERM to its workers: both save their own optimizer state and exit;
    a 2-process resume then ends where a straight 2-process run ends."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"),
              *JOB, fast_cache]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*launch, f"hydra.run.dir={tmp_path / 'a'}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step:5/30 train_loss"):
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    ckpt = find_checkpoint(tmp_path / "a")
    assert ckpt is not None and sorted(p.name for p in ckpt.glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    assert not (tmp_path / "a" / "metrics.json").exists()
    r = subprocess.run([*launch, f"resume={tmp_path / 'a'}"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*launch, f"hydra.run.dir={tmp_path / 'b'}"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "a")["train/ranks_identical"] is True
