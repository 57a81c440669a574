"""Parameter roles: what a parameter is, declared by the part that creates it.

The records decide a parameter's optimizer, its dtype in a bf16 run and whether the exporter
quantizes it from substrings of its name (`CONTROL_TENSOR_NAME_PATTERNS`, `p.ndim == 2`): a new
2-D gate that nobody adds to the list silently trains with Muon in bf16. Here each part tags its
parameters where it creates them (`set_role(module, "weight", CONTROL)`); the optimizer groups
(optim.py), the dtype placement (trainer.place_model) and the control names derive from the
tags, and `roles_of(model)` fails naming any parameter that has none. The quantizer's name rules
(quant/rules.py) stay, since they reproduce the records' artifacts byte for byte; a test checks
that they agree with each role's `quant` class (tests/test_roles.py).

A role is stored on the module that owns the parameter (`module._param_roles[local_name]`), so it
survives `.to()`, `deepcopy`, `load_state_dict` and torch.compile, and the state-dict names do
not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pgolf.errors import PgolfError

# Optimizer groups (optim.Optimizers): Muon at matrix_lr; Adam at the token lr (tied_embed_lr or
# embed_lr) for embedding tables; Adam at head_lr; Adam at scalar_lr (control tensors); SmearGate
# (scalar_lr * smear_lr_mult or its own Adam); the small projections of the embedding path
# (BigramHash, value embeddings): Muon, or Adam at scalar_lr with `embed_proj_optimizer=adam`.
GROUPS = ("matrix", "embed", "bigram", "head", "scalar", "smear", "embed_proj")
# Export classes: `matrix` is integer-quantized (unless small or named by a keep-float rule),
# `control` is always kept float, `embedding` is decided by the preset's named rules.
QUANT_CLASSES = ("matrix", "control", "embedding")


@dataclass(frozen=True)
class Role:
    """`group`: the optimizer group (GROUPS); `fp32`: kept fp32 in a bf16 run (else bf16, as
    the baseline leaves its embedding); `quant`: the export class (QUANT_CLASSES)."""

    name: str
    group: str
    fp32: bool
    quant: str

    def __post_init__(self) -> None:
        assert self.group in GROUPS and self.quant in QUANT_CLASSES, self


MATRIX = Role("matrix", "matrix", fp32=True, quant="matrix")  # block linears (CastedLinear's default)
EMBED = Role("embed", "embed", fp32=False, quant="embedding")  # tok_emb, the value-embedding table
BIGRAM_TABLE = Role("bigram_table", "bigram", fp32=False, quant="embedding")
HEAD = Role("head", "head", fp32=True, quant="matrix")  # untied lm_head
CONTROL = Role("control", "scalar", fp32=True, quant="control")  # scales, mixes, gains, gates, lambdas
SMEAR = Role("smear", "smear", fp32=True, quant="control")
EMBED_PROJ = Role("embed_proj", "embed_proj", fp32=True, quant="matrix")  # bigram.proj, ve_shared.proj


def set_role(module: nn.Module, param_name: str, role: Role) -> None:
    """Declare the role of `module.<param_name>` (a direct parameter of `module`)."""
    if param_name not in module._parameters:
        raise PgolfError(f"{type(module).__name__} has no parameter {param_name!r} to give the role {role.name!r}")
    roles = module.__dict__.setdefault("_param_roles", {})
    roles[param_name] = role


def set_roles(module: nn.Module, role: Role) -> None:
    """Give every direct parameter of `module` the same role (e.g. a ParameterList of scales)."""
    for name in module._parameters:
        set_role(module, name, role)


def with_role(module: nn.Module, role: Role) -> nn.Module:
    """`module` with every direct parameter tagged `role`; returns it, for use in constructors."""
    set_roles(module, role)
    return module


def roles_of(model: nn.Module) -> dict[str, Role]:
    """{parameter name: role} in named_parameters order. PgolfError names the first parameter
    created without a role (a new part must tag what it creates)."""
    out: dict[str, Role] = {}
    for mod_name, module in model.named_modules():
        declared = module.__dict__.get("_param_roles", {})
        for local, p in module._parameters.items():
            if p is None:
                continue
            name = f"{mod_name}.{local}" if mod_name else local
            if local not in declared:
                raise PgolfError(f"parameter {name} {tuple(p.shape)} has no role: tag it where it is created with "
                                 f"pgolf.model.roles.set_role({type(module).__name__}, {local!r}, CONTROL/MATRIX/...)")
            out[name] = declared[local]
    return {n: out[n] for n, _ in model.named_parameters() if n in out}


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{group: [(name, parameter), ...]} for every group in GROUPS, in named_parameters order."""
    roles = roles_of(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        groups[roles[name].group].append((name, p))
    return groups


def control_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the parameters whose export class is `control` (what the records' name patterns
    were meant to catch)."""
    return tuple(n for n, r in roles_of(model).items() if r.quant == "control")
