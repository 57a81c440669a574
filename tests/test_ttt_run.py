"""TTT end to end (issue 20 items 1 and 6): `run.py ... eval=ttt_sgd` scores the artifact with TTT
after the quantized sliding eval, makes it the headline, logs per-phase timing and the 8-GPU
projection and leaves a ledger that re-checks; `python -m pgolf.ttt RUN_DIR` re-scores that artifact
with the LoRA and phased variants; `python -m pgolf.bench` projects the TTT eval."""

from __future__ import annotations

import json

import pytest
import torch

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


class ValTokens(torch.Tensor):
    """The validation stream, marked: the tensors computed from it stay ValTokens
    (__torch_function__), so a forward can tell whether its input ids came from validation data."""


@pytest.mark.slow
def test_nothing_trains_on_validation_tokens_before_the_first_score(fast_cache, tmp_path, monkeypatch):
    """Issue 20 item 2: the compile warm-up and any priming use training tokens. An in-process run
    (warm-up steps, training, export, the quantized sliding eval, TTT) records every forward: before
    the TTT scorer's first commit, no forward with gradients enabled reads a token of the (marked)
    validation stream; the warm-up and training forwards before it read training tokens only."""
    import pgolf
    import pgolf.submit.bundle
    import pgolf.trainer
    from pgolf.build import train
    from pgolf.model import GPT
    from pgolf.ttt.scorer import Scorer

    load, hidden, score = pgolf.trainer.load_validation_tokens, GPT.hidden, Scorer.score
    seen, scored = [], []
    monkeypatch.setattr(pgolf.trainer, "load_validation_tokens", lambda *a, **k: load(*a, **k).as_subclass(ValTokens))

    def spy_hidden(self, input_ids, docs=None):
        seen.append((isinstance(input_ids, ValTokens), torch.is_grad_enabled(), bool(scored)))
        return hidden(self, input_ids.as_subclass(torch.Tensor), docs)  # the model itself runs unmarked

    def spy_score(self, positions, logits):
        scored.append(True)
        return score(self, positions, logits)

    monkeypatch.setattr(GPT, "hidden", spy_hidden)
    monkeypatch.setattr(Scorer, "score", spy_score)
    monkeypatch.setattr(pgolf.submit.bundle, "code_bytes", lambda config: 0)  # minifying costs 15 s; not tested here
    cfg = pgolf.compose([*FAST, fast_cache, "schedule.iterations=2", "eval.stride=128", *SGD, "logger=none"])
    m = train(cfg, run_dir=tmp_path)
    before = [(val, grad) for val, grad, after in seen if not after]
    assert sum(grad for _, grad in before) >= cfg.schedule.warmup_steps + 2  # warm-up and training steps ran
    assert any(val for val, _ in before)  # the quantized sliding eval read the (marked) validation stream
    assert not any(val and grad for val, grad in before)  # ... without gradients, as did everything before TTT
    assert any(val and grad for val, grad, after in seen if after)  # TTT trains on validation tokens after scoring
    assert m["eval/ttt_updates"] > 0
