"""Muon, the optimizer split and the schedule."""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT
from pgolf.optim import Optimizers, zeropower_via_newtonschulz5
from pgolf.schedule import SWA, Schedule

TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_orthogonalizes(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
    G = U @ torch.diag(torch.linspace(0.2, 1.0, k)) @ V.T  # condition number 5, like a momentum update
    X = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    # The quintic iteration pushes singular values into roughly [0.7, 1.2], not exactly 1.
    assert s.min() > 0.5 and s.max() < 1.3
    bf16 = zeropower_via_newtonschulz5(G, steps=5)
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - X).abs().max() < 0.1


def test_optimizer_split_follows_the_baseline():
    model = GPT(**TINY)
    opt = Optimizers(model)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in muon) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2 and "resid_mix" not in n)
    assert [p for g in opt.token.param_groups for p in g["params"]] == [model.tok_emb.weight]
    scalars = {names[id(p)] for g in opt.scalar.param_groups for p in g["params"]}
    assert "skip_weights" in scalars and "blocks.0.resid_mix" in scalars and "blocks.1.attn.q_gain" in scalars
    assert len(opt.all) == 3  # tied: no head optimizer
    assert len(Optimizers(GPT(**TINY, tie_embeddings=False)).all) == 4


def test_muon_step_scale_correction_and_weight_decay():
    torch.manual_seed(0)
    model = GPT(**TINY)
    p = model.blocks[0].mlp.fc.weight  # (64, 32): tall, scale sqrt(2)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt = Optimizers(model, matrix_lr=0.1, muon_weight_decay=0.5, muon_momentum_warmup_steps=0)
    for q in model.parameters():
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    opt.step(0, 1.0)
    g = p.grad if p.grad is not None else None
    assert g is None  # zero_grad(set_to_none) after the step
    update = (before * (1 - 0.5 * 0.1) - p.detach()) / 0.1
    s = torch.linalg.svdvals(update / 2 ** 0.5)
    assert s.max() < 1.3 and s.min() > 0.5


def test_momentum_warmup():
    opt = Optimizers(GPT(**TINY), muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert opt.momentum_at(0) == pytest.approx(0.85)
    assert opt.momentum_at(250) == pytest.approx(0.90)
    assert opt.momentum_at(10_000) == pytest.approx(0.95)


def test_lr_schedule_by_iterations_and_by_wallclock():
    s = Schedule(iterations=100, warmdown_iters=20, max_wallclock_seconds=0)
    assert s.lr_mul(0, 0) == 1.0 and s.lr_mul(79, 0) == 1.0
    assert s.lr_mul(80, 0) == pytest.approx(1.0) and s.lr_mul(90, 0) == pytest.approx(0.5)
    w = Schedule(warmdown_iters=100, max_wallclock_seconds=10.0)
    # 100 steps in 5 s -> 50 ms/step; warmdown is the last 100 steps' time = 5 s.
    assert w.lr_mul(100, 5000.0) == pytest.approx(1.0)
    assert w.lr_mul(150, 7500.0) == pytest.approx(0.5)
    assert w.lr_mul(200, 10000.0) == 0.0


def test_swa_averages_snapshots():
    model = GPT(**TINY)
    swa = SWA()
    values = [1.0, 2.0, 6.0]
    for v in values:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(v)
        swa.add(model)
    avg = swa.average(model.state_dict())
    assert all(torch.allclose(t, torch.full_like(t, 3.0)) for t in avg.values())
    assert Schedule(swa_every=50, swa_start_frac=0.4).swa_due(100, 0.3)
    assert not Schedule(swa_every=50, swa_start_frac=0.4).swa_due(100, 0.5)
    assert not Schedule(swa_every=50, swa_start_frac=0.4).swa_due(101, 0.3)
