"""`sweeps/optuna.yaml`: Hydra's Optuna sweeper minimises what run.py returns (final/quant_sliding_bpb)."""

from __future__ import annotations

import pytest
import yaml
from runs import FAST, ROOT, metrics, run_py


@pytest.mark.slow
def test_optuna_sweep_runs_four_trials_on_smoke_and_reports_the_best(tmp_path, fast_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_py(["--config-dir", str(ROOT / "sweeps"), "--config-name", "optuna", *FAST, fast_cache, "logger=none",
                "hydra.sweeper.n_trials=4", "hydra.sweep.dir=sweep"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    bpb = {}
    for job in jobs:
        m = metrics(job)
        assert m["status"] == "finished"
        bpb[job.name] = m["final/quant_sliding_bpb"]
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert {o.split("=")[0] for o in overrides} >= {"optimizer.matrix_lr", "optimizer.muon_weight_decay",
                                                         "schedule.warmdown_iters"}
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and result["best_value"] == pytest.approx(min(bpb.values()))
