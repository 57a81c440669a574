"""The `quant` config group's target: a preset or rule list, a compressor, an artifact name.

Its keyword arguments are the YAML keys of conf/quant/*.yaml. Training calls `check_names`
before the first step, so a rule that matches nothing fails in seconds, not after ten
minutes, and `export` at the end.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import Tensor

SIZE_CAP_BYTES = 16_000_000  # the challenge's cap on code + compressed model, decimal bytes

from pgolf.errors import PgolfError
from pgolf.quant.artifact import ExportReport, check_codec, export
from pgolf.quant.pergroup import BACKENDS
from pgolf.quant.rules import QuantRules, get_rules, validate_rules


@dataclass(frozen=True)
class QuantSpec:
    """An export plan: `preset` (a PRESETS name), optionally with its rule list replaced by
    `rules` ([[pattern, treatment], ...]) and its `default` treatment replaced, and `lqer`
    (rank, factor_bits, asym, asym_group, top_k, scope; see pgolf.quant.lqer) set or, with
    `false`, switched off.

    The artifact: `compressor` (zlib, zstd, lzma, brotli, pergroup) at `level`, after a byte
    shuffle of stride `byte_shuffle` (0: none; the brotli records use 2); `pergroup_backend`
    codes the per-group streams (zpaq, lrzip, lzma, brotli). `prune: true` zeroes the cheapest
    +-1 codes of tensors of at most `prune_max_bits` bits until model + code bytes fit
    `prune_target_bytes` (decimal bytes; the cap)."""

    preset: str = "int8"
    rules: Sequence[Sequence[str]] | None = None
    default: str | None = None
    lqer: Mapping[str, object] | bool | None = None
    compressor: str = "zlib"
    level: int | None = None
    estimate_level: int | None = None
    byte_shuffle: int = 0
    pergroup_backend: str = "zpaq"
    prune: bool = False
    prune_target_bytes: int = SIZE_CAP_BYTES
    prune_max_bits: int = 6
    artifact_name: str = "final_model.int8.ptz"

    def __post_init__(self) -> None:
        # Options the config alone can check (the lrzip binary or the zpaq package are looked
        # for at export, on the machine that exports).
        check_codec(self.compressor, self.level)
        if not 0 <= self.byte_shuffle <= 255:
            raise PgolfError(f"quant.byte_shuffle={self.byte_shuffle} is out of range; use 0 (off) or a stride 2..255")
        if self.pergroup_backend not in BACKENDS:
            raise PgolfError(f"quant.pergroup_backend={self.pergroup_backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if self.prune and self.prune_target_bytes <= 0:
            raise PgolfError(f"quant.prune_target_bytes={self.prune_target_bytes} must be positive (the cap: {SIZE_CAP_BYTES})")
        if not 2 <= self.prune_max_bits <= 8:
            raise PgolfError(f"quant.prune_max_bits={self.prune_max_bits} is out of range; use 2..8 (#1019: 6)")
        self.plan  # parse the rules now: a typo fails at config time

    @property
    def plan(self) -> QuantRules:
        """The QuantRules this spec resolves to."""
        base = get_rules(self.preset)
        changes: dict[str, object] = {}
        if self.rules is not None:
            changes["rules"] = tuple(tuple(r) for r in self.rules)
            changes["name"] = f"{base.name}+rules"
        if self.default is not None:
            changes["default"] = self.default
        if self.lqer is not None:
            changes["lqer"] = None if self.lqer is False else ({} if self.lqer is True else dict(self.lqer))
        return replace(base, **changes) if changes else base

    def check_names(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
        """Validate the rules against {name: shape}; return {name: treatment label}."""
        return validate_rules(self.plan, shapes)

    def export(self, state_dict: Mapping[str, Tensor], path: str | os.PathLike[str], *,
               code_bytes: int = 0) -> ExportReport:
        """Quantize, compress and atomically write the artifact; with `prune`, the model's byte
        target is prune_target_bytes - code_bytes."""
        target = self.prune_target_bytes - code_bytes if self.prune else None
        return export(state_dict, path, rules=self.plan, compressor=self.compressor, level=self.level,
                      estimate_level=self.estimate_level, byte_shuffle=self.byte_shuffle,
                      backend=self.pergroup_backend, prune_target_bytes=target, prune_max_bits=self.prune_max_bits)
