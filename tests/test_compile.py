"""Every technique compiles with fullgraph=True (no graph breaks), and QAT's switch survives compile.

Records shipped a late-QAT switch held as a Python attribute that torch.compile constant-folded,
so QAT never turned on. pgolf's switch is a buffer; these tests compile the model first and
flip the switch afterwards.
"""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT

SMALL = dict(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3.0)
VARIANTS = {
    "baseline": {},
    "smeargate_65": dict(smear_gate="pre_norm", bigram_buckets=256, bigram_dim=32, bigram_hash="mul", ortho_init=True,
                         qat_bits=6, qat_clip="percentile"),
    "int5_0320": dict(smear_gate="post_norm", bigram_buckets=256, bigram_dim=32, bigram_hash="xor",
                      bigram_init="zeros", bigram_scale_init=0.05, ortho_init=True, ortho_min_dim=64,
                      ortho_proj_scale=True),
    "qat_smear_192": dict(smear_gate="token", ortho_init=True, qat_bits=6, qat_clip="rowmax_floor"),
    "untied": dict(tie_embeddings=False),
}


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fullgraph_compile_has_no_graph_breaks(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(**SMALL, **VARIANTS[name])
    model.set_qat(True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    x, y = batch()
    loss = compiled(x, y)  # fullgraph=True raises on any graph break
    loss.backward()
    assert torch.allclose(loss, model(x, y), atol=1e-5)
    with torch.no_grad():
        h = torch.compile(model.hidden, fullgraph=True, backend="aot_eager")(x)
    assert h.shape == (2, 32, 64)


@pytest.mark.slow
def test_qat_switch_takes_effect_after_inductor_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(**SMALL, qat_bits=6, qat_clip="percentile")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.train()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x, y = batch(1)
    off = compiled(x, y).item()
    assert off == pytest.approx(model(x, y).item(), abs=1e-4)
    model.set_qat(True)  # flipped after compilation
    on = compiled(x, y).item()
    assert on == pytest.approx(model(x, y).item(), abs=1e-4)
    assert abs(on - off) > 1e-3, "QAT switch had no effect in the compiled model"
    model.eval()  # eval scores the float weights, as the records do
    assert model(x, y).item() == pytest.approx(off, abs=1e-5)


def test_qat_gradient_is_straight_through():
    torch.manual_seed(0)
    model = GPT(**SMALL, qat_bits=6)
    x, y = batch(2)
    model.set_qat(False)
    model(x, y).backward()
    lin = model.blocks[0].attn.c_q
    from pgolf.quant import fake_quantize

    w = lin.weight.detach().clone().requires_grad_(True)
    q = fake_quantize(w, bits=6, clip="percentile")
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # d fake_quant / d w = identity
