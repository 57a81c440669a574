"""The model's config: the shape at `model.*`, each part family's typed config under it.

    model.{vocab_size, num_layers, model_dim, num_heads, num_kv_heads, tie_embeddings, bos_id}
    model.attention   attention.py   AttentionConfig  (gates from ATTENTION_GATES, RoPE, XSA, docs)
    model.mlp         mlp.py         MLPConfig
    model.residual    residual.py    ResidualConfig   (parallel routing, skip gates, LN scale)
    model.recurrence  recurrence.py  RecurrenceConfig (loops, layer_index)
    model.embeddings  embeddings.py  EmbeddingsConfig (SmearGate, BigramHash, VE, value residual)
    model.head        head.py        HeadConfig       (softcap, AsymLogit)
    model.init        embeddings.py  InitConfig
    model.qat         linear.py      QATConfig

Each family's options, defaults and checks live once, in its dataclass beside its math; leaf
names are the records' environment variables lower-cased. `from_flat` maps the records' flat
names (and their mutually exclusive gate booleans, `SPARSE_ATTN_GATE_ENABLED=1`, ...) onto
this nesting, for the record-style environment entry and for tests that build a record's
GPT and pgolf's from one set of keywords.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pgolf.errors import PgolfError
from pgolf.model.attention import ATTENTION_GATES, AttentionConfig
from pgolf.model.embeddings import EmbeddingsConfig, InitConfig
from pgolf.model.head import HeadConfig
from pgolf.model.linear import QATConfig
from pgolf.model.mlp import MLPConfig
from pgolf.model.recurrence import RecurrenceConfig
from pgolf.model.residual import ResidualConfig

FAMILIES: dict[str, type] = {"attention": AttentionConfig, "mlp": MLPConfig, "residual": ResidualConfig,
                             "recurrence": RecurrenceConfig, "embeddings": EmbeddingsConfig, "head": HeadConfig,
                             "init": InitConfig, "qat": QATConfig}


@dataclass
class ModelConfig:
    """The whole model's options: the shape, then one typed config per part family."""

    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    tie_embeddings: bool = True
    bos_id: int = 1
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    init: InitConfig = field(default_factory=InitConfig)
    qat: QATConfig = field(default_factory=QATConfig)

    @classmethod
    def of(cls, **options: Any) -> ModelConfig:
        """From keyword options as Hydra gives them (families as dicts, None for the defaults) or as
        dataclasses. An unknown key is one PgolfError naming it (and its new place, if it moved)."""
        shape = {k: v for k, v in options.items() if k not in FAMILIES}
        _refuse_unknown("model", shape, cls)
        parts = {}
        for name, kind in FAMILIES.items():
            value = options.get(name)
            if isinstance(value, kind):
                parts[name] = value
                continue
            value = dict(value or {})
            _refuse_unknown(f"model.{name}", value, kind)
            parts[name] = kind(**value)
        return cls(**shape, **parts)

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def check(self) -> ModelConfig:
        """Shapes, then every family's own checks (some read other families: the loop span, the
        layer index); one PgolfError line naming the option and the fix. Allocates nothing."""
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise PgolfError(f"model.{name}={getattr(self, name)} must be positive")
        dim, heads, kv = self.model_dim, self.num_heads, self.num_kv_heads
        if dim % heads:
            raise PgolfError(f"model.model_dim={dim} is not divisible by model.num_heads={heads}; "
                             f"pick num_heads among {[h for h in range(1, 33) if dim % h == 0]}")
        if heads % kv:
            raise PgolfError(f"model.num_heads={heads} is not divisible by model.num_kv_heads={kv}; "
                             f"pick num_kv_heads among {[h for h in range(1, heads + 1) if heads % h == 0]}")
        if self.head_dim % 2:
            raise PgolfError(f"head_dim = model.model_dim/model.num_heads = {self.head_dim} is odd; "
                             "RoPE needs an even head_dim")
        if not 0 <= self.bos_id < self.vocab_size:
            raise PgolfError(f"model.bos_id={self.bos_id} must be a token id in 0..{self.vocab_size - 1}")
        for name in ("recurrence", *(f for f in FAMILIES if f != "recurrence")):  # the loop span first
            getattr(self, name).check(self)
        return self


def check_model(**options: Any) -> ModelConfig:
    """Build and check a model config from Hydra-style options (what `pgolf.build` runs at compose)."""
    return ModelConfig.of(**options).check()


def _leaves() -> dict[str, list[str]]:
    """Leaf name -> the dotted places it lives under `model.` (gate_window lives in two)."""
    places: dict[str, list[str]] = {f.name: [f.name] for f in dataclasses.fields(ModelConfig) if f.name not in FAMILIES}
    for family, kind in FAMILIES.items():
        for f in dataclasses.fields(kind):
            places.setdefault(f.name, []).append(f"{family}.{f.name}")
    return places


def gate_flags() -> dict[str, str]:
    """The records' boolean env names of the registered gates -> their `attention.gate` choice."""
    return {cls.record_flag: name for name, cls in ATTENTION_GATES.items() if getattr(cls, "record_flag", None)}


def moved_key(key: str) -> str | None:
    """Where an old flat `model.<key>` lives now ("model.attention.xsa_last_n"), or None."""
    if key in gate_flags():
        return f"model.attention.gate={gate_flags()[key]}"
    places = [p for p in _leaves().get(key, ()) if "." in p]
    return " and ".join(f"model.{p}" for p in places) or None


def key_path(key: str) -> str:
    """The dotted override path of a record's flat option name: "xsa_last_n" ->
    "model.attention.xsa_last_n" (the first place, for gate_window the attention's)."""
    places = _leaves().get(key)
    if not places:
        raise PgolfError(f"model option {key!r} is not an option of any model part")
    return f"model.{places[0]}"


def from_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """The records' flat options (env names lower-cased, `num_layers=11, xsa_last_n=11,
    sparse_attn_gate_enabled=True, ...`) as GPT's nested keywords. A gate boolean that is true
    selects its gate; a false one is dropped. PgolfError on a name no family has."""
    places, flags = _leaves(), gate_flags()
    on = [key for key, value in flat.items() if key in flags and value]
    if len(on) > 1:
        raise PgolfError(f"{on[0]} and {on[1]} are mutually exclusive attention output gates; keep one "
                         "(model.attention.gate takes one choice)")
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key in flags:
            if value:
                nested.setdefault("attention", {})["gate"] = flags[key]
            continue
        if key in FAMILIES and isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
            continue
        if key not in places:
            raise PgolfError(f"model option {key!r} is not an option of any model part; known: "
                             f"{', '.join(sorted(places))}")
        for place in places[key]:
            family, _, leaf = place.rpartition(".")
            (nested.setdefault(family, {}) if family else nested)[leaf] = value
    return nested


def _refuse_unknown(where: str, options: dict, kind: type) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    for key in options:
        if key.startswith("_") or key in known:
            continue
        moved = moved_key(key) if where == "model" else None
        if moved:
            raise PgolfError(f"{where}.{key} moved: set {moved} instead")
        raise PgolfError(f"{where}.{key} is not an option of {where}; known: {', '.join(sorted(known))}")
