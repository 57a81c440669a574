"""A run stopped at any moment loses nothing: SIGTERM during warm-up, mid-training, a periodic
eval, the export or the final sliding eval, then `resume=DIR`, ends with the metrics.json of a
run never interrupted, and with one W&B run (offline) across the attempts.

The signal is delivered at an exact phase by the test hook PGOLF_FAULT_AT (the process
signals itself there), so nothing depends on timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runs import FAST, metrics, run_py

# 8 steps, evals at steps 0, 4 and 8, W&B offline (run_py sets WANDB_MODE=offline).
JOB = [*FAST, "eval.val_loss_every=4", "logger=wandb"]
TIMING = {"train/time_s", "train/ms_per_step", "eval/time_s", "memory/peak_mib"}
# moment -> (PGOLF_FAULT_AT, the exit code, what the `preempted:` line says resume will do)
MOMENTS = {
    "warm-up": ("warmup", 143, "stopping at step 0; resume will train from step 0"),
    "mid-training": ("step:5", 143, "stopping at step 5; resume will train from step 5"),
    "periodic eval": ("val:4", 143, "stopping at step 5; resume will train from step 5"),
    "export": ("export", 143, "training is done (8 steps, final_model.pt); resume will export and evaluate it again "
                              "without training"),
    "final sliding eval": ("sliding", 0, None),  # the eval finishes, metrics.json is written: nothing to resume
}


def figures(run_dir: Path) -> dict:
    return {k: v for k, v in metrics(run_dir).items() if k not in TIMING}


def wandb_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect(offline_dir: Path, *flags: str) -> str:
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    return subprocess.run([wandb_cli, "leet", "inspect", "--json", *flags, str(offline_dir)], capture_output=True,
                          text=True, timeout=120).stdout


def history_steps(offline_dir: Path) -> list[int]:
    records = [json.loads(ln) for ln in inspect(offline_dir).splitlines() if '"type":"history"' in ln]
    return sorted({int(rec["history"]["step"].get("num", 0)) for rec in records})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, fast_cache) -> Path:
    cwd = tmp_path_factory.mktemp("straight")
    r = run_py([*JOB, fast_cache, "hydra.run.dir=run"], cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd / "run"


def attempt(run_dir: Path, cache: str, moment: str, first: bool = False) -> subprocess.CompletedProcess:
    """One attempt of the run in `run_dir`, signalled at `moment`; returns the finished process."""
    phase, code, says = MOMENTS[moment]
    where = f"hydra.run.dir={run_dir}" if first else f"resume={run_dir}"
    r = run_py([*JOB, cache, where], run_dir.parent, env={"PGOLF_FAULT_AT": phase})
    assert r.returncode == code, moment + r.stdout[-2000:] + r.stderr[-2000:]
    if code:
        assert f"preempted: {says}; continue with resume={run_dir} (or rerun in the same hydra.run.dir)" in r.stdout
        assert not (run_dir / "metrics.json").exists() and not (run_dir / ".lock").exists()
    else:
        assert "preempted after the final eval: the run is complete" in r.stdout
    return r


def assert_ends_like(run_dir: Path, straight: Path, attempts: int) -> list[Path]:
    """metrics.json equals the straight run's; one W&B run id across `attempts` offline dirs."""
    assert figures(run_dir) == figures(straight)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "config.yaml", "final_model.int8.ptz", "final_model.pt", "metrics.json", "run.log", "train.log", "wandb",
        "wandb_run_id"]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    dirs = wandb_dirs(run_dir)
    assert len(dirs) == attempts and all(d.name.endswith(f"-{run_id}") for d in dirs)
    summary = json.loads(inspect(dirs[-1], "--summary"))["summary"]
    assert summary["final/quant_sliding_bpb"] == metrics(run_dir)["final/quant_sliding_bpb"]
    return dirs



@pytest.mark.slow
def test_sigterm_at_every_moment_of_one_run_then_resume_ends_like_a_straight_run(straight, fast_cache, tmp_path):
    """One run stopped four times, each resume signalled at the next moment: warm-up, mid-training,
    export, final sliding eval (which completes). Every attempt resumes the same W&B run, and its
    history holds every step exactly once across the attempts."""
    run_dir = tmp_path / "run"
    attempt(run_dir, fast_cache, "warm-up", first=True)
    attempt(run_dir, fast_cache, "mid-training")
    r = attempt(run_dir, fast_cache, "export")
    assert "training done; exporting and evaluating again" not in r.stdout  # it trained steps 6..8 first
    r = attempt(run_dir, fast_cache, "final sliding eval")
    assert "training done; exporting and evaluating again" in r.stdout and "train_loss" not in r.stdout
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert f"`wandb sync {run_dir / 'wandb'}/offline-run-*-{run_id}`" in r.stdout
    dirs = assert_ends_like(run_dir, straight, attempts=4)
    steps = [history_steps(d) for d in dirs]
    assert steps[1:3] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]] and not set(steps[0]) & set(steps[1])


@pytest.mark.slow
def test_sigterm_in_a_periodic_eval_then_resume_ends_like_a_straight_run(straight, fast_cache, tmp_path):
    run_dir = tmp_path / "run"
    attempt(run_dir, fast_cache, "periodic eval", first=True)
    r = run_py([*JOB, fast_cache, f"resume={run_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_ends_like(run_dir, straight, attempts=2)


@pytest.mark.slow
def test_sigkill_during_the_final_eval_resumes_without_training(straight, fast_cache, tmp_path):
    """A signal that cannot be caught (SIGKILL after a grace period): the hand-off state is on disk."""
    run_dir = tmp_path / "run"
    r = run_py([*JOB, fast_cache, f"hydra.run.dir={run_dir}"], tmp_path,
               env={"PGOLF_FAULT_AT": "sliding", "PGOLF_FAULT_SIGNAL": "KILL"})
    assert r.returncode == -signal.SIGKILL
    assert (run_dir / "final_state.json").is_file() and (run_dir / ".lock").is_file()  # a stale lock
    r = run_py([*JOB, fast_cache, f"resume={run_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"run_dir: {run_dir} was locked by pid ")
    assert "training done; exporting and evaluating again" in r.stdout and "train_loss" not in r.stdout
    assert figures(run_dir) == figures(straight)
    assert not (run_dir / "final_state.json").exists()


def test_only_a_continuing_run_reuses_the_wandb_id(tmp_path, monkeypatch):
    """A run that resumes keeps the W&B id of its directory; one that starts over there gets a new one."""
    from pgolf.runlog import RunLog, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    ids = []
    for resuming in (False, True, False):
        logger = WandbLogger()
        logger.start(config={}, run_dir=tmp_path, log=RunLog(None, master=False), resuming=resuming)
        ids.append(logger.run.id)
        assert (tmp_path / "wandb_run_id").read_text() == f"{logger.run.id}\n"
        logger.finish()
    assert ids[0] == ids[1] != ids[2]
