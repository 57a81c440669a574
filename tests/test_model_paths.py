"""One forward path: every model option gives the same numbers through every path.

The records kept a second copy of their block for test-time training and lost a gate on the way
(2026-04-23 #1787: post-TTT bpb 1.908). pgolf has one `hidden`; this test runs each option through
the training forward, the standard eval, the sliding eval and an adapter attached from outside
(LoRA with B = 0, so identical at attach; live once B moves), on the same weights.
"""

from __future__ import annotations

import math

import pytest
import sentencepiece as spm
import torch

from pgolf.errors import PgolfError
from pgolf.evaluate import build_byte_luts, eval_sliding, eval_standard
from pgolf.model import GPT, from_flat
from pgolf.model.adapters import attach_lora

CPU = dict(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
BASE = dict(vocab_size=300, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
OPTIONS = {
    "baseline": {},
    "xsa": dict(xsa_last_n=2),
    "partial_rope_ntk": dict(rope_dims=8, rope_train_seq_len=16),
    "ln_scale": dict(ln_scale=True),
    "leaky_relu2": dict(mlp_activation="leaky_relu2"),
    "skip_gates": dict(skip_gates_enabled=True),
    "value_embeddings": dict(ve_enabled=True, ve_dim=16, ve_layers=[1, 2]),
    "value_residual_lambda": dict(value_residual="lambda", ve_enabled=True, ve_dim=16, ve_layers=[0, 2]),
    "value_residual_sigmoid": dict(value_residual="sigmoid", num_loops=1, loop_start=0, loop_end=1),
    "loop": dict(num_loops=2, loop_start=1, loop_end=1),
    "gptj": dict(parallel_start_layer=2, parallel_residual="gptj"),
    "lane_merge": dict(parallel_start_layer=2, parallel_residual="lane_merge"),
    "routed_2x2": dict(parallel_start_layer=2),
    "learned_2lane": dict(parallel_start_layer=2, parallel_residual="learned_2lane"),
    "layer0_attn_off": dict(disable_layer0_attn=True),
    "pr1204_like": dict(num_loops=1, loop_start=1, loop_end=1, layer_index="virtual", loop_untie_mlp=True,
                        disable_layer0_attn=True, parallel_start_layer=2, parallel_residual="learned_2lane",
                        xsa_last_n=3, ln_scale=True, skip_gates_enabled=True, ve_enabled=True, ve_dim=16, ve_layers=[3]),
    "attn_out_gate": dict(attn_out_gate_enabled=True, attn_out_gate_src="q"),
    "dense_gate": dict(gated_attn_enabled=True),
    "sparse_gate": dict(sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5),
    "window_smear": dict(smear_gate="window"),
    "overtone_phase_init": dict(overtone_init=True, phase_resid_mix_init=True),
    "doc_attention": dict(doc_attention=True, smear_gate="window", smear_bos_mask=False),
    "all_on": dict(xsa_last_n=3, rope_dims=8, rope_train_seq_len=16, ln_scale=True, mlp_activation="leaky_relu2",
                   skip_gates_enabled=True, ve_enabled=True, ve_dim=16, ve_layers=[2], num_loops=1, loop_start=1,
                   loop_end=1, parallel_start_layer=2, sparse_attn_gate_enabled=True, smear_gate="window",
                   value_residual="lambda"),
}


@pytest.fixture(scope="module")
def luts(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    text = ["the cat sat on the mat", "the dog ate the bone", "a bat and a cat"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(d / "m"), model_type="bpe", vocab_size=300,
        character_coverage=1.0, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False)
    return build_byte_luts(spm.SentencePieceProcessor(model_file=str(d / "m.model")), vocab_size=300)


def model_with(options: dict) -> GPT:
    torch.manual_seed(0)
    model = GPT(**from_flat(dict(**BASE, **options)))
    with torch.no_grad():  # every parameter non-trivial, so no part hides behind a zero init
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_path_agrees(name, luts):
    torch._dynamo.reset()  # a fresh cache per option: GPT.forward is one code object for all of them
    model = model_with(OPTIONS[name])
    val = torch.randint(4, 300, (32 * 4 + 1,), generator=torch.Generator().manual_seed(2))
    x, y = val[:-1].reshape(4, 32), val[1:].reshape(4, 32)
    model.train()
    with torch.no_grad():
        train_loss = model(x, y).item()
    std_loss, _ = eval_standard(model, val, luts, seq_len=32, batch_tokens=64, **CPU)
    sw_loss, _ = eval_sliding(model, val, luts, seq_len=32, stride=32, batch_seqs=3, **CPU)
    assert train_loss == pytest.approx(std_loss, rel=1e-6)
    assert sw_loss == pytest.approx(std_loss, rel=1e-6)
    adapters = attach_lora(model, rank=2)
    model.eval()
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(std_loss, rel=1e-6)  # B = 0: identical at attach
        if name == "all_on":  # hooks trace with fullgraph (each option alone: test_compile.py)
            compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
            assert compiled(x, y).item() == pytest.approx(std_loss, rel=1e-6)
        for lora in adapters.lora.values():
            lora.B.normal_(0, 0.1)
        moved = model(x, y).item()
        assert moved != pytest.approx(std_loss, rel=1e-4)  # the adapters sit on the one forward path
        sw_moved, _ = eval_sliding(model, val, luts, seq_len=32, stride=32, batch_seqs=3, **CPU)
        assert sw_moved == pytest.approx(moved, rel=1e-6)
    adapters.remove()
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(std_loss, rel=1e-6)


def test_looping_is_on_after_construction_and_the_trainer_schedule_switches_it():
    """A built (or deserialised) model evaluates with the full loop schedule, as the records' evals do
    (`looping_active=True` after loading); the trainer sets the passes of the schedule's loop phase."""
    from pgolf.schedule import Schedule, loop_passes

    model = GPT(**from_flat(dict(**BASE, num_loops=2, loop_start=1, loop_end=1)))
    sched = Schedule(enable_looping_at=0.35, loop_phase2_at=0.65)
    assert model.loop_passes == 2
    assert [loop_passes(sched.loop_phase(f), model.num_loops) for f in (0.0, 0.34, 0.35, 0.64, 0.65, 1.0)] == \
        [0, 0, 1, 1, 2, 2]
    assert model.schedules[2] == ((0, 1), (1, 1, 2))  # virtual [0, 1, 1, 1, 2], encoder = floor half
    model.set_looping(0)
    assert model.loop_passes == 0 and model.schedules[0] == ((0,), (1, 2))


@pytest.mark.parametrize("options,msg", [
    (dict(xsa_last_n=-1), "model.attention.xsa_last_n=-1"),
    (dict(rope_dims=6 * 4), "model.attention.rope_dims=24"),
    (dict(mlp_activation="gelu"), "model.mlp.mlp_activation='gelu'"),
    (dict(gated_attn_enabled=True, sparse_attn_gate_enabled=True), "mutually exclusive"),
    (dict(num_loops=1, loop_start=2, loop_end=1), "model.recurrence.loop_start=2"),
    (dict(parallel_start_layer=1, num_loops=1, loop_start=1, loop_end=1), "falls in the U-Net encoder"),
    (dict(parallel_residual="two_lane", parallel_start_layer=2), "model.residual.parallel_residual='two_lane'"),
    (dict(ve_enabled=True, ve_layers=[5]), "model.embeddings.ve_layers=[5]"),
    (dict(smear_gate="window", gate_window=65), "model.embeddings.gate_window=65"),
    (dict(sparse_attn_gate_enabled=True, gate_window=65), "model.attention.gate_window=65"),
])
def test_bad_options_fail_with_one_line(options, msg):
    with pytest.raises(PgolfError, match=msg.replace("[", r"\[").replace("(", r"\(")) as err:
        GPT(**from_flat(dict(**BASE, **options)))
    assert "\n" not in str(err.value)


def test_unmasked_window_smear_warns(caplog):
    with caplog.at_level("WARNING", logger="pgolf.model"):
        GPT(**from_flat(dict(**BASE, smear_gate="window", smear_bos_mask=False)))
    assert "leak" in caplog.text


@pytest.mark.slow
def test_every_part_at_once_trains_compiled_on_smoke_data(tmp_path, fast_cache):
    """The issue's done-when run: every frontier part on, inductor-compiled, 5 steps on the smoke
    data with looping switched on mid-run (one logged recompile), finite losses, and the
    standard, quantized-roundtrip and sliding evals of the result."""
    from runs import FAST, metrics, run_py

    all_on = ["model.num_layers=3", "model.attention.xsa_last_n=3", "model.attention.rope_dims=8", "model.residual.ln_scale=true",
              "model.mlp.mlp_activation=leaky_relu2", "model.residual.skip_gates_enabled=true", "model.embeddings.ve_enabled=true",
              "model.embeddings.ve_dim=32", "model.embeddings.ve_layers=[2]", "model.recurrence.num_loops=1", "model.recurrence.loop_start=1", "model.recurrence.loop_end=1",
              "schedule.enable_looping_at=0.5", "model.residual.parallel_start_layer=2", "model.attention.gate=sparse",
              "model.embeddings.smear_gate=window"]
    out = run_py([*FAST, fast_cache, "schedule.iterations=5", "compile=true", "logger=none", *all_on,
                  f"hydra.run.dir={tmp_path / 'job'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "looping:1 extra pass(es) step:3" in out.stdout + out.stderr
    m = metrics(tmp_path / "job")
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
