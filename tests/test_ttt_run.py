"""TTT end to end (issue 20 items 1 and 6): `run.py ... eval=ttt_sgd` scores the artifact with TTT
after the quantized sliding eval, makes it the headline, logs per-phase timing and the 8-GPU
projection and leaves a ledger that re-checks; `python -m pgolf.ttt RUN_DIR` re-scores that artifact
with the LoRA and phased variants; `python -m pgolf.bench` projects the TTT eval."""

from __future__ import annotations

import json

import pytest

from pgolf.ttt.scorer import check_ledger, load_ledger
from runs import FAST, metrics, run_py

# A few chunks on the 5-document split, one epoch: seconds, not minutes.
SGD = ["eval=ttt_sgd", "eval.ttt.ttt_chunk_tokens=8192", "eval.ttt.ttt_epochs=1", "eval.ttt.ttt_lr=0.01"]
LORA = ["eval.ttt.ttt_lora_rank=4", "eval.ttt.ttt_batch_size=2", "eval.ttt.ttt_chunk_size=128",
        "eval.ttt.ttt_lora_lr=0.003"]


@pytest.fixture(scope="module")
def ttt_run(tmp_path_factory, fast_cache):
    run_dir = tmp_path_factory.mktemp("ttt_sgd")
    args = [*FAST, fast_cache, *SGD, "logger=none", f"hydra.run.dir={run_dir}"]
    proc = run_py(args, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, metrics(run_dir), args


@pytest.mark.slow
def test_run_scores_with_ttt_and_makes_it_the_headline(ttt_run):
    run_dir, m, _ = ttt_run
    assert m["final/ttt_bpb"] < m["final/quant_sliding_bpb"]  # the updates helped
    assert m["final/ttt_gain_bpb"] == m["final/ttt_bpb"] - m["final/quant_sliding_bpb"]
    assert m["eval/ttt_updates"] > 0 and m["eval/ttt_score_s"] > 0 and m["eval/ttt_train_s"] > 0
    log = (run_dir / "train.log").read_text()
    assert "ttt_phases variant:chunked_sgd score:" in log and "ttt_projection full_val_8xcpu:" in log
    assert "final_ttt val_loss:" in log
    events = load_ledger(run_dir / "ttt_ledger.rank0.jsonl")
    assert check_ledger(events, m["eval/ttt_targets"]) is None
    assert events[0].kind == "score" and any(e.kind == "update" for e in events)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ttt_phased"])  # the phased variant runs the LoRA queue too
def test_rescore_a_finished_artifact(ttt_run, variant, tmp_path):
    from pgolf.ttt.__main__ import main

    run_dir, m, args = ttt_run
    base = [a for a in args if not a.startswith(("eval", "hydra", "logger"))]
    extra = ["eval.ttt.phased_ttt_prefix_docs=4", "eval.ttt.phased_ttt_num_phases=2",
             "eval.ttt.global_ttt_chunk_tokens=4096", "eval.ttt.global_ttt_lr=0.01"] if variant == "ttt_phased" else []
    out = tmp_path / "r.json"
    assert main([str(run_dir), *base, f"eval={variant}", *LORA, *extra, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["final/quant_sliding_bpb"] == pytest.approx(m["final/quant_sliding_bpb"], rel=1e-9)
    assert r["final/ttt_bpb"] < r["final/quant_sliding_bpb"]
    if variant == "ttt_phased":
        assert r["eval/ttt_global_sgd_1_s"] > 0


@pytest.mark.slow
def test_rescore_without_ttt_is_one_line(ttt_run, capsys):
    from pgolf.ttt.__main__ import main

    run_dir, _, _ = ttt_run
    assert main([str(run_dir), "experiment=smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.ttt is not set" in err[0]


def test_bench_projects_the_ttt_eval(tmp_path, capsys):
    from pgolf.bench import main

    out = tmp_path / "b.json"
    assert main(["experiment=smoke", "eval=ttt_lora", *LORA, "--steps", "1", "--warmup", "0", "--eval-windows", "4",
                 "--eval-rounds", "1", "--doc-tokens", "100", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["eval_ttt_tokens_per_s"] > 0
    assert r["projected_full_val_ttt_s"] == pytest.approx(62_021_632 / r["eval_ttt_tokens_per_s"] / 8)
    assert "full val, TTT (N GPUs)" in capsys.readouterr().out
