"""docs/adding-a-technique.md, done as the doc says: a toy attention output gate, one registered
class and one YAML key, through every forward path.

The gate is defined and registered here (the doc puts the same class in pgolf/model/attention.py);
nothing else in pgolf lists it: the YAML choice, the compose-time check, the bundle's reach table,
the env entry and the parameter roles all follow the registry and the part's own declarations.
One tiny model is shared by every check (about 5 s on one core).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import pgolf
from pgolf.build import build_model, to_container
from pgolf.errors import PgolfError
from pgolf.evaluate import ByteLUTs, eval_sliding, eval_standard
from pgolf.model.adapters import attach_lora
from pgolf.model.attention import ATTENTION_GATES, AttentionConfig, register_gate
from pgolf.model.roles import CONTROL, control_names, roles_of
from pgolf.optim import Optimizers
from pgolf.quant import collect_hessians, dequantize_state_dict, quantize_state_dict
from pgolf.submit import reach

CPU = dict(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
TINY = ["model=tiny", "model.vocab_size=64", "model.num_layers=2", "model.model_dim=32", "model.num_heads=2",
        "model.num_kv_heads=1", "logger=none"]


# --- the doc's step 1: the part, in one class, registered under its choice name ---------------
class ToyGate:
    """y_h <- (1 + tanh(W x[..., :gate_window])) * y_h per head, W (H, w) zero-init: identity at init."""

    record_flag = "toy_gate_enabled"  # the env entry maps TOY_GATE_ENABLED=1 onto gate=toy
    windowed = True  # its input is x[..., :gate_window], checked against model_dim at compose

    def __init__(self, dim: int, num_heads: int, cfg: AttentionConfig):
        self.window = cfg.gate_window
        self.w = nn.Parameter(torch.zeros(num_heads, self.window))
        self.members = {"toy_gate_w": (self.w, CONTROL)}  # registered on the attention, Adam at scalar_lr

    def __call__(self, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
        g = 1.0 + torch.tanh(nn.functional.linear(x[..., : self.window].contiguous(), self.w.to(x.dtype)))
        return y * g[..., None]  # (B, T, H, D) * (B, T, H, 1)

    def describe(self) -> str:
        return f"toy gate 1 + tanh(W x[:{self.window}]) per head (docs/adding-a-technique.md)"


@pytest.fixture(scope="module")
def toy():
    register_gate("toy")(ToyGate)
    try:
        # --- the doc's step 2: one YAML key selects it --------------------------------------------
        cfg = pgolf.compose([*TINY, "model.attention.gate=toy", "model.attention.gate_window=8"])
        model = build_model(cfg)
        with torch.no_grad():  # every parameter non-zero (proj is zero-init), the gate live
            for p in model.parameters():
                p.normal_(0, 0.3)
        yield cfg, model
    finally:
        ATTENTION_GATES.pop("toy")


def luts(vocab: int) -> ByteLUTs:
    return ByteLUTs(torch.ones(vocab, dtype=torch.int16), torch.zeros(vocab, dtype=torch.bool),
                    torch.zeros(vocab, dtype=torch.bool))


def test_the_toy_gate_runs_through_every_forward_path(toy):
    cfg, model = toy
    g = torch.Generator().manual_seed(0)
    val = torch.randint(0, 64, (4 * 16 + 1,), generator=g)
    x, y = val[:-1].reshape(4, 16), val[1:].reshape(4, 16)
    # Built and described from its config; its parameters carry the role it declared.
    assert all(isinstance(b.attn.output_gate, ToyGate) for b in model.blocks)
    assert any(line.startswith("toy gate") for line in model.describe())
    assert roles_of(model)["blocks.0.attn.toy_gate_w"] is CONTROL
    assert "blocks.1.attn.toy_gate_w" in control_names(model)
    # It took effect: the same weights without the gate score differently.
    plain = build_model(pgolf.compose(TINY))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "toy_gate" not in k}, strict=True)
    model.eval(), plain.eval()
    with torch.no_grad():
        loss = model(x, y).item()
        assert loss != pytest.approx(plain(x, y).item(), rel=1e-4)
        # Standard and sliding evals run the same forward.
        std, _ = eval_standard(model, val, luts(64), seq_len=16, batch_tokens=32, **CPU)
        sw, _ = eval_sliding(model, val, luts(64), seq_len=16, stride=16, batch_seqs=2, **CPU)
        assert std == pytest.approx(loss, rel=1e-6) and sw == pytest.approx(loss, rel=1e-6)
        # Quantized roundtrip: the gate is kept as a small float tensor (fp16 in int8's rules), and loads.
        obj, _ = quantize_state_dict(model.state_dict(), rules="int8")
        back = dequantize_state_dict(obj)
        assert torch.allclose(back["blocks.0.attn.toy_gate_w"], model.blocks[0].attn.toy_gate_w, atol=1e-3)
        rt = build_model(cfg)
        rt.load_state_dict(back, strict=True)
        rt.eval()
        assert rt(x, y).item() == pytest.approx(loss, rel=1e-2)
        # Calibration hooks see every linear of the gated model.
        hessians, _, n = collect_hessians(model, [x])
        assert n == 1 and "blocks.0.attn.c_q.weight" in hessians
        # Compiled with fullgraph (eager backend: tracing only, cheap on CPU).
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        assert compiled(x, y).item() == pytest.approx(loss, rel=1e-6)
    # TTT: LoRA adapters attach from outside, identity at attach, live once B moves.
    adapters = attach_lora(model, rank=2)
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(loss, rel=1e-6)
        for lora in adapters.lora.values():
            lora.B.normal_(0, 0.1)
        assert model(x, y).item() != pytest.approx(loss, rel=1e-4)
    adapters.remove()
    # A training step moves the gate, through the optimizer group its role chose.
    model.train()
    opt = Optimizers(model, ns_dtype="fp32", compile_ns=False)
    before = model.blocks[0].attn.toy_gate_w.detach().clone()
    model(x, y).backward()
    opt.step(0, 1.0)
    assert not torch.equal(model.blocks[0].attn.toy_gate_w, before)


def test_the_toy_gate_reaches_the_bundle_checks_and_the_env_entry(toy):
    cfg, _ = toy
    config = to_container(cfg)
    dropped, fixed = reach.left_out(config)
    assert "ToyGate" not in dropped and {"SparseAttnGate", "AttnOutGate", "DenseAttnGate"} <= dropped
    assert "model.attention.gate" in fixed
    assert "ToyGate" in reach.left_out(to_container(pgolf.compose(TINY)))[0]
    with pytest.raises(PgolfError, match=r"model.attention.gate_window=40 must be in 1..model_dim=32"):
        pgolf.compose([*TINY, "model.attention.gate=toy", "model.attention.gate_window=40"])
    from pgolf.submit.entry import apply_env

    plain = to_container(pgolf.compose(TINY))
    apply_env(plain, {"TOY_GATE_ENABLED": "1"})
    assert plain["model"]["attention"]["gate"] == "toy"


def test_an_unregistered_gate_is_one_line_at_compose():
    with pytest.raises(PgolfError, match=r"model.attention.gate='toy2' is not one of none, attn_out, gated, sparse"):
        pgolf.compose([*TINY, "model.attention.gate=toy2"])
