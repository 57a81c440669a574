"""Resume equals a straight run for every option family (issue 21 item 5).

For each family (model parts, optimizer options, schedule transitions, loaders; the options of a
family combined into one job, so the test fits the suite's time) one tiny job runs
three times in this process: straight through; stopped by a signal after step 3 (it checkpoints
and raises SystemExit, as under SLURM preemption); then resumed from that checkpoint. The resumed
run must end with bit-identical weights and the same final metrics. The families' one-time
transitions (looping at a budget fraction or a step, QAT, EMA and the WD taper from a fraction)
fall after the stop, so the resumed run has to reproduce them from the checkpoint; a training-length
change (progressive context) falls before it, so the resumed run must continue its LR re-warm.
"""

from __future__ import annotations

import signal

import pytest
import torch

import pgolf
from runs import FAST, metrics

BASE = [*FAST, "logger=none", "schedule.train_log_every=1", "schedule.warmdown_iters=4", "eval.val_loss_every=0",
        "schedule.train_batch_tokens=1024"]
STOP_AT = 3  # of 8 steps; every transition below happens at step 4 (fraction 0.5) or later
FAMILIES = {  # options of one kind combined into one job each, to keep the suite's time
    "model_parts_loop_at_fraction": [
        "model.num_layers=3", "model.recurrence.num_loops=1", "model.recurrence.loop_start=1", "model.recurrence.loop_end=1",
        "schedule.enable_looping_at=0.5", "model.residual.parallel_start_layer=2", "model.attention.xsa_last_n=2",
        "model.embeddings.value_residual=sigmoid", "model.residual.skip_gates_enabled=true", "model.embeddings.smear_gate=window", "model.attention.gate_window=4",
        "model.embeddings.bigram_buckets=37", "model.embeddings.bigram_dim=8", "model.embeddings.ve_enabled=true", "model.embeddings.ve_dim=16",
        "model.embeddings.ve_layers=[1]", "model.attention.gate=attn_out"],
    "model_1204_loop_at_step": [
        "model.num_layers=3", "model.recurrence.num_loops=1", "model.recurrence.loop_start=1", "model.recurrence.loop_end=2", "schedule.recur_start_step=5",
        "model.recurrence.layer_index=virtual", "model.recurrence.loop_untie_mlp=true", "model.residual.parallel_start_layer=2",
        "model.residual.parallel_residual=learned_2lane"],
    "optimizer_ema_qat_wd_taper_coprime": [
        "optimizer.ns_coefficients=polar_express", "optimizer.muon_row_normalize=true", "optimizer.muon_numerics=banked",
        "optimizer.grad_clip_norm=0.5", "optimizer.muon_weight_decay=0.04", "optimizer.adam_weight_decay=0.01",
        "optimizer.muon_parallel=true", "schedule.ema_decay=0.9", "schedule.ema_start_frac=0.5", "model.qat.qat_bits=6",
        "schedule.qat_start_frac=0.5", "schedule.wd_taper_start_frac=0.5", "schedule.wd_taper_final_mult=0.5",
        "data.loader=coprime"],
    "swa_shuffled": ["schedule.swa_every=1", "schedule.swa_start_frac=0.5", "data.loader=shuffled"],
    # progressive context (#2014): 32 -> 64 at step 2, before the stop, so the resumed run needs the saved
    # length and re-warm (steps 2-4); 64 -> 128 at step 5, after it
    "documents_packed_doc_attention_progressive": [
        "data.loader=documents", "model.attention.doc_attention=true", "model.embeddings.smear_gate=window", "model.attention.gate_window=4", "model.embeddings.gate_window=4",
        "model.embeddings.bigram_buckets=37", "model.embeddings.bigram_dim=8", "schedule.train_seq_schedule='32@0.125,64@0.5,128@1.0'",
        "schedule.seq_change_warmup_steps=3", "schedule.seq_change_drop_batches=2"],
}
SAME = ("final/quant_sliding_bpb", "final/quant_bpb", "final/prequant_bpb", "final/pre_averaging_bpb", "train/steps",
        "train/ema_updates", "train/swa_snapshots", "artifact/model_bytes")


def weights(run_dir) -> dict:
    return torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_resume_equals_straight(family, fast_cache, tmp_path, monkeypatch):
    overrides = [*BASE, fast_cache, *FAMILIES[family]]
    pgolf.train(pgolf.compose(overrides), run_dir=tmp_path / "straight")
    # Stopped after step 3 by SIGUSR1 (SLURM's time-limit warning): a checkpoint, then SystemExit.
    monkeypatch.setenv("PGOLF_FAULT_AT", f"step:{STOP_AT}")
    monkeypatch.setenv("PGOLF_FAULT_SIGNAL", "USR1")
    previous = signal.signal(signal.SIGUSR1, lambda *a: None)  # what the stopped run hands the signal on to
    try:
        with pytest.raises(SystemExit):
            pgolf.train(pgolf.compose(overrides), run_dir=tmp_path / "stopped")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    monkeypatch.delenv("PGOLF_FAULT_AT")
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    pgolf.train(pgolf.compose([*overrides, f"resume={tmp_path / 'stopped'}"]), run_dir=tmp_path / "stopped")
    log = (tmp_path / "stopped" / "train.log").read_text()
    assert "resumed:" in log and f"step:{STOP_AT}" in log
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    ma, mb = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    assert {k: ma.get(k) for k in SAME} == {k: mb.get(k) for k in SAME}
