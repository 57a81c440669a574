"""Multi-process and multi-job runs on CPU: torchrun with gloo, Hydra multirun, self-launched workers.

Jobs use a small validation split (5 documents) so that each takes seconds; they still go
through the real run.py, torchrun, Hydra's multirun and W&B offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from runs import FAST, metrics
from runs import run_py as run

@pytest.mark.slow
def test_torchrun_two_ranks_agree(tmp_path, fast_cache):
    r = run([*FAST, fast_cache, "logger=none", "hydra.run.dir=run"], tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    m = metrics(tmp_path / "run")
    assert m["status"] == "finished" and m["world_size"] == 2 and m["train/ranks_identical"] is True
    assert m["final/quant_sliding_bpb"] > 0 and m["train/steps"] == 8
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "config.yaml", "final_model.int8.ptz", "final_model.pt", "metrics.json", "run.log", "train.log"]


@pytest.mark.slow
def test_multirun_sweep_report_and_wandb_groups(tmp_path, fast_cache):
    r = run(["-m", *FAST, fast_cache, "seed=1,2", "optimizer.muon_weight_decay=0,0.04", "hydra.sweep.dir=sweep"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 4 and all(metrics(j)["status"] == "finished" for j in jobs)
    rep = subprocess.run([sys.executable, "-m", "pgolf.report", str(tmp_path / "sweep"), "--baseline",
                          "optimizer.muon_weight_decay=0"], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    report = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert len(report["groups"]) == 2
    assert all((tmp_path / "sweep" / f).is_file() for f in ("report.md", "report.png"))
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    runs = []
    for j in jobs:
        out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(next((j / "wandb").glob("offline-run-*")))],
                             capture_output=True, text=True, timeout=120).stdout
        runs.append(next(json.loads(ln)["run"] for ln in out.splitlines() if '"type":"run"' in ln))
        summary = json.loads(subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json",
                                             str(next((j / "wandb").glob("offline-run-*")))],
                                            capture_output=True, text=True, timeout=120).stdout)["summary"]
        assert summary["final/quant_sliding_bpb"] == pytest.approx(metrics(j)["final/quant_sliding_bpb"])
    assert len({r["run_group"] for r in runs}) == 1 and runs[0]["run_group"].startswith("config-")
    assert {r["display_name"] for r in runs} == {f"seed={s},muon_weight_decay={w}" for s in (1, 2) for w in ("0", "0.04")}
    assert {r["job_type"] for r in runs} == {"smoke"}


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path, fast_cache):
    r = run(["-m", *FAST, fast_cache, "logger=none", "model.num_heads=4,3", "hydra.sweep.dir=sweep"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, bad = metrics(tmp_path / "sweep" / "0"), metrics(tmp_path / "sweep" / "1")
    assert ok["status"] == "finished"
    assert bad["status"] == "failed" and "model.num_heads=3" in bad["error"]
    rep = subprocess.run([sys.executable, "-m", "pgolf.report", str(tmp_path / "sweep")], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and "model.num_heads=3" in (tmp_path / "sweep" / "report.md").read_text()


@pytest.mark.slow
def test_multirun_jobs_launch_their_own_workers(tmp_path, fast_cache):
    r = run(["-m", *FAST, fast_cache, "logger=none", "seed=1,2", "distributed.nproc_per_node=2", "hydra.sweep.dir=sweep"],
            tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for job in ("0", "1"):
        m = metrics(tmp_path / "sweep" / job)
        assert m["status"] == "finished" and m["world_size"] == 2 and m["train/ranks_identical"] is True


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path, fast_cache):
    r = run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *FAST, fast_cache, "logger=none",
             "seed=1,2", "hydra.sweep.dir=sweep"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for job in ("0", "1"):
        assert metrics(tmp_path / "sweep" / job)["status"] == "finished"
    assert (tmp_path / "sweep" / ".submitit").is_dir()


def test_slurm_launcher_config_composes(tmp_path):
    r = run(["hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ("gpus_per_node: 8", "tasks_per_node: 8", "nodes: 1", "max_num_timeout: 3", "partition: null"):
        assert line in r.stdout


@pytest.mark.slow
def test_two_sweeps_started_together_keep_their_jobs_apart(tmp_path, fast_cache):
    """Two 4-job sweeps launched at the same moment (basic launcher): 8 job dirs, each with its own
    config, metrics and artifact (Hydra's `multirun/<time>` alone put both sweeps in one dir)."""
    import os

    # The default sweep dir with the clock stopped: both sweeps see the same second.
    args = [*FAST, fast_cache, "logger=none", "schedule.iterations=2", "eval.stride=null",
            "hydra.sweep.dir=multirun/2026-11-30_12-00-00_${pgolf_sweep_tag:}"]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "run.py"), "-m", *args,
                               f"seed={seeds}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seeds in ("1,2,3,4", "5,6,7,8")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    sweeps = sorted((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 2 and all(s.name.startswith("2026-11-30_12-00-00_") for s in sweeps)
    jobs = sorted(j for s in sweeps for j in s.iterdir() if j.is_dir())
    assert len(jobs) == 8
    seeds = []
    for j in jobs:
        seed = int(next(ln for ln in (j / "config.yaml").read_text().splitlines() if ln.startswith("seed:")).split()[1])
        assert f"seed={seed}" in (j / ".hydra" / "overrides.yaml").read_text()
        m = metrics(j)
        assert m["status"] == "finished" and m["artifact/model_bytes"] == (j / "final_model.int8.ptz").stat().st_size
        log = (j / "train.log").read_text()
        assert log.count("run_dir:") == 1 and log.startswith(f"seed: {seed}\n") and not (j / ".lock").exists()
        seeds.append(seed)
    assert sorted(seeds) == list(range(1, 9))
