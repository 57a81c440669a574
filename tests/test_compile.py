"""Every model preset and technique compiles with fullgraph=True: no graph breaks, no recompiles.

Two tiers, so that the check covers everything and stays cheap on a CPU:
- every preset (each conf/model and conf/experiment option) and each technique variant is
  traced by dynamo with fullgraph=True (any graph break raises) in training mode with QAT on,
  in eval mode, and through `hidden` (the sliding eval's entry);
- every preset then compiles a training step (forward and backward) with inductor on one
  canonical tiny shape, and must match eager. Presets with the same techniques have the same
  graph there and share inductor's cache, so only distinct graphs pay for a real compile.

Records shipped a late-QAT switch held as a Python attribute that torch.compile constant-folded,
so QAT never turned on. pgolf's switch is a buffer: the inductor test flips it after compiling
and requires the change to show without a recompile.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import pgolf
from pgolf.build import to_container
from pgolf.model import GPT, from_flat

CONF = Path(__file__).resolve().parent.parent / "conf"
# The frontier record presets (record_MMDD_*) share their parts with VARIANTS and the goldens cover
# each; the newest one (04-27 #1855, the best pgolf can run) stands for them in the trace test, on
# 3 layers with its loop, lanes and XSA moved to fit (an 11-layer inductor compile took 520 s).
FRONTIER = "experiment=record_0427_pr1855_lqer"
FRONTIER_SHAPE = dict(num_layers=3, num_loops=1, loop_start=1, loop_end=1, xsa_last_n=3, parallel_start_layer=2)
PRESETS = [f"model={p.stem}" for p in sorted((CONF / "model").glob("*.yaml"))] + [
    f"experiment={p.stem}" for p in sorted((CONF / "experiment").glob("*.yaml")) if not p.stem[7:8].isdigit()]
# One shape for every preset: the graph then depends on the techniques only.
TINY = dict(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, bigram_dim=32)
# Technique combinations no preset uses.
VARIANTS = {
    "untied": dict(tie_embeddings=False),
    "qat_rowmax_bigram_mul_post_norm": dict(qat_bits=5, qat_clip="rowmax", bigram_buckets=64, smear_gate="post_norm"),
    "qat_percentile_token_smear_xor": dict(qat_bits=6, smear_gate="token", bigram_buckets=64, bigram_hash="xor"),
    # The frontier parts (issue 13), one family per variant at the tiny shape.
    "xsa_partial_rope_ntk_ln_scale_leaky": dict(xsa_last_n=2, rope_dims=8, rope_train_seq_len=16, ln_scale=True,
                                                mlp_activation="leaky_relu2"),
    "ve_skip_gates": dict(ve_enabled=True, ve_dim=16, ve_layers=[1], skip_gates_enabled=True),
    "value_residual_lambda_ve": dict(value_residual="lambda", ve_enabled=True, ve_dim=16, ve_layers=[0]),
    "value_residual_sigmoid_loop": dict(value_residual="sigmoid", num_loops=1, loop_start=0, loop_end=0),
    "loop_gptj": dict(num_loops=2, loop_start=0, loop_end=0, parallel_start_layer=1, parallel_residual="gptj"),
    "loop_2x2_sparse_gate_window_smear": dict(num_loops=1, loop_start=0, loop_end=0, parallel_start_layer=1,
                                              sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                                              smear_gate="window"),
    "learned_2lane_virtual_untied_layer0_off": dict(num_loops=1, loop_start=1, loop_end=1, parallel_start_layer=1,
                                                    parallel_residual="learned_2lane", layer_index="virtual",
                                                    loop_untie_mlp=True, disable_layer0_attn=True),
    "lane_merge_attn_out_gate_q": dict(parallel_start_layer=1, parallel_residual="lane_merge",
                                       attn_out_gate_enabled=True, attn_out_gate_src="q"),
    "dense_gate_overtone_phase_init": dict(gated_attn_enabled=True, gated_attn_init_std=0.005, overtone_init=True,
                                           phase_resid_mix_init=True),
}
# Every frontier part at once (the done-when model), on 3 layers so loop, lanes and VE fit.
ALL_ON = dict(num_layers=3, xsa_last_n=3, rope_dims=8, rope_train_seq_len=16, ln_scale=True,
              mlp_activation="leaky_relu2", skip_gates_enabled=True, ve_enabled=True, ve_dim=16, ve_layers=[2],
              num_loops=1, loop_start=1, loop_end=1, parallel_start_layer=2, sparse_attn_gate_enabled=True,
              smear_gate="window", qat_bits=6, value_residual="lambda")


def tiny_model(preset: str | None = None, **options) -> GPT:
    """The preset's model (its technique options) at the canonical tiny shape, random weights."""
    kwargs = {}
    if preset is not None:
        kwargs = {k: v for k, v in to_container(pgolf.compose([preset]).model).items() if k != "_target_"}
    kwargs = from_flat({**kwargs, **TINY, **(FRONTIER_SHAPE if preset == FRONTIER else {}), **options})
    if kwargs.get("embeddings", {}).get("bigram_buckets"):
        kwargs["embeddings"]["bigram_buckets"] = 64
    torch.manual_seed(0)
    model = GPT(**kwargs)
    with torch.no_grad():  # no zero-init matrices: QAT must have something to round
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)


@pytest.mark.parametrize("name", [*PRESETS, FRONTIER, *sorted(VARIANTS)])
def test_traces_without_graph_breaks(name):
    torch._dynamo.reset()
    model = tiny_model(name) if name in (*PRESETS, FRONTIER) else tiny_model(**VARIANTS[name])
    model.set_qat(True)
    x, y = batch()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")  # a break raises
    loss = compiled(x, y)
    loss.backward()
    assert torch.allclose(loss, model(x, y), atol=1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x, y), model(x, y), atol=1e-5)
        h = torch.compile(model.hidden, fullgraph=True, dynamic=False, backend="eager")(x)
    assert h.shape == (2, 32, TINY["model_dim"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_under_inductor(preset):
    torch._dynamo.reset()
    model = tiny_model(preset)
    eager = copy.deepcopy(model)
    has_qat = bool(model.blocks[0].attn.c_q.qat_bits)
    model.set_qat(True)
    eager.set_qat(True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x, y = batch(1)
    loss, want = compiled(x, y), eager(x, y)
    loss.backward()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-4)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name
    if not has_qat:
        return
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.set_qat(False)  # flipped after compilation
        eager.set_qat(False)
        off = compiled(x, y).item()
        assert off == pytest.approx(eager(x, y).item(), abs=1e-4)
        assert abs(off - loss.item()) > 1e-3, "QAT switch had no effect in the compiled model"
    model.eval()  # eval scores the float weights, as the records do
    assert model(x, y).item() == pytest.approx(off, abs=1e-5)


def test_qat_gradient_is_straight_through():
    from pgolf.quant import fake_quantize

    torch.manual_seed(0)
    w = torch.randn(64, 96).requires_grad_(True)
    q = fake_quantize(w, bits=6, clip="percentile")
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # d fake_quant / d w = identity
    assert not torch.equal(q, w)


@pytest.mark.slow
def test_all_parts_train_under_inductor_and_the_looping_switch_recompiles_once():
    """The model with every frontier part compiles (inductor), its training step equals eager, and
    depth recurrence switched after compilation changes the loss with exactly one more graph:
    flipping it back and forth over later steps compiles nothing new."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_model(**ALL_ON)
    eager = copy.deepcopy(model)
    for m in (model, eager):
        m.set_qat(True)
        m.set_looping(0)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    x, y = batch(1)
    loss, want = compiled(x, y), eager(x, y)
    loss.backward()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-4)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is None:  # layer 0's vr_lambda: stored, never used (as the records)
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name
    assert counter.frame_count == 1
    model.set_looping(1)
    eager.set_looping(1)
    looped = compiled(x, y).item()
    assert looped == pytest.approx(eager(x, y).item(), abs=1e-4)
    assert abs(looped - loss.item()) > 1e-3, "looping had no effect in the compiled model"
    assert counter.frame_count == 2  # one deliberate recompile
    for passes in (0, 1, 0, 1):
        model.set_looping(passes)
        compiled(x, y)
    assert counter.frame_count == 2  # no recompile per step


@pytest.mark.slow
def test_pr1204_family_trains_under_inductor_and_untied_mlps_copy_at_the_switch():
    """#1204's parts (learned two-lane routing, one block per virtual layer, untied repeat MLPs,
    layer-0 attention off): an inductor training step equals eager; switching looping on after
    compilation copies the shared MLPs into the repeat MLPs and recompiles once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_model(**VARIANTS["learned_2lane_virtual_untied_layer0_off"])
    model.set_looping(0)
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    x, y = batch(1)
    loss, want = compiled(x, y), eager(x, y)
    loss.backward()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-4)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), name
    model.set_looping(1)
    eager.set_looping(1)
    assert torch.equal(model.repeat_mlp[0].fc.weight, model.blocks[1].mlp.fc.weight)
    looped = compiled(x, y).item()
    assert looped == pytest.approx(eager(x, y).item(), abs=1e-4)
    assert abs(looped - loss.item()) > 1e-3 and counter.frame_count == 2
