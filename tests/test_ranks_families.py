"""Two gloo ranks for every option family end bit-identical (issue 21 item 6).

Each family of tests/test_resume_families.py (model parts incl. ones that get no gradient in
some phase, every optimizer option together: Parallel Muon, banked numerics, clipping, EMA, the
loaders) trains on 2 ranks with `torchrun`; both must end with identical bytes in every tensor of
the state dict (`ranks_identical`, a per-tensor SHA-256 gathered from every rank).
"""

from __future__ import annotations

import pytest

from runs import metrics, run_py
from test_resume_families import BASE, FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_ranks_train_and_stay_identical(family, fast_cache, tmp_path):
    r = run_py([*BASE, fast_cache, *FAMILIES[family], "hydra.run.dir=run"], tmp_path, torchrun=2,
               env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "ranks_identical:True world_size:2" in log
    m = metrics(tmp_path / "run")
    assert m["train/ranks_identical"] is True and m["world_size"] == 2
    if family == "model_1204_loop_at_step":  # untied repeat MLPs idle until looping starts: DDP is told
        assert "ddp_find_unused_parameters:True" in log
