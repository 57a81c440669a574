"""Compiled runs stay within dynamo's recompile limit (issue 21 item 9).

A run with progressive depth recurrence switches through three loop-pass counts (0, 1, 2) and
evaluates periodically in each: 3 x (train step + full eval batch + last eval batch) = 9 graphs,
one more than dynamo's default limit of 8, past which a frame silently runs eagerly. This test
counts the graphs of exactly that run's calls (the trainer's own eval function) and checks that
`graphs_needed` counts them and that, with `allow_graphs`, every one of them is compiled.
"""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounter

from pgolf.compile_limits import allow_graphs, eval_batch_sizes, graphs_needed, loop_pass_counts
from pgolf.evaluate import ByteLUTs, eval_standard
from pgolf.model import GPT, from_flat
from pgolf.schedule import Schedule

V, T = 64, 16
SHAPE = dict(vocab_size=V, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
             num_loops=2, loop_start=1, loop_end=1)
SCHEDULE = Schedule(enable_looping_at=0.3, loop_phase2_at=0.6)  # progressive recurrence
LUTS = ByteLUTs(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))


def run_calls(compiled, model, val: torch.Tensor, batch_tokens: int) -> None:
    """What a run calls on the compiled model: per loop phase a training step and a standard eval."""
    g = torch.Generator().manual_seed(0)
    for passes in loop_pass_counts(SCHEDULE, model.num_loops):
        model.set_looping(passes)
        for _ in range(2):  # two steps per phase: the second must not compile again
            x, y = torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)
            compiled(x, y).backward()
            eval_standard(compiled, val, LUTS, seq_len=T, batch_tokens=batch_tokens, rank=0, world_size=1,
                          device=torch.device("cpu"), dtype=torch.float32)


def test_graphs_of_a_looped_run_with_evals_are_counted_and_all_compiled():
    torch.manual_seed(0)
    model = GPT(**from_flat(SHAPE))
    val = torch.randint(0, V, (10 * T + 1,), generator=torch.Generator().manual_seed(1))
    batch_tokens = 4 * T  # batches of 4, 4, 2 sequences
    sizes = eval_batch_sizes(val.numel(), T, batch_tokens, 0, 1)
    passes = loop_pass_counts(SCHEDULE, model.num_loops)
    assert passes == [0, 1, 2] and sizes == {4, 2}
    need = graphs_needed(passes, sizes)
    assert need == 9
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        assert allow_graphs(need) == "compile_graphs:9 recompile_limit:9"
        counter = CompileCounter()
        run_calls(torch.compile(model, backend=counter, fullgraph=True, dynamic=False), model, val, batch_tokens)
        assert counter.frame_count == need  # every call compiled, none fell back to eager
    torch._dynamo.reset()
    # Teeth: under the default limit the same run loses its last graph to eager.
    with torch._dynamo.config.patch(recompile_limit=8):
        counter = CompileCounter()
        model.set_looping(0)
        run_calls(torch.compile(model, backend=counter, dynamic=False), model, val, batch_tokens)
        assert counter.frame_count == 8
    torch._dynamo.reset()
