"""Which parts a run's config reaches: what its bundled train_gpt.py must carry.

The bundler (pgolf.submit.bundle) keeps the top-level definitions that the entry point and
the run's `_target_`s reach by name. The model wires every part it *could* use, so by names
alone every technique is reachable; this table says which option switches each part on. A
part whose option is off for the run is left out of its bundle (its code costs no bytes), and
everything only it uses goes with it. Each row names the part's entry points (the names the
always-shipped code refers to), the dotted config keys its test reads, and the test.

A key the config omits takes the default of its group's `_target_` (what the run did). A key
neither has means the table is stale (a renamed option): the bundler stops with an assertion
naming it rather than guess and ship a script without a part it needs. The keys of rows left
out are frozen in the script (pgolf.submit.entry refuses an environment override of them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Reach:
    names: tuple[str, ...]  # top-level definitions in the bundled modules
    keys: tuple[str, ...]   # dotted config keys, e.g. "model.embeddings.bigram_buckets"
    needed: Callable[..., bool]  # of the keys' values, in order


def _is(*values: str) -> Callable[[Any], bool]:
    return lambda v: v in values


def _on(v: Any) -> bool:
    return bool(v)


def _parallel(step: str) -> Reach:
    # A residual routing runs on the layers from parallel_start_layer (0 = none) (residual.py).
    return Reach((step,), ("model.residual.parallel_start_layer", "model.residual.parallel_residual"),
                 lambda start, routing: bool(start) and routing == step)


REACH = (
    # Embedding path (embeddings.py: the SmearGate parts `smear_part` builds)
    Reach(("BigramHash",), ("model.embeddings.bigram_buckets",), _on),
    Reach(("SigmoidSmear", "SigmoidSmearPart"), ("model.embeddings.smear_gate",), _is("pre_norm", "post_norm")),
    Reach(("token_smear", "TokenSmearPart"), ("model.embeddings.smear_gate",), _is("token")),
    Reach(("window_smear", "WindowSmearPart"), ("model.embeddings.smear_gate",), _is("window")),
    Reach(("ValueEmbedding",), ("model.embeddings.ve_enabled",), _on),
    Reach(("orthogonal_init_",), ("model.init.ortho_init",), _on),
    Reach(("overtone_init_",), ("model.init.overtone_init",), _on),
    Reach(("phase_resid_mix_init_",), ("model.init.phase_resid_mix_init",), _on),
    # Attention (value_residual.py's parts, docs.py; the output gates come from their registry: rows())
    Reach(("exclusive_self_attention",), ("model.attention.xsa_last_n",), _on),
    Reach(("LambdaResidual",), ("model.embeddings.value_residual",), _is("lambda")),
    Reach(("SigmoidResidual",), ("model.embeddings.value_residual",), _is("sigmoid")),
    Reach(("build_doc_mask",), ("model.attention.doc_attention",), _on),
    # Residual routing (residual.py's STEPS)
    *(_parallel(step) for step in ("gptj", "lane_merge", "routed_2x2", "learned_2lane")),
    # QAT (linear.py: the fake-quantized weight) and MuonEq-R (optim.py)
    Reach(("fake_quantize",), ("model.qat.qat_bits",), _on),
    Reach(("row_normalize",), ("optimizer.muon_row_normalize",), _on),
    # Output head (head.py) and the eval's n-gram tilt (ttt/ngram.py)
    Reach(("asym_softcap",), ("model.head.asym_logit_rescale",), _on),
    Reach(("NgramTilt", "check_tilt_args"), ("eval.ngram_tilt_enabled",), _on),
    # Training loaders (data/loaders.py; `sequential` is the baseline's, always shipped)
    Reach(("ShuffledSequenceLoader",), ("data.loader",), _is("shuffled")),
    Reach(("CoprimeStrideLoader",), ("data.loader",), _is("coprime")),
    Reach(("DocumentPackingLoader",), ("data.loader",), _is("documents")),
)


def rows() -> tuple[Reach, ...]:
    """REACH plus one row per registered attention output gate (attention.py's ATTENTION_GATES),
    so a gate added with `@register_gate` is reached by its choice and nothing here lists it."""
    from pgolf.model.attention import ATTENTION_GATES

    gates = tuple(Reach((cls.__name__,), ("model.attention.gate",), _is(name))
                  for name, cls in ATTENTION_GATES.items() if cls is not None)
    return REACH + gates


def _default(target: str, path: list[str], key: str, dotted: str) -> Any:
    """The default of `key` under `path` below a `_target_`: its parameter's default, or for a part
    family's node (`model.attention`) the field default of its typed config."""
    import dataclasses
    import typing

    from pgolf.build import _dataclass_arm

    module, name = target.rsplit(".", 1)
    fn = getattr(__import__(module, fromlist=[name]), name)
    if not path:
        param = inspect.signature(fn).parameters.get(key)
        assert param is not None and param.default is not inspect.Parameter.empty, (
            f"pgolf/submit/reach.py reads {dotted}, which neither the config nor {target} has: update the table")
        return param.default
    kind = _dataclass_arm(typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn).get(path[0]))
    fields = {f.name: f for f in dataclasses.fields(kind)} if kind is not None and len(path) == 1 else {}
    assert key in fields, f"pgolf/submit/reach.py reads {dotted}, which neither the config nor {target} has: update the table"
    f = fields[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option(config: dict, dotted: str) -> Any:
    """The value of a dotted key (`model.embeddings.bigram_buckets`, or deeper for nested part configs) in a
    resolved config; when absent, the default of the innermost enclosing `_target_`."""
    *path, key = dotted.split(".")
    node, target, below = config, None, []
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None and target is not None:  # a part family's node the config omits: all defaults
            node = {}
        assert isinstance(node, dict), f"pgolf/submit/reach.py reads {dotted}, but the config has no {part!r} there"
        target, below = (node["_target_"], []) if "_target_" in node else (target, below + [part])
    if key in node:
        return node[key]
    assert target is not None, f"pgolf/submit/reach.py reads {dotted}, which the config lacks: update the table"
    return _default(target, below, key, dotted)


def left_out(config: dict) -> tuple[set[str], tuple[str, ...]]:
    """(the part names this config does not reach, the sorted config keys that decided it)."""
    names, keys = set(), set()
    for row in rows():
        if not row.needed(*(option(config, k) for k in row.keys)):
            names |= set(row.names)
            keys |= set(row.keys)
    return names, tuple(sorted(keys))
