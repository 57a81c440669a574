"""No two live jobs write one directory: the run-dir lock names its holder, is released on exit,
is taken over when its holder died, and a job refused by it writes nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from runs import ROOT, run_py, tree

import pgolf
from pgolf.build import to_container
from pgolf.rundir import LOCK_NAME, RunDirBusy, hold, release

HOLDER = ("import sys, time; from pgolf.rundir import hold; hold(sys.argv[1]); print('held', flush=True); "
          "time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another live process holding tmp_path/run."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_a_live_holder_refuses_others_and_a_dead_one_is_taken_over(holder):
    run_dir, proc = holder
    before = tree(run_dir)
    with pytest.raises(RunDirBusy) as err:
        hold(run_dir)
    assert str(err.value) == (f"{run_dir} is in use by a live run (pid {proc.pid} host {socket.gethostname()}, see "
                              f"{run_dir / LOCK_NAME}); wait for it to end or pick another directory (hydra.run.dir / "
                              "hydra.sweep.dir)")
    assert tree(run_dir) == before
    proc.send_signal(signal.SIGKILL)  # dies without releasing: the lock file stays, its flock goes
    proc.wait()
    assert hold(run_dir) == f"pid {proc.pid} host {socket.gethostname()}"
    assert (run_dir / LOCK_NAME).read_text() == f"pid {os.getpid()} host {socket.gethostname()}\n"
    release(run_dir)
    assert not (run_dir / LOCK_NAME).exists()


def test_holding_is_idempotent_and_release_removes_the_file(tmp_path):
    assert hold(tmp_path / "a") is None and hold(tmp_path / "a") is None
    release(tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []


def test_a_run_in_a_held_dir_refuses_and_writes_nothing(holder, fast_cache):
    run_dir, proc = holder
    before = tree(run_dir)
    r = run_py(["experiment=smoke", fast_cache, "logger=none", f"hydra.run.dir={run_dir}"], run_dir.parent)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: {run_dir} is in use by a live run (pid {proc.pid} host {socket.gethostname()}, see "
                        f"{run_dir / LOCK_NAME}); wait for it to end or pick another directory (hydra.run.dir / "
                        "hydra.sweep.dir)\n")
    assert tree(run_dir) == before


def test_a_sweep_into_a_held_sweep_dir_refuses_and_writes_nothing(holder, fast_cache):
    run_dir, proc = holder
    before = tree(run_dir)
    r = run_py(["-m", "experiment=smoke", fast_cache, "logger=none", "seed=1,2", f"hydra.sweep.dir={run_dir}"],
               run_dir.parent)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {run_dir} is in use by a live run (pid {proc.pid} ")
    assert tree(run_dir) == before


def test_resume_into_a_held_dir_refuses_and_writes_nothing(holder, fast_cache):
    run_dir, proc = holder
    args = ["experiment=smoke", fast_cache, "logger=none"]
    (run_dir / "checkpoint").mkdir()
    meta = {"step": 1, "train_ms": 0, "world_size": 1, "config": to_container(pgolf.compose(args))}
    (run_dir / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    before = tree(run_dir)
    r = run_py([*args, f"resume={run_dir}"], run_dir.parent)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {run_dir} is in use by a live run (pid {proc.pid} ")
    assert tree(run_dir) == before


def test_sweep_dirs_of_one_second_differ():
    """Hydra's `${now:}` gives two sweeps started in one second the same name; pgolf adds a tag,
    fixed within one sweep (a cached resolver) and different between two."""
    from omegaconf import OmegaConf

    sweep_dir = OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.sweep._get_node("dir")._value()
    assert sweep_dir == "multirun/${now:%Y-%m-%d_%H-%M-%S}_${pgolf_sweep_tag:}"
    a, b = (OmegaConf.create({"now": "2026-01-01", "dir": "${now}_${pgolf_sweep_tag:}", "again": "${dir}"})
            for _ in range(2))
    assert a.dir == a.again and a.dir != b.dir
