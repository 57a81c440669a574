"""The model equals the challenge's baseline GPT: same keys and shapes, same loss on the same weights.

Golden losses were computed with the GPT class of openai/parameter-golf `train_gpt.py`
(commit 4908dc46f) on the weights and tokens that `seeded_weights` / `seeded_tokens`
produce (fp32, CPU, torch 2.13). Set PGOLF_REFERENCE_REPO to a checkout of that repository
to also compare live against its code.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from golden import seeded_tokens, seeded_weights

from pgolf.errors import PgolfError
from pgolf.model import GPT, from_flat

BASELINE = dict(vocab_size=1024, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=2,
                tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                qk_gain_init=1.5)
UNTIED_SMALL = dict(BASELINE, tie_embeddings=False, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=3)
GOLDEN_LOSS = {"baseline": (BASELINE, 7.443546295166016), "untied_small": (UNTIED_SMALL, 7.379240036010742)}

# The baseline's state_dict for block 0 and the top level (blocks 1..8 repeat block 0).
BLOCK_KEYS = {
    "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512), "attn.q_gain": (8,),
    "attn.c_q.weight": (512, 512), "attn.c_k.weight": (256, 512), "attn.c_v.weight": (256, 512),
    "attn.proj.weight": (512, 512), "mlp.fc.weight": (1024, 512), "mlp.proj.weight": (512, 1024),
}
TOP_KEYS = {"skip_weights": (4, 512), "tok_emb.weight": (1024, 512)}


def test_state_dict_keys_and_shapes_match_baseline():
    sd = GPT(**from_flat(BASELINE)).state_dict()
    expected = dict(TOP_KEYS)
    for i in range(9):
        expected.update({f"blocks.{i}.{k}": v for k, v in BLOCK_KEYS.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("case", sorted(GOLDEN_LOSS))
def test_loss_equals_reference_on_same_weights(case):
    kwargs, golden = GOLDEN_LOSS[case]
    model = GPT(**from_flat(kwargs))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes), strict=True)
    x, y = seeded_tokens()
    with torch.no_grad():
        loss = model(x, y).item()
    assert abs(loss - golden) < 1e-5


def test_forward_logits_are_softcapped_and_consistent_with_loss():
    torch.manual_seed(0)
    model = GPT(**from_flat(dict(UNTIED_SMALL, logit_softcap=2.0)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x, y = seeded_tokens()
    with torch.no_grad():
        logits = model.forward_logits(x)
        assert logits.shape == (2, 128, 1024)
        assert logits.abs().max() <= 2.0
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), y.reshape(-1))
        assert abs(ce.item() - model(x, y).item()) < 1e-5


def test_zero_init_output_projections_and_tied_init_std():
    torch.manual_seed(0)
    model = GPT(**from_flat(BASELINE))
    for i in range(9):
        assert model.blocks[i].attn.proj.weight.abs().sum() == 0
        assert model.blocks[i].mlp.proj.weight.abs().sum() == 0
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 2e-4


@pytest.mark.parametrize("kwargs,field", [
    (dict(model_dim=500, num_heads=8), "model.model_dim=500 is not divisible by model.num_heads=8"),
    (dict(num_heads=8, num_kv_heads=3), "model.num_heads=8 is not divisible by model.num_kv_heads=3"),
    (dict(model_dim=24, num_heads=8, num_kv_heads=4), "head_dim"),
    (dict(logit_softcap=0.0), "model.head.logit_softcap=0.0"),
])
def test_inconsistent_shapes_fail_with_one_line(kwargs, field):
    with pytest.raises(PgolfError) as e:
        GPT(**from_flat(dict(BASELINE, **kwargs)))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_mlp_hidden_overrides_mult_and_fractional_mult():
    assert GPT(**from_flat(dict(UNTIED_SMALL, mlp_mult=3.0))).blocks[0].mlp.fc.weight.shape == (768, 256)
    assert GPT(**from_flat(dict(UNTIED_SMALL, mlp_mult=2.5))).blocks[0].mlp.fc.weight.shape == (640, 256)
    assert GPT(**from_flat(dict(UNTIED_SMALL, mlp_hidden=344))).blocks[0].mlp.fc.weight.shape == (344, 256)


def _reference_module():
    repo = os.environ.get("PGOLF_REFERENCE_REPO")
    if not repo:
        pytest.skip("set PGOLF_REFERENCE_REPO to an openai/parameter-golf checkout for the live comparison")
    spec = importlib.util.spec_from_file_location("reference_train_gpt", Path(repo) / "train_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", sorted(GOLDEN_LOSS))
def test_live_reference_loads_both_ways_and_agrees(case):
    ref = _reference_module()
    kwargs, _ = GOLDEN_LOSS[case]
    theirs, ours = ref.GPT(**kwargs), GPT(**from_flat(kwargs))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ours.load_state_dict(seeded_weights(shapes, seed=3), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, y = seeded_tokens(4)
    with torch.no_grad():
        assert abs(theirs(x, y).item() - ours(x, y).item()) < 1e-5
