"""AsymLogit (pgolf/model/head.py; #1923 -> #2135): an identity at init, equal to #2135's own head
on identical weights with the caps moved off 30, trained only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden import seeded_tokens, seeded_weights
from pgolf.errors import PgolfError
from pgolf.model import GPT, check_model, from_flat
from pgolf.model.head import asym_softcap

GOLDENS = Path(__file__).parent / "goldens"
HEAD = json.loads((GOLDENS / "asym_logit_2135.json").read_text())
MODEL = json.loads((GOLDENS / "asym_logit_2135_model.json").read_text())
# #2135's GPT at refload's small shape in pgolf's options: the #1855 architecture (11 -> 7 layers, loop 1-3
# twice, two lanes from 5, partial RoPE 16, XSA all, sparse gate .5, SmearGate) with the BOS mask off
# (SMEAR_GATE_BOS_FIX=0) and AsymLogit on.
PR2135_SMALL = dict(
    vocab_size=1024, num_layers=7, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=4.0, tie_embeddings=True,
    tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0, qk_gain_init=5.0, xsa_last_n=7, rope_dims=16,
    ln_scale=True, skip_gates_enabled=True, num_loops=2, loop_start=1, loop_end=3, gate_window=12,
    sparse_attn_gate_enabled=True, sparse_attn_gate_init_std=0.0, sparse_attn_gate_scale=0.5,
    parallel_final_lane="mean", rope_train_seq_len=0, mlp_activation="leaky_relu2", negative_slope=0.5,
    parallel_start_layer=5, parallel_residual="routed_2x2", smear_gate="window", smear_bos_mask=False,
    asym_logit_rescale=True)
TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)


def test_head_equals_2135():
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(11)) * 40
    for case in HEAD["cases"]:
        out = asym_softcap(z, torch.tensor(case["softcap_pos"]), torch.tensor(case["softcap_neg"]))
        assert torch.allclose(out.flatten(), torch.tensor(case["out"]), rtol=1e-6, atol=1e-5)


def test_model_logits_equal_2135_on_identical_weights():
    torch.manual_seed(0)
    model = GPT(**from_flat(PR2135_SMALL)).eval()
    w = seeded_weights({k: tuple(v) for k, v in MODEL["state_dict_small"].items()})  # caps included, as the golden
    w["tok_emb.weight"] = w["tok_emb.weight"] * 60  # the golden's logits reach the caps
    w["softcap_pos"], w["softcap_neg"] = torch.tensor(MODEL["softcap_pos"]), torch.tensor(MODEL["softcap_neg"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == MODEL["state_dict_small"]
    model.load_state_dict(w, strict=True)
    x, _ = seeded_tokens()
    with torch.no_grad():
        logits = model.forward_logits(x).double()
        assert float(logits.abs().sum()) == pytest.approx(MODEL["logits_abs_sum"], rel=1e-6)
        assert float(logits.sum()) == pytest.approx(MODEL["logits_sum"], rel=1e-5)
        assert torch.allclose(logits[0, 5, :16].float(), torch.tensor(MODEL["logits_first_row"]), atol=1e-4)
        model.softcap_pos.fill_(30.0), model.softcap_neg.fill_(30.0)
        assert float(model.forward_logits(x).double().abs().sum()) == pytest.approx(MODEL["logits30_abs_sum"], rel=1e-6)


def test_identity_at_init_and_frozen_by_default():
    torch.manual_seed(0)
    plain = GPT(**from_flat(TINY))
    torch.manual_seed(0)
    asym = GPT(**from_flat(dict(**TINY, asym_logit_rescale=True)))
    x = torch.randint(0, 64, (2, 16))
    asym.load_state_dict({**plain.state_dict(), "softcap_pos": asym.softcap_pos, "softcap_neg": asym.softcap_neg})
    with torch.no_grad():
        for p in (plain.tok_emb.weight, asym.tok_emb.weight):
            p.mul_(500)  # logits far past the cap
        assert torch.equal(plain.forward_logits(x), asym.forward_logits(x))
    loss = asym(x, x)
    loss.backward()
    assert asym.softcap_pos.grad is None and not asym.softcap_pos.requires_grad  # the records: never updated


def test_trainable_caps_get_gradients():
    torch.manual_seed(0)
    model = GPT(**from_flat(dict(**TINY, asym_logit_rescale=True, asym_logit_trainable=True)))
    with torch.no_grad():
        model.tok_emb.weight.mul_(500)
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    assert float(model.softcap_pos.grad.abs()) > 0 and float(model.softcap_neg.grad.abs()) > 0
    assert ("softcap_pos", model.softcap_pos) in model.optimizer_groups()["scalar"]


def test_trainable_without_rescale_is_one_line():
    with pytest.raises(PgolfError, match="asym_logit_trainable"):
        check_model(head=dict(asym_logit_trainable=True))
