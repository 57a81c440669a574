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

from pgolf.quant.artifact import ExportReport, check_codec, export
from pgolf.quant.rules import QuantRules, get_rules, validate_rules


@dataclass(frozen=True)
class QuantSpec:
    """An export plan: `preset` (a PRESETS name), optionally with its rule list replaced by
    `rules` ([[pattern, treatment], ...]) and its `default` treatment replaced, and `lqer`
    (rank, factor_bits, asym, asym_group, top_k, scope; see pgolf.quant.lqer) set or, with
    `false`, switched off."""

    preset: str = "int8"
    rules: Sequence[Sequence[str]] | None = None
    default: str | None = None
    lqer: Mapping[str, object] | bool | None = None
    compressor: str = "zlib"
    level: int | None = None
    estimate_level: int | None = None
    artifact_name: str = "final_model.int8.ptz"

    def __post_init__(self) -> None:
        check_codec(self.compressor, self.level)
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

    def export(self, state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> ExportReport:
        """Quantize, compress and atomically write the artifact."""
        return export(state_dict, path, rules=self.plan, compressor=self.compressor, level=self.level,
                      estimate_level=self.estimate_level)
