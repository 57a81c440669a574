"""Progressive context growth (2026-04-30 #2014; issue 22 item 2) against the record's own code.

tests/goldens/progressive_2014.json (tests/goldens/README.md) holds, from #2014's train_gpt.py:
the training length and LR multiplier of every step of its own loop lines over synthetic elapsed
times (the #2014 plan on a 9 s budget; a step-based plan whose second change lands inside the
first re-warm; an unsorted plan whose last stage ends before 1), and its `DocumentPackingLoader`'s
micro-batches on two ranks across two switches (the prefetch queue it flushes at a change
included). pgolf's `Schedule.at` + `SeqGrowth` and its documents loader must give the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pgolf
from pgolf.build import build
from pgolf.compile_limits import graphs_needed
from pgolf.data.loaders import DocumentPackingLoader
from pgolf.data.packing import PackedRows
from pgolf.data.shards import write_shard
from pgolf.errors import PgolfError
from pgolf.progressive import SeqGrowth, train_shapes
from pgolf.schedule import Schedule
from runs import FAST, metrics

GOLDEN = json.loads((Path(__file__).parent / "goldens" / "progressive_2014.json").read_text())


@pytest.mark.parametrize("case", sorted(GOLDEN["schedule"]))
def test_length_and_lr_multiplier_per_step_equal_the_records_loop(case):
    g = GOLDEN["schedule"][case]
    sched = Schedule(iterations=g["iterations"], warmdown_iters=0, warmdown_frac=g["warmdown_frac"], min_lr=g["min_lr"],
                     max_wallclock_seconds=g["max_wallclock_seconds"], gptq_reserve_seconds=g["gptq_reserve_seconds"],
                     train_seq_len=g["train_seq_len"], train_seq_schedule=g["schedule"],
                     seq_change_warmup_steps=g["seq_change_warmup_steps"])
    assert [list(stage) for stage in sched.seq_plan] == g["plan"]
    growth, lines = SeqGrowth(sched), []
    got = []
    for step, elapsed_ms, _, _ in g["steps"]:
        point = sched.at(step, elapsed_ms)
        got.append((point.seq_len, point.lr_mul * growth.advance(step, point, lines.append)))
    assert [s for s, _ in got] == [row[2] for row in g["steps"]]
    assert [m for _, m in got] == pytest.approx([row[3] for row in g["steps"]], rel=1e-12, abs=1e-15)
    record_switches = [int(line.split("step:")[1].split()[0]) for line in g["record_log"]
                       if line.startswith("growth_stage:seq_len")]
    assert [step for step, _ in growth.switches] == record_switches
    assert all(line.startswith("seq_len:") and f"step:{s}" in line for line, s in zip(lines, record_switches))


def _shard_tokens(n: int, offset: int) -> np.ndarray:
    """The golden's synthetic shard: documents of cycling lengths (some longer than 128), BOS=1."""
    lengths = [5, 90, 17, 150, 33, 64, 8, 200, 41, 3, 129, 70]
    toks, k, i = [], offset, 0
    while len(toks) < n:
        doc = lengths[(i + offset) % len(lengths)]
        toks += [1] + [2 + (k + j * 7919) % 997 for j in range(doc - 1)]
        k, i = k + doc, i + 1
    return np.array(toks[:n], dtype=np.uint16)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).to(torch.int64).numpy().tobytes()).hexdigest()


def test_documents_loader_stream_equals_the_records_across_switches(tmp_path):
    """Same tokens, segment starts and longest segment as #2014's loader, micro-batch by
    micro-batch, with `seq_change_drop_batches=2` standing in for its flushed prefetch queue."""
    g = GOLDEN["loader"]
    for i, shard in enumerate(g["shards"]):
        write_shard(tmp_path / f"train_{i:06d}.bin", _shard_tokens(shard["tokens"], shard["offset"]))
    world, accum = g["world_size"], g["grad_accum"]
    tokens = world * accum * g["local_tokens"]
    sched = Schedule(train_seq_len=128, train_seq_schedule="32@0.3,64@0.6,128@1.0", seq_change_drop_batches=2)
    for rank in range(world):
        loader = PackedRows(DocumentPackingLoader(str(tmp_path / "train_*.bin"), rank=rank, world_size=world,
                                                  device="cpu", seq_len=128), bos_id=1, max_doc_len=128)
        growth = SeqGrowth(sched, drop=lambda seq_len: loader.next_batch(tokens, seq_len, accum))
        got = []
        for step, seq_len in enumerate(g["step_seq_lens"]):
            growth.advance(step, dataclasses.replace(sched.at(step, 0.0), seq_len=seq_len), lambda line: None)
            for _ in range(accum):
                x, y = loader.next_batch(tokens, growth.seq_len, accum)
                starts = loader.last_segments.reshape(-1).nonzero().reshape(-1).tolist()
                longest = max(b - a for a, b in zip(starts, starts[1:] + [x.numel()]))
                got.append(dict(seq_len=seq_len, sha=_sha(x), y_sha=_sha(y), starts=starts, max_seqlen=longest))
        assert got == g["calls"][str(rank)], f"rank {rank}"
    assert growth.switches == [[3, 64], [6, 128]]


@pytest.mark.parametrize("override,msg", [
    ("schedule.train_seq_schedule='48@0.5,128@1.0'", "must split into whole sequences of 48"),
    ("schedule.train_seq_schedule='64@0.5,256@1.0'",
     "stage 256@1.0: each length must be in (0, schedule.train_seq_len=128]"),
    ("schedule.train_seq_schedule='64x0.5'", "stage '64x0.5' is not LEN@FRAC"),
    ("schedule.train_seq_schedule='64@0,128@1'", "each fraction in (0, 1]"),
])
def test_a_bad_plan_fails_at_compose_with_one_line(override, msg):
    with pytest.raises(PgolfError, match=re.escape(msg)) as err:
        pgolf.compose(["experiment=smoke", override])
    assert "\n" not in str(err.value)


def test_a_fixed_window_loader_is_refused():
    with pytest.raises(PgolfError, match="data.loader=shuffled draws windows of one fixed length"):
        pgolf.compose(["experiment=smoke", "schedule.train_seq_schedule='64@0.5,128@1.0'", "data.loader=shuffled"])


def test_the_2014_preset_trains_at_the_records_shapes():
    """#2014's log: `compile_shape_warmup:start 1024xplain,2048xplain,2048xloop,3072xloop`."""
    cfg = pgolf.compose(["experiment=record_0430_pr2014_progressive3k"])
    sched = build(cfg, "schedule")
    assert (sched.train_seq_len, sched.seq_lens, sched.seq_change_warmup_steps) == (3072, [1024, 2048, 3072], 32)
    assert train_shapes(sched, 2) == [(1024, 0), (2048, 0), (2048, 2), (3072, 2)]
    assert graphs_needed([0, 2], {48, 16}, 4) == 4 + 2 * 2  # + standard eval batches per pass count
    # a bundled train_gpt.py reads the record's environment names
    from pgolf.submit.entry import apply_env

    config = pgolf.build.to_container(cfg)
    apply_env(config, {"TRAIN_SEQ_SCHEDULE": "1024@0.2,3072@1.0", "SEQ_CHANGE_WARMUP_STEPS": "8"})
    assert (config["schedule"]["train_seq_schedule"], config["schedule"]["seq_change_warmup_steps"]) == \
        ("1024@0.2,3072@1.0", 8)
    # without a schedule the shapes are one per pass count, as before
    assert train_shapes(Schedule(enable_looping_at=0.5, loop_phase2_at=0.65), 2) == [(1024, 0), (1024, 1), (1024, 2)]


def test_one_graph_per_length_is_counted_and_compiled():
    from torch._dynamo.testing import CompileCounter

    from pgolf.model import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp={"mlp_mult": 2.0})
    sched = Schedule(train_seq_len=64, train_seq_schedule="16@0.3,32@0.6,64@1.0")
    shapes = train_shapes(sched, 0)
    assert shapes == [(16, 0), (32, 0), (64, 0)] and graphs_needed([0], set(), len(shapes)) == 3
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    for seq_len, _ in shapes * 2:  # the second visit of each length compiles nothing
        x = torch.randint(0, 64, (128 // seq_len, seq_len))
        compiled(x, x).backward()
    assert counter.frame_count == 3
    torch._dynamo.reset()


def test_a_run_switches_twice_rewarms_and_logs_it(fast_cache, tmp_path):
    """End to end on the smoke data (document attention, packed rows): 32 -> 64 -> 128 at steps 3
    and 5 of 8, a 3-step LR re-warm after each, the two prefetch batches dropped."""
    overrides = [*FAST, fast_cache, "logger=none", "schedule.train_log_every=1", "schedule.train_batch_tokens=1024",
                 "data.loader=documents", "model.attention.doc_attention=true", "schedule.warmup_steps=2",
                 "schedule.train_seq_schedule='32@0.25,64@0.5,128@1.0'", "schedule.seq_change_warmup_steps=3",
                 "schedule.seq_change_drop_batches=2"]
    pgolf.train(pgolf.compose(overrides), run_dir=tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert "warmup_shapes:32x0,64x0,128x0" in log and "warmup_step:3/3" in log  # one step per shape at least
    assert "seq_len:32->64 step:3 frac:0.375 rewarm_steps:3 dropped_batches:2" in log
    assert "seq_len:64->128 step:5 frac:0.625 rewarm_steps:3 dropped_batches:2" in log
    sched = Schedule(iterations=8, warmdown_iters=100, max_wallclock_seconds=0)  # the smoke warm-down
    lr = {int(line.split("/")[0][5:]): float(line.split("lr_scale:")[1].split()[0])
          for line in log.splitlines() if line.startswith("step:") and "lr_scale:" in line}
    rewarm = {3: 1 / 3, 4: 2 / 3, 5: 1 / 3, 6: 2 / 3}  # after step s-1 the log shows step s's multiplier
    for step in range(8):
        assert lr[step + 1] == pytest.approx(sched.lr_mul(step, 0.0) * rewarm.get(step, 1.0), abs=1e-4)
    lens = {int(line.split("/")[0][5:]): int(line.split("seq_len:")[1]) for line in log.splitlines()
            if line.startswith("step:") and "train_loss" in line}
    assert lens == {1: 32, 2: 32, 3: 32, 4: 64, 5: 64, 6: 128, 7: 128, 8: 128}
    assert metrics(tmp_path)["train/seq_len_switches"] == [[3, 64], [5, 128]]
