"""How many graphs a compiled run needs, so it never hits torch.compile's recompile limit.

The trainer compiles the model once with `dynamic=False`, so every distinct call is its own
graph: each layer sequence the run switches to (the loop-pass counts of depth recurrence, plus
the full schedule the final evals use) times each call shape: the training step, and the
standard eval's full batch and its last, shorter one (train and eval mode are different graphs).
Dynamo keeps at most `recompile_limit` graphs per frame (8 by default) and then silently runs
the frame eagerly, so a looped run with periodic evals could fall off the compiled path in the
middle of training (3 pass counts x 3 shapes = 9). Progressive context growth (#2014) adds a
training graph per (length, pass count) pair it trains at. `graphs_needed` counts them ahead and
`allow_graphs` raises the limit to fit; tests/test_compile_limits.py counts real graphs.
"""

from __future__ import annotations

import torch

from pgolf.schedule import loop_passes


def loop_pass_counts(schedule, num_loops: int) -> list[int]:
    """The distinct loop-pass counts a run switches through, in schedule order (none, each phase
    of progressive recurrence, the full schedule): a model without loops gives [0]."""
    return sorted({loop_passes(phase, num_loops) for phase in schedule.loop_phases()})


def eval_batch_sizes(num_val_tokens: int, seq_len: int, batch_tokens: int, rank: int, world_size: int) -> set[int]:
    """The batch sizes (sequences) of this rank's standard eval (pgolf.evaluate.eval_standard)."""
    batch_seqs = max(batch_tokens // seq_len, 1)
    total = (num_val_tokens - 1) // seq_len
    first, last = total * rank // world_size, total * (rank + 1) // world_size
    return {min(s + batch_seqs, last) - s for s in range(first, last, batch_seqs)}


def graphs_needed(pass_counts: list[int], eval_sizes: set[int], num_train_shapes: int | None = None) -> int:
    """Distinct compiled graphs of one run: the training shapes (one per pass count, or
    `num_train_shapes` (length, pass count) pairs of progressive context growth,
    pgolf.progressive.train_shapes) + pass counts x eval batch sizes."""
    return (len(pass_counts) if num_train_shapes is None else num_train_shapes) + len(pass_counts) * len(eval_sizes)


def allow_graphs(count: int) -> str:
    """Raise dynamo's per-frame recompile limit to `count` when it is lower; returns a log line."""
    config = torch._dynamo.config
    before = config.recompile_limit
    config.recompile_limit = max(before, count)
    return f"compile_graphs:{count} recompile_limit:{config.recompile_limit}"
