"""Each record technique on hand-made inputs: SmearGate at its init, hash indices, OrthoInit."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.model import GPT, from_flat
from pgolf.model.embeddings import BigramHash, SigmoidSmear, shift_right, token_smear

SMALL = dict(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)


def test_token_smear_is_the_identity_at_init():
    model = GPT(**from_flat(dict(**SMALL, smear_gate="token")))
    assert model.smear_gate.weight.abs().sum() == 0 and model.smear_lambda.item() == 0
    x = torch.randn(2, 5, 64)
    assert torch.equal(token_smear(x, model.smear_gate, model.smear_lambda), x)
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("smear")) == 65  # dim + 1


def test_sigmoid_smear_blends_with_the_previous_position():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    pre = SigmoidSmear(4, pre_norm=True)  # #65: g = sigmoid(3) on the current token
    g = 1 / (1 + math.exp(-3.0))
    expected = g * x + (1 - g) * shift_right(x)
    assert torch.allclose(pre(x), expected)
    assert torch.allclose(pre(x)[:, 0], g * x[:, 0])  # no previous token at t=0
    post = SigmoidSmear(4, pre_norm=False)  # 2026-03-20: gate 0 -> an even blend
    assert torch.allclose(post(x), 0.5 * x + 0.5 * shift_right(x))


def test_bigram_mul_hash_on_a_hand_made_sequence():
    bh = BigramHash(64, buckets=4096, dim=8, hash="mul", init="normal", scale_init=None)
    ids = torch.tensor([[5, 7, 1023, 0]])
    # (prev*92821 + cur) % 4096 with prev = 0 at t = 0
    assert bh.indices(ids).tolist() == [[5, (5 * 92821 + 7) % 4096, (7 * 92821 + 1023) % 4096, (1023 * 92821) % 4096]]
    assert bh.table.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert bh.proj.weight.abs().sum() == 0 and bh.proj._zero_init


def test_bigram_xor_hash_on_a_hand_made_sequence():
    bh = BigramHash(64, buckets=10240, dim=8, hash="xor", init="zeros", scale_init=0.05)
    ids = torch.tensor([[5, 7, 1023, 9]])
    # first position -> buckets-1; then (36313*cur ^ 27191*prev) % (buckets-1)
    want = [10239] + [((36313 * c) ^ (27191 * p)) % 10239 for p, c in [(5, 7), (7, 1023), (1023, 9)]]
    assert bh.indices(ids).tolist() == [want]
    assert want[1] == 5128  # (5, 7) -> 5128, as in the 2026-03-20 record (records_notes)
    assert bh.embed.weight.abs().sum() == 0 and bh.scale.item() == pytest.approx(0.05)
    assert bh(ids).abs().sum() == 0  # zero table: no signal until trained


def test_ortho_init_and_proj_scale():
    torch.manual_seed(0)
    model = GPT(**from_flat(dict(**SMALL, ortho_init=True, bigram_buckets=256, bigram_dim=32, bigram_hash="xor", bigram_init="zeros",
                bigram_scale_init=0.05, ortho_min_dim=32, ortho_proj_scale=True)))
    w = model.blocks[0].attn.c_q.weight
    assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    assert model.blocks[0].attn.proj.weight.abs().sum() == 0  # zero-init stays zero
    s = torch.linalg.svdvals(model.bigram.proj.weight)  # the xor records' proj: orthogonal * 1/sqrt(2L)
    assert torch.allclose(s, torch.full_like(s, 1 / math.sqrt(4)), atol=1e-5)
