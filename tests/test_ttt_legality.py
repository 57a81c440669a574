"""Legality of the TTT variants by construction and by test (issue 20 items 2 and 5): score before
update and each target once, over random documents, chunk sizes, batch sizes and world sizes;
causality by perturbation; no optimizer step without a scored update before it; 2 gloo ranks
equal 1 rank."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golden import seeded_luts
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pgolf.errors import PgolfError
from pgolf.model import GPT, from_flat
from pgolf.ttt.chunked import ChunkedSGD
from pgolf.ttt.common import TTTRuntime
from pgolf.ttt.lora import LoRATTT, find_docs
from pgolf.ttt.phased import PhasedTTT
from pgolf.ttt.scorer import Scorer, check_ledger

V = 64


def tiny(seed: int = 0) -> GPT:
    """Two layers looped once (three virtual slots), so adapters are per virtual slot."""
    torch.manual_seed(seed)
    m = GPT(**from_flat(dict(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, num_loops=1,
            loop_start=1, loop_end=1, rope_base=10000.0)))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def docs_stream(lens: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(2, V, (sum(lens),), generator=g)
    at = 0
    for n in lens:
        s[at] = 1
        at += n
    return s


def luts():
    return seeded_luts(V)


def rt(rank: int = 0, world: int = 1) -> TTTRuntime:
    return TTTRuntime(rank=rank, world_size=world, log=lambda s: None)


LORA = dict(ttt_lora_rank=2, ttt_lora_lr=0.01, ttt_batch_size=2)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(2, 40), min_size=1, max_size=7), chunk=st.integers(1, 9), batch=st.integers(1, 4),
       window=st.integers(9, 24), world=st.integers(1, 3), seed=st.integers(0, 1000))
def test_lora_scores_each_target_once_before_any_update_on_any_world(lens, chunk, batch, window, world, seed):
    """Ranks simulated one after another (the LoRA variant needs no collective): each rank's ledger is
    score-first, the ranks' scored sets partition the targets, and the sums equal one rank's."""
    stream = docs_stream(lens, seed)
    spec = LoRATTT(ttt_lora_rank=2, ttt_lora_lr=0.01, ttt_chunk_size=chunk, ttt_batch_size=batch,
                   ttt_eval_seq_len=window)
    single = Scorer(stream, luts())
    torch.manual_seed(seed)
    spec.run(tiny(), single, rt(), seq_len=window)
    assert check_ledger(single.ledger, single.num_targets) is None
    counts = torch.zeros(single.num_targets, dtype=torch.int64)
    total = torch.zeros(3, dtype=torch.float64)
    for r in range(world):
        sc = Scorer(stream, luts())
        torch.manual_seed(seed)
        spec.run(tiny(), sc, rt(r, world), seq_len=window)
        assert check_ledger(sc.ledger, sc.num_targets, expect_all=False) is None
        counts += sc.committed.long()
        total += sc.sums
    assert bool((counts == 1).all())
    assert torch.allclose(total, single.sums, rtol=1e-9, atol=0)


@pytest.mark.parametrize("variant", ["chunked", "lora"])
def test_perturbing_a_later_token_never_changes_an_earlier_committed_loss(variant):
    lens = [37, 12, 50, 25]
    stream = docs_stream(lens, 3)
    k = 70  # a non-BOS token inside the third document
    assert stream[k] != 1
    alt = stream.clone()
    alt[k] = (stream[k] + 7) % (V - 2) + 2
    losses = []
    for s in (stream, alt):
        sc = Scorer(s, luts(), keep_losses=True)
        torch.manual_seed(0)
        if variant == "chunked":
            ChunkedSGD(ttt_lr=0.05, ttt_epochs=2, ttt_chunk_tokens=32, ttt_batch_seqs=1).run(
                tiny(), sc, rt(), seq_len=16, stride=8)
        else:
            LoRATTT(ttt_chunk_size=5, ttt_eval_seq_len=12, **LORA).run(tiny(), sc, rt(), seq_len=12)
        losses.append(sc.losses)
    same = losses[0] == losses[1]
    # target j is stream[j + 1]: targets before k - 1 never see token k
    assert bool(same[:k - 1].all())
    changed = torch.nonzero(~same).squeeze(1)
    assert changed.numel() and int(changed.min()) == k - 1
    if variant == "lora":  # documents are independent: only the perturbed document moves
        last_target = sum(lens[:3]) - 1  # the next document's BOS is the perturbed document's last target
        assert int(changed.max()) <= last_target


@pytest.mark.parametrize("variant", ["chunked", "lora", "phased"])
def test_every_optimizer_step_follows_a_scored_update(variant):
    """A global optimizer hook: each step of a TTT optimizer comes right after the Scorer accepted an
    update over already-scored targets (the ledger's last event), so no step can train on unscored
    validation tokens, and nothing trains before the first score (no warm-up on validation tokens)."""
    stream = docs_stream([30, 8, 41, 19, 26, 12], 5)
    sc = Scorer(stream, luts())
    seen = []

    def pre_step(opt, args, kwargs):
        seen.append(sc.ledger[-1].kind if sc.ledger else None)

    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        torch.manual_seed(0)
        if variant == "chunked":
            ChunkedSGD(ttt_epochs=1, ttt_chunk_tokens=40, ttt_batch_seqs=2).run(tiny(), sc, rt(), seq_len=16, stride=8)
        elif variant == "lora":  # with #2014's short-document chunks and #1953's mask
            LoRATTT(ttt_chunk_size=6, ttt_short_chunk_steps="20:2,35:4", ttt_mask="no_qv", **LORA).run(
                tiny(), sc, rt(), seq_len=16)
        else:  # with #1767's alpha and warm-start A
            PhasedTTT(ttt_chunk_size=6, phased_ttt_prefix_docs=4, phased_ttt_num_phases=2, ttt_lora_alpha=4.0,
                      ttt_warm_start_a=True, global_ttt_chunk_tokens=32, global_ttt_batch_seqs=1, **LORA).run(
                tiny(), sc, rt(), seq_len=8)
    finally:
        handle.remove()
    assert seen and all(kind == "update" for kind in seen)
    assert sc.ledger[0].kind == "score"
    assert len(seen) == sc.num_updates
    assert check_ledger(sc.ledger, sc.num_targets) is None


def test_short_document_chunks_and_masks():
    spec = LoRATTT(ttt_chunk_size=48, ttt_short_chunk_steps="2000:24,256:8", ttt_mask="no_qv", ttt_o_lora=False)
    assert [spec.chunk_for(n) for n in (10, 256, 257, 2000, 2001)] == [8, 8, 24, 24, 48]
    assert spec.kinds() == ("k", "mlp")
    adapters = spec.new_adapters(tiny(), 3)
    assert set(adapters.loras) == {"k", "mlp"} and len(adapters.loras["k"]) == 3  # 3 virtual slots
    adapters.remove()


def test_documents_split_at_bos_cover_every_target():
    s = torch.tensor([5, 6, 1, 7, 8, 9, 1, 4, 1, 3])
    docs = find_docs(s, 1)
    assert docs == [(0, 3), (2, 5), (6, 3), (8, 2)]
    covered = sorted(j for start, n in docs for j in range(start, start + n - 1))
    assert covered == list(range(s.numel() - 1))


@pytest.mark.parametrize("bad, match", [
    (dict(ttt_mask="no_x"), "ttt_mask"),
    (dict(ttt_short_chunk_steps="256-8"), "LEN:CHUNK"),
    (dict(ttt_chunk_size=64, ttt_eval_seq_len=32), "shorter than a chunk"),
])
def test_bad_lora_options_are_one_line_errors(bad, match):
    with pytest.raises(PgolfError, match=match) as e:
        LoRATTT(**bad).check(128)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ 2 gloo ranks = 1 rank
DTYPES = (torch.float32, torch.float64)


def _worker(rank: int, world: int, port: int, variants: tuple[str, ...], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for v in variants:
            for dtype in DTYPES:
                out[(v, dtype, rank)] = run_variant(v, rank, world, dtype)
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        gc.collect()
        dist.destroy_process_group()


def run_variant(variant: str, rank: int, world: int, dtype: torch.dtype = torch.float32) -> dict:
    """One variant on one rank: its score, the learning rate and updated targets of every
    full-model SGD step and the variant's log (document split, chunks, phase boundaries)."""
    stream = docs_stream([30, 8, 41, 19, 26, 12, 33], 9)
    sc = Scorer(stream, luts())
    logs, lrs, updates = [], [], []

    def pre_step(opt, args, kwargs):
        if isinstance(opt, torch.optim.SGD):  # a full-model step: its lr and the update it follows
            lrs.append(opt.param_groups[0]["lr"])
            updates.append(sc.ledger[-1].positions().tolist())

    run = TTTRuntime(rank=rank, world_size=world, dtype=dtype, log=logs.append)
    handle = register_optimizer_step_pre_hook(pre_step)
    torch.manual_seed(0)
    try:
        if variant == "chunked":
            ChunkedSGD(ttt_lr=0.05, ttt_epochs=1, ttt_chunk_tokens=48, ttt_batch_seqs=3).run(
                tiny().to(dtype), sc, run, seq_len=16, stride=8)
        elif variant == "lora":
            LoRATTT(ttt_chunk_size=6, **LORA).run(tiny().to(dtype), sc, run, seq_len=16)
        else:
            # one row per global step: #1626 packs a rank's rows into one row under the document mask, so a
            # document cut by a row boundary attends across it only within a rank (world-size dependent)
            PhasedTTT(ttt_chunk_size=6, phased_ttt_prefix_docs=4, phased_ttt_num_phases=2, global_ttt_lr=0.05,
                      global_ttt_chunk_tokens=32, global_ttt_batch_seqs=1, **LORA).run(
                tiny().to(dtype), sc, run, seq_len=8)
    finally:
        handle.remove()
    return dict(result=sc.result(), updates=updates, lrs=lrs, logs=logs)


def test_two_gloo_ranks_equal_one_rank():
    """Nothing but float summation order depends on the world size. In float64 (the model cast
    with .double()), 2 ranks give one rank's score within 1e-9 for every variant; in float32,
    chunked and phased all-reduce gradient sums whose float32 order differs from one rank's
    backward (1e-6; LoRA needs no collective: 1e-9). In both: the full-model SGD steps see the
    same learning rates (cosine over the same chunks), each step's updates of the two ranks
    together are one rank's (the same rows, documents and chunk order), and every rank logs the
    one-rank chunks, documents and phase boundaries."""
    variants = ("lora", "chunked", "phased")
    one = {(v, d): run_variant(v, 0, 1, d) for v in variants for d in DTYPES}
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, 29500 + os.getpid() % 1000, variants, out), nprocs=2, join=True)
        two = dict(out)
    for (v, dtype), ref in one.items():
        r0, r1 = two[(v, dtype, 0)], two[(v, dtype, 1)]
        assert r0["result"] == r1["result"]
        tol = 1e-6 if dtype == torch.float32 and v != "lora" else 1e-9
        assert r0["result"] == pytest.approx(ref["result"], rel=tol, abs=0), (v, dtype)
        assert r0["logs"] == r1["logs"] == ref["logs"]
        if v != "lora":  # collective steps: the same steps on every rank
            assert r0["lrs"] == r1["lrs"] == ref["lrs"] and ref["lrs"]
            assert len(r0["updates"]) == len(r1["updates"]) == len(ref["updates"])
            for a, b, u in zip(r0["updates"], r1["updates"], ref["updates"]):
                assert sorted(a + b) == sorted(u) and not set(a) & set(b)
    assert one[("phased", torch.float64)]["result"] != one[("phased", torch.float32)]["result"]  # the cast took effect


def test_chunked_without_updates_is_the_sliding_eval():
    """With no epochs the chunked variant scores exactly what pgolf.evaluate.eval_sliding scores: the
    Scorer's arithmetic (full log-softmax, bytes, float64 sums) is the evals' arithmetic."""
    from pgolf.evaluate import eval_sliding

    stream, model = docs_stream([30, 8, 41, 19, 26, 12, 33], 4), tiny()
    sc = Scorer(stream, luts())
    ChunkedSGD(ttt_epochs=0, ttt_chunk_tokens=40).run(model, sc, rt(), seq_len=24, stride=8, batch_seqs=5)
    ref = eval_sliding(model, stream, luts(), seq_len=24, stride=8, batch_seqs=4, rank=0, world_size=1,
                       device=torch.device("cpu"), dtype=torch.float32)
    assert sc.result() == pytest.approx(ref, rel=1e-9)


def test_the_ttt_forward_with_adapters_traces_fullgraph():
    """Issue 20 item 6 (a probe, not a compiled eval yet): the LoRA TTT forward, adapters hooked per
    virtual slot with their Python call counters, traces with fullgraph=True (dynamo inlines the
    hooks), equals eager, and a reset of the same adapters (a new draw of A) reuses the graph; a new
    DocAdapters object (new hooks) compiles a new one."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, spec = tiny(), LoRATTT(**LORA)
    adapters = spec.new_adapters(model, 2)
    x = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(0))

    def forward(ids):
        h = model.hidden(ids)
        return model.logits(h, adapters.head_delta(h))

    eager = forward(x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    try:
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
        adapters.reset()
        compiled(x)
        assert counters["stats"]["unique_graphs"] == 1
        adapters.remove()
        adapters = spec.new_adapters(model, 2)
        compiled(x)
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        adapters.remove()
        torch._dynamo.reset()
