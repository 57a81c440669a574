"""Every config error before anything is written (issue 21 item 4).

Each case is a check that needs only the config; it must fail at compose time (in-process here,
which is what `run.py` runs before Hydra makes a run directory) with one short line naming the
value. One case goes through `python run.py` to show that no run directory appears and no data
is read: the issue's report, `optimizer.ns_coefficients=polar_express optimizer.muon_backend_steps=6`.
"""

from __future__ import annotations

import pytest

from pgolf.build import compose
from pgolf.errors import PgolfError
from runs import run_py, tree

# (overrides, a fragment the one line must hold), per group and across groups
CASES = [
    # The model's part families (issue 18 item 2): an old flat key names its new place; nested
    # keys are checked for name, type and choice like a group's.
    (["model.xsa_last_n=4"], "model.xsa_last_n moved: set model.attention.xsa_last_n instead"),
    (["model.sparse_attn_gate_enabled=true"], "moved: set model.attention.gate=sparse instead"),
    (["+model.attention.xsa_lastn=4"], "model.attention.xsa_lastn is not an option of model.attention"),
    (["model.attention.xsa_last_n=abc"], "model.attention.xsa_last_n='abc' has the wrong type: expected int"),
    (["model.attention.gate=dense"], "model.attention.gate='dense' is not one of none, attn_out, gated, sparse"),
    (["model.residual.parallel_start_layer=1", "model.recurrence.num_loops=1", "model.recurrence.loop_end=1"],
     "falls in the U-Net encoder"),
    (["optimizer.ns_coefficients=polar_express", "optimizer.muon_backend_steps=6"], "muon_backend_steps=6"),
    (["optimizer.ns_coefficients=cubic"], "ns_coefficients='cubic' is unknown"),
    (["optimizer.muon_numerics=fp8"], "muon_numerics='fp8' is unknown"),
    (["optimizer.muon_backend_steps=0"], "muon_backend_steps=0 must be >= 1"),
    (["optimizer.matrix_lr=-0.1"], "matrix_lr=-0.1 must be >= 0"),
    (["optimizer.muon_momentum=1.5"], "muon_momentum"),
    (["optimizer.ns_dtype=fp16"], "ns_dtype='fp16' is unknown"),
    (["optimizer.embed_betas=[0.9]"], "embed_betas=[0.9]"),
    (["optimizer.grad_clip_norm=-1.0"], "grad_clip_norm=-1.0"),
    (["schedule.iterations=0"], "schedule.iterations=0 must be positive"),
    (["schedule.warmdown_frac=2.0"], "schedule.warmdown_frac=2.0 must be in [0, 1]"),
    (["schedule.ema_decay=1.0"], "schedule.ema_decay=1.0"),
    (["schedule.ema_decay=0.99", "schedule.swa_every=5"], "both set"),
    (["schedule.max_wallclock_seconds=10", "schedule.gptq_reserve_seconds=10"], "gptq_reserve_seconds=10"),
    (["schedule.train_batch_tokens=1000"], "train_batch_tokens=1000 must split"),
    (["eval.stride=0"], "eval.stride=0"),
    (["eval.batch_seqs=0"], "eval.batch_seqs=0"),
    (["checkpoint.every_steps=-5"], "checkpoint.every_steps=-5 must be >= 0"),
    (["distributed.nproc_per_node=3"], "nproc_per_node=3"),
    (["data.loader=random"], "data.loader='random' is unknown"),
    (["data=stdlib", "data.source=web"], "data.source='web' is unknown"),
    (["data.data_path=", "data.tokenizer_path="], "data_path and tokenizer_path are required"),
    (["quant.preset=int3"], "int3"),
    (["model.num_heads=3"], "num_heads"),
    (["model.bos_id=2"], "model.bos_id=2 but data.bos_id=1"),
    (["model.attention.doc_attention=true", "model.attention.rope_train_seq_len=1024"], "rope_train_seq_len=1024 with model.attention.doc_attention"),
    (["device=tpu"], "device='tpu'"),
    (["schedule.iterations=abc"], "iterations"),
    (["optimizer.no_such_key=1"], "no_such_key"),
]


@pytest.mark.parametrize("overrides,fragment", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_config_error_at_compose(overrides, fragment):
    with pytest.raises(PgolfError) as e:
        compose(overrides)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and len(msg) < 500, msg


def test_good_combinations_compose():
    """The checks do not refuse what the records run."""
    compose(["optimizer.ns_coefficients=polar_express", "optimizer.muon_backend_steps=5"])
    compose(["model.attention.doc_attention=true", "data.loader=documents"])
    compose(["model.attention.doc_attention=true", "data.loader=coprime", "model.attention.rope_train_seq_len=1024"])  # rows stay rows


def test_run_py_config_error_leaves_no_run_directory(tmp_path):
    """The issue's report through the real command line: exit 2, one line, nothing written."""
    before = tree(tmp_path)
    r = run_py(["experiment=smoke", "optimizer.ns_coefficients=polar_express", "optimizer.muon_backend_steps=6",
                f"data.cache_dir={tmp_path / 'never_built'}", "hydra.run.dir=run"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "muon_backend_steps=6" in errors[0]
    assert tree(tmp_path) == before and not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "never_built").exists()  # no data was built or read
