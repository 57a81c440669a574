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
    keys: tuple[str, ...]   # dotted config keys, e.g. "model.bigram_buckets"
    needed: Callable[..., bool]  # of the keys' values, in order


def _is(*values: str) -> Callable[[Any], bool]:
    return lambda v: v in values


def _on(v: Any) -> bool:
    return bool(v)


def _parallel(step: str) -> Reach:
    # A residual routing runs on the layers from parallel_start_layer (0 = none) (residual.py).
    return Reach((step,), ("model.parallel_start_layer", "model.parallel_residual"),
                 lambda start, routing: bool(start) and routing == step)


REACH = (
    # Embedding path (embeddings.py: the SmearGate parts `smear_part` builds)
    Reach(("BigramHash",), ("model.bigram_buckets",), _on),
    Reach(("SigmoidSmear", "SigmoidSmearPart"), ("model.smear_gate",), _is("pre_norm", "post_norm")),
    Reach(("token_smear", "TokenSmearPart"), ("model.smear_gate",), _is("token")),
    Reach(("window_smear", "WindowSmearPart"), ("model.smear_gate",), _is("window")),
    Reach(("ValueEmbedding",), ("model.ve_enabled",), _on),
    Reach(("orthogonal_init_",), ("model.ortho_init",), _on),
    Reach(("overtone_init_",), ("model.overtone_init",), _on),
    Reach(("phase_resid_mix_init_",), ("model.phase_resid_mix_init",), _on),
    # Attention (attention.py's OUTPUT_GATES, value_residual.py's parts, docs.py)
    Reach(("exclusive_self_attention",), ("model.xsa_last_n",), _on),
    Reach(("AttnOutGate",), ("model.attn_out_gate_enabled",), _on),
    Reach(("DenseAttnGate",), ("model.gated_attn_enabled",), _on),
    Reach(("SparseAttnGate",), ("model.sparse_attn_gate_enabled",), _on),
    Reach(("LambdaResidual",), ("model.value_residual",), _is("lambda")),
    Reach(("SigmoidResidual",), ("model.value_residual",), _is("sigmoid")),
    Reach(("build_doc_mask",), ("model.doc_attention",), _on),
    # Residual routing (residual.py's STEPS)
    *(_parallel(step) for step in ("gptj", "lane_merge", "routed_2x2", "learned_2lane")),
    # QAT (linear.py: the fake-quantized weight) and MuonEq-R (optim.py)
    Reach(("fake_quantize",), ("model.qat_bits",), _on),
    Reach(("row_normalize",), ("optimizer.muon_row_normalize",), _on),
    # Output head (head.py) and the eval's n-gram tilt (ttt/ngram.py)
    Reach(("asym_softcap",), ("model.asym_logit_rescale",), _on),
    Reach(("NgramTilt", "check_tilt_args"), ("eval.ngram_tilt_enabled",), _on),
    # Training loaders (data/loaders.py; `sequential` is the baseline's, always shipped)
    Reach(("ShuffledSequenceLoader",), ("data.loader",), _is("shuffled")),
    Reach(("CoprimeStrideLoader",), ("data.loader",), _is("coprime")),
    Reach(("DocumentPackingLoader",), ("data.loader",), _is("documents")),
)


def option(config: dict, dotted: str) -> Any:
    """The value of a dotted key (`model.bigram_buckets`, or deeper for nested part configs) in a
    resolved config; when absent, the default of the innermost enclosing `_target_`."""
    *path, key = dotted.split(".")
    node = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        assert isinstance(node, dict), f"pgolf/submit/reach.py reads {dotted}, but the config has no {part!r} there"
    if key in node:
        return node[key]
    assert "_target_" in node, f"pgolf/submit/reach.py reads {dotted}, which the config lacks: update the table"
    module, name = node["_target_"].rsplit(".", 1)
    target = getattr(__import__(module, fromlist=[name]), name)
    param = inspect.signature(target).parameters.get(key)
    assert param is not None and param.default is not inspect.Parameter.empty, (
        f"pgolf/submit/reach.py reads {dotted}, which neither the config nor {node['_target_']} has: update the table")
    return param.default


def left_out(config: dict) -> tuple[set[str], tuple[str, ...]]:
    """(the part names this config does not reach, the sorted config keys that decided it)."""
    names, keys = set(), set()
    for row in REACH:
        if not row.needed(*(option(config, k) for k in row.keys)):
            names |= set(row.names)
            keys |= set(row.keys)
    return names, tuple(sorted(keys))
