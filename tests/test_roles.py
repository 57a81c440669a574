"""Declared parameter roles (pgolf/model/roles.py): every parameter has one, they decide the
optimizer groups and the bf16 placement, they agree with the quantizer's name rules on the records'
presets, and the sixteen frontier records' optimizer groupings equal the records' own.

tests/goldens/optimizer_groups_frontier.json was computed by each record's own optimizer
construction at the small shape of records_frontier.json (see tests/goldens/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pgolf
from pgolf.build import to_container
from pgolf.errors import PgolfError
from pgolf.model import GPT, from_flat
from pgolf.model.block import Block
from pgolf.model.roles import CONTROL, EMBED, MATRIX, control_names, roles_of
from pgolf.optim import Optimizers
from pgolf.quant.rules import PRESETS, get_rules, matches
from test_compile import ALL_ON, TINY
from test_records_frontier import GOLDENS, model_kwargs as pgolf_kwargs

OPT_GOLDENS = json.loads((Path(__file__).parent / "goldens" / "optimizer_groups_frontier.json").read_text())["records"]
# The exclusive options ALL_ON leaves out, on a second model: dense gate, untied head, mul bigram, token smear.
OTHER_PARTS = dict(gated_attn_enabled=True, tie_embeddings=False, bigram_buckets=64, smear_gate="token",
                   parallel_start_layer=1, parallel_residual="lane_merge", value_residual="sigmoid")


def models() -> dict[str, GPT]:
    torch.manual_seed(0)
    return {"all_on": GPT(**from_flat(dict(TINY, **ALL_ON))), "other_parts": GPT(**from_flat(dict(TINY, **OTHER_PARTS))),
            "attn_out_xor_learned": GPT(**from_flat(dict(TINY, attn_out_gate_enabled=True, bigram_buckets=64, bigram_hash="xor",
                                               bigram_scale_init=0.05, smear_gate="post_norm", num_loops=1,
                                               loop_start=1, loop_end=1, parallel_start_layer=1,
                                               parallel_residual="learned_2lane", layer_index="virtual",
                                               loop_untie_mlp=True, disable_layer0_attn=True)))}


def test_every_parameter_of_the_all_parts_models_has_a_role():
    for label, model in models().items():
        roles = roles_of(model)
        assert list(roles) == [n for n, _ in model.named_parameters()], label
        # Gates and lambdas are 2-D yet control tensors: Adam at scalar_lr, fp32, kept float.
        for name, role in roles.items():
            if any(k in name for k in ("attn_gate", "skip_gates", "lambdas", "vr_lambda", "resid_mix")):
                assert role is CONTROL, (label, name, role)
            if name.endswith(("c_q.weight", "mlp.fc.weight", "repeat_mlp.0.proj.weight")):
                assert role is MATRIX, (label, name, role)
        assert roles["tok_emb.weight"] is EMBED
    assert "blocks.0.attn.attn_gate_w" in control_names(models()["other_parts"])


def test_a_part_that_forgets_a_role_fails_at_build_naming_the_parameter(monkeypatch):
    init = Block.__init__

    def with_toy_gate(self, *args, **kwargs):  # a new 2-D gate nobody tagged
        init(self, *args, **kwargs)
        self.toy_gate = nn.Parameter(torch.zeros(4, 8))

    monkeypatch.setattr(Block, "__init__", with_toy_gate)
    with pytest.raises(PgolfError, match=r"parameter blocks\.0\.toy_gate \(4, 8\) has no role.*set_role"):
        GPT(**from_flat(TINY))


def test_optimizer_groups_and_bf16_placement_follow_the_roles():
    from pgolf.trainer import Runtime, place_model

    model = models()["other_parts"]
    opt = Optimizers(model, embed_proj_optimizer="adam")
    where = {id(p): o for o in opt.all for g in o.param_groups for p in g["params"]}
    roles, params = roles_of(model), dict(model.named_parameters())
    assert len(where) == len(params)
    for name, role in roles.items():
        expected = {"matrix": opt.muon, "scalar": opt.scalar, "embed_proj": opt.scalar, "embed": opt.token,
                    "bigram": opt.token, "head": opt.head, "smear": opt.scalar}[role.group]
        assert where[id(params[name])] is expected, name
    rt = Runtime(device=torch.device("cpu"), dtype=torch.bfloat16, compile=False, rank=0, world_size=1,
                 local_rank=0, distributed=False)
    placed = place_model(model, rt)
    for name, p in placed.named_parameters():
        assert p.dtype == (torch.float32 if roles[name].fp32 else torch.bfloat16), name
    assert placed.smear_gate.weight.dtype == torch.bfloat16  # #192's plain nn.Linear, as its record


# -----------------------------
# The quantizer's name rules agree with the roles' export classes (the five presets with a quant preset)
# -----------------------------

QUANT_RECORDS = ("naive_baseline", "smeargate", "10l_int5", "11l_qat_smeargate", "int6_latek")


def agrees(role, name: str, shape: tuple[int, ...], rules) -> str | None:
    """None when the rules treat the tensor as its role's export class says, else why not."""
    t = rules.treatment_for(name, shape)
    numel = int(torch.tensor(shape).prod()) if shape else 1
    control = any(p in name for p in rules.control_patterns)
    named_float = any(matches(p, name) and r.kind != "int" for p, r in rules.rules)
    # The quant-gate presets (#1736 on) store the attention-gate weights int8 per row by design.
    if role.quant == "control" and t.kind == "int" and not (t.label == "int8:gate" and name.endswith("attn_gate_w")):
        return f"control tensor quantized to {t.label}"
    if role.quant == "matrix" and t.kind != "int" and not (numel <= rules.small_numel or named_float):
        return f"matrix kept as {t.label} by the control step" if control else f"matrix kept as {t.label}"
    if role.quant in ("matrix", "embedding") and control:
        return "caught by a control pattern"
    return None


@pytest.mark.parametrize("record", QUANT_RECORDS)
def test_quant_name_rules_agree_with_the_roles(record):
    """At the record's real shape (meta device) every tensor's treatment under its preset's name
    rules is its role's class: control tensors stay float, matrices are quantized unless small or
    named by a keep-float rule (tok_emb, late-K), and no matrix or table hits a control pattern."""
    cfg = pgolf.compose([f"experiment=record_{record}"])
    kwargs = {k: v for k, v in to_container(cfg.model).items() if k != "_target_"}
    with torch.device("meta"):
        model = GPT(**from_flat({**kwargs, "ortho_init": False, "overtone_init": False}))
    rules = get_rules(cfg.quant.preset)
    wrong = {}
    for name, role in roles_of(model).items():
        why = agrees(role, name, tuple(model.get_parameter(name).shape), rules)
        if why:
            wrong[name] = why
    assert not wrong, wrong


def test_every_quant_preset_agrees_with_the_roles_on_the_frontier_models():
    """The same check for the sixteen frontier models at their real shapes under every lossy preset
    (`none` keeps every tensor float by design): a new 2-D control tensor that the presets' control
    patterns do not name (skip gates, lane lambdas, gates) is small enough to stay float."""
    wrong = {}
    for record in sorted(GOLDENS):
        with torch.device("meta"):
            model = GPT(**from_flat(pgolf_kwargs(record, "real")))
        roles = roles_of(model)
        for preset, rules in PRESETS.items():
            for name, role in roles.items():
                why = preset != "none" and agrees(role, name, tuple(model.get_parameter(name).shape), rules)
                if why:
                    wrong[f"{record}/{preset}/{name}"] = why
    assert not wrong, wrong


# -----------------------------
# The sixteen frontier records' optimizer groupings
# -----------------------------

# What the record's code does that its hyperparameters do not say (read from each record's main()/Optimizers).
QUIRKS = {
    # "bigram proj, mtp heads, VE proj -> Adam (small matrix params not worth banking)"
    "pr549_leaky_banks": dict(embed_proj_optimizer="adam"),
    "pr1204_parresid_recur": dict(embed_proj_optimizer="adam"),
    # Its Optimizers lists SmearGate's root parameters in no optimizer: they stay at their zero init.
    "pr1667_smeargate_attngate": dict(smear_lr_mult=0.0),
}


def optimizer_kwargs(name: str) -> dict:
    """pgolf optimizer options equal to a record's hyperparameters (the overrides a user writes)."""
    hp = OPT_GOLDENS[name]["hparams"]
    kw = dict(matrix_lr=hp["matrix_lr"], scalar_lr=hp["scalar_lr"], tied_embed_lr=hp["tied_embed_lr"],
              embed_lr=hp["embed_lr"], head_lr=hp.get("head_lr", 0.008), muon_momentum=hp["muon_momentum"],
              muon_backend_steps=hp["muon_backend_steps"], muon_momentum_warmup_start=hp["muon_momentum_warmup_start"],
              muon_momentum_warmup_steps=hp["muon_momentum_warmup_steps"], muon_weight_decay=hp["muon_wd"],
              adam_weight_decay=hp["adam_wd"], embed_weight_decay=hp.get("embed_wd"), beta1=hp["beta1"],
              beta2=hp["beta2"], adam_eps=hp["adam_eps"], muon_row_normalize=hp.get("muon_row_normalize", False),
              grad_clip_norm=hp["grad_clip_norm"])
    return dict(kw, **QUIRKS.get(name, {}))


def settings(kind: str, g: dict) -> tuple:
    """What a parameter is trained with. Separate groups with equal settings are one (the update is
    per parameter); Adam and AdamW with zero decay are the same; lr 0 means untrained."""
    if g["lr"] == 0:
        return ("untrained",)
    wd = g.get("weight_decay", 0.0)
    if kind == "Muon":
        return ("Muon", g["lr"], wd, g["momentum"], g["nesterov"], g["backend_steps"], g.get("row_normalize", False))
    return ("Adam", g["lr"], wd, tuple(g["betas"]), g["eps"])


def record_grouping(name: str) -> dict[tuple, set[str]]:
    out: dict[tuple, set[str]] = {}
    for g in OPT_GOLDENS[name]["groups"]:
        out.setdefault(settings(g["optimizer"], g), set()).update(g["params"])
    if OPT_GOLDENS[name]["not_in_any_optimizer"]:
        out.setdefault(("untrained",), set()).update(OPT_GOLDENS[name]["not_in_any_optimizer"])
    return out


def pgolf_grouping(name: str) -> dict[tuple, set[str]]:
    torch.manual_seed(0)
    model = GPT(**from_flat(pgolf_kwargs(name)))
    opt = Optimizers(model, **optimizer_kwargs(name))
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[tuple, set[str]] = {}
    seen = []
    for o in opt.all:
        for g in o.param_groups:
            kind = "Muon" if o is opt.muon else "Adam"
            out.setdefault(settings(kind, g), set()).update(names[id(p)] for p in g["params"])
            seen += [names[id(p)] for p in g["params"]]
    assert sorted(seen) == sorted(names.values()), "every parameter in exactly one group"
    return out


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_optimizer_grouping_equals_the_records(name):
    ours, theirs = pgolf_grouping(name), record_grouping(name)
    assert {k: sorted(v) for k, v in ours.items()} == {k: sorted(v) for k, v in theirs.items()}


# The preset files' own optimizer config gives the record's grouping; 04-04 #1334's preset sets
# MuonEq-R (its folder and README) where the golden's Muon group carries no row_normalize.
PRESET_GROUPING_DIFFERS = {"pr1334_lanemerge": "muon_row_normalize"}


@pytest.mark.parametrize("name", sorted(set(GOLDENS) - set(PRESET_GROUPING_DIFFERS)))
def test_preset_optimizer_grouping_equals_the_records(name):
    from test_records_frontier import record_cfg

    from pgolf.build import build

    cfg = record_cfg(name)
    torch.manual_seed(0)
    model = build(cfg, "model")
    opt = build(cfg, "optimizer")(model)
    names = {id(p): n for n, p in model.named_parameters()}
    ours: dict[tuple, set[str]] = {}
    for o in opt.all:
        for g in o.param_groups:
            ours.setdefault(settings("Muon" if o is opt.muon else "Adam", g), set()).update(names[id(p)] for p in g["params"])
    assert {k: sorted(v) for k, v in ours.items()} == {k: sorted(v) for k, v in record_grouping(name).items()}


def test_the_1667_smeargate_is_untrained_in_its_record():
    """A record-code finding the grouping goldens expose: 04-16 #1667's Optimizers collects scalars
    from `blocks` and adds the lane/skip tensors by hand, but not its root-level SmearGate, so
    `smear_gate.weight` and `smear_lambda` stay zero and its SmearGate is the identity throughout."""
    assert OPT_GOLDENS["pr1667_smeargate_attngate"]["not_in_any_optimizer"] == ["smear_gate.weight", "smear_lambda"]
    assert "smear_lambda" in record_grouping("pr1855_lqer_bossmear")[settings("Adam", dict(
        lr=0.02, weight_decay=0.02, betas=[0.9, 0.99], eps=1e-8))]


def test_the_record_readme_names_every_frontier_part():
    """submit/record.techniques lists what the model's parts say of themselves (GPT.describe), so a
    frontier run's README names XSA, the gate, the lanes and the loop, not only the early parts."""
    from omegaconf import OmegaConf

    from pgolf.submit.record import techniques

    cfg = OmegaConf.to_container(pgolf.compose([]), resolve=True)
    cfg["model"] = dict(pgolf_kwargs("pr1855_lqer_bossmear", "real"), _target_=cfg["model"]["_target_"])
    lines = techniques(cfg)
    for needle in ("LeakyReLU(0.5)^2", "partial RoPE on 16 of 64", "XSA on 11 of 11 layers", "sparse attention gate",
                   "BOS-masked", "sigmoid-gated U-Net skips", "2x2 routed parallel lanes", "depth recurrence"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert not [line for line in techniques(OmegaConf.to_container(pgolf.compose([]), resolve=True))
                if "XSA" in line or "gate" in line]  # the baseline lists none of them


def test_part_objects_keep_their_registered_parameters_through_copy_and_placement():
    """Gates, value residual, SmearGate and lane routing hold their parameters themselves; the model
    registers the same objects under the records' names. deepcopy (EMA, warm-up restore) and the
    bf16 placement must keep the two the same tensor, or a part would train one copy and read another."""
    import copy

    from pgolf.trainer import Runtime, place_model

    def linked(m: GPT) -> list[bool]:
        a = m.blocks[1].attn
        return [a.output_gate.w is a.attn_gate_w, a.value_residual.lam is a.vr_lambda,
                m.smear_part.lam is m.smear_lambda, m.smear_part.gate is m.smear_gate,
                m.routing.resid_lambdas is m.parallel_resid_lambdas]

    model = models()["all_on"]
    copied = copy.deepcopy(model)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.bfloat16, compile=False, rank=0, world_size=1,
                 local_rank=0, distributed=False)
    assert all(linked(model)) and all(linked(copied)) and all(linked(place_model(copied, rt)))
    assert copied.smear_lambda is not model.smear_lambda
    with torch.no_grad():
        copied.parallel_resid_lambdas.fill_(0.0)  # the copy's routing reads the copy's lambdas
    assert copied.routing.resid_lambdas.abs().sum() == 0 and model.routing.resid_lambdas.abs().sum() > 0
