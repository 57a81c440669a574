"""The `quant` config group's target: a preset or rule list, a compressor, an artifact name.

Its keyword arguments are the YAML keys of conf/quant/*.yaml. Training calls `check_names`
before the first step, so a rule that matches nothing fails in seconds, not after ten
minutes, `calibrate` once at the end of training (GPTQ presets), and `export` after it.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from pgolf.errors import SIZE_CAP_BYTES, PgolfError
from pgolf.quant.artifact import ExportReport, check_codec, export
from pgolf.quant.calibrate import SOURCES, Calibration, calibrate
from pgolf.quant.pergroup import PERGROUP_BACKENDS
from pgolf.quant.rules import QuantRules, get_rules, validate_rules



@dataclass(frozen=True)
class QuantSpec:
    """An export plan: `preset` (a PRESETS name), optionally with its rule list replaced by
    `rules` ([[pattern, treatment], ...]), its `default` treatment, its `small_numel` (tensors at
    or under it stay float; 65,536 in the records, smaller for CPU-sized models) or its AWQ-lite
    bits replaced, and `lqer` (rank, factor_bits, asym, asym_group, top_k, scope; see
    pgolf.quant.lqer) set or, with `false`, switched off.

    GPTQ presets need input Hessians: `calibration` is `train` (the training loader, right after
    the loop, `gptq_calibration_batches` batches: GPTQ_CALIBRATION_BATCHES), `generated` (the
    model's own samples: `calib_num_seqs` x `calib_seq_len` tokens at `calib_temperature`, seed
    `calib_seed`, `calib_batch_size` at a time; 03-25 #1019) or `none`. Validation data is refused.
    `calib_damp` pre-damps each Hessian at collection (0.01 in 03-25 / 03-29, 0 from 04-05 on).

    The artifact: `compressor` (zlib, zstd, lzma, brotli, pergroup) at `level`, after a byte
    shuffle of stride `byte_shuffle` (0: none; the brotli records use 2); `pergroup_backend`
    codes the per-group streams (zpaq, lrzip, lzma, brotli). `prune: true` zeroes the cheapest
    +-1 codes of tensors of at most `prune_max_bits` bits until model + code bytes fit
    `prune_target_bytes` (decimal bytes; the cap)."""

    preset: str = "int8"
    rules: Sequence[Sequence[str]] | None = None
    default: str | None = None
    lqer: Mapping[str, object] | bool | None = None
    small_numel: int | None = None
    awq_lite_bits: int | None = None
    compressor: str = "zlib"
    level: int | None = None
    estimate_level: int | None = None
    byte_shuffle: int = 0
    pergroup_backend: str = "zpaq"
    prune: bool = False
    prune_target_bytes: int = SIZE_CAP_BYTES
    prune_max_bits: int = 6
    artifact_name: str = "final_model.int8.ptz"
    calibration: str = "none"
    gptq_calibration_batches: int = 16
    calib_num_seqs: int = 64
    calib_seq_len: int = 2048
    calib_temperature: float = 0.8
    calib_seed: int = 1337
    calib_batch_size: int = 8
    calib_damp: float = 0.0

    def __post_init__(self) -> None:
        # Options the config alone can check (the lrzip binary or the zpaq package are looked
        # for at export, on the machine that exports).
        check_codec(self.compressor, self.level)
        if not 0 <= self.byte_shuffle <= 255:
            raise PgolfError(f"quant.byte_shuffle={self.byte_shuffle} is out of range; use 0 (off) or a stride 2..255")
        if self.pergroup_backend not in PERGROUP_BACKENDS:
            raise PgolfError(f"quant.pergroup_backend={self.pergroup_backend!r} is unknown; use one of {', '.join(PERGROUP_BACKENDS)}")
        if self.prune and self.prune_target_bytes <= 0:
            raise PgolfError(f"quant.prune_target_bytes={self.prune_target_bytes} must be positive (the cap: {SIZE_CAP_BYTES})")
        if not 2 <= self.prune_max_bits <= 8:
            raise PgolfError(f"quant.prune_max_bits={self.prune_max_bits} is out of range; use 2..8 (#1019: 6)")
        plan = self.plan  # parse the rules now: a typo fails at config time
        if self.calibration in ("val", "validation"):
            raise PgolfError(f"quant.calibration={self.calibration!r}: validation data is never calibration data "
                             "(issue 19); use train (inside the budget) or generated")
        if self.calibration not in SOURCES:
            raise PgolfError(f"quant.calibration={self.calibration!r} is unknown; use one of {', '.join(SOURCES)}")
        if self.hessian_needed and self.calibration == "none":
            raise PgolfError(f"quant preset {plan.name!r} uses GPTQ or Hessian-aware SDClip, which need input "
                             "Hessians; set quant.calibration=train or generated")
        if self.gptq_calibration_batches < 1 or self.calib_num_seqs < 1 or self.calib_seq_len < 2:
            raise PgolfError("quant.gptq_calibration_batches and calib_num_seqs must be >= 1 and calib_seq_len >= 2")
        if not self.calib_temperature > 0 or self.calib_batch_size < 1:
            raise PgolfError("quant.calib_temperature must be > 0 and calib_batch_size >= 1 (03-25 #1019: 0.8, 8)")

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
        if self.small_numel is not None:
            changes["small_numel"] = self.small_numel
        if self.awq_lite_bits is not None:
            changes["awq_lite_bits"] = self.awq_lite_bits
        return replace(base, **changes) if changes else base

    @property
    def hessian_needed(self) -> bool:
        """Whether any treatment of the plan reads an input Hessian (GPTQ, Hessian-aware SDClip)."""
        plan = self.plan
        return any(t.needs_hessian for t in (plan.default, *(t for _, t in plan.rules), *(t for _, t in plan.first)))

    def hessian_names(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The tensors whose treatment reads an input Hessian (what calibration must hook)."""
        plan = self.plan
        return [n for n, shape in shapes.items() if plan.treatment_for(n, tuple(shape)).needs_hessian]

    def calibrate(self, model, *, next_batch, train_s: float, cap_s: float | None, log, vocab_size: int,
                  device="cpu", autocast=None) -> Calibration | None:
        """Collect the Hessians this plan needs from `calibration` (calibrate.calibrate); None if none."""
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
        generate = dict(num_seqs=self.calib_num_seqs, seq_len=self.calib_seq_len, temperature=self.calib_temperature,
                        seed=self.calib_seed, batch_size=self.calib_batch_size)
        return calibrate(source=self.calibration, model=model, names=self.hessian_names(shapes),
                         num_batches=self.gptq_calibration_batches, next_batch=next_batch, train_s=train_s,
                         cap_s=cap_s, log=log, generate=generate, vocab_size=vocab_size, device=device,
                         autocast=autocast or nullcontext, damp=self.calib_damp)

    def check_names(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
        """Validate the rules against {name: shape}; return {name: treatment label}."""
        return validate_rules(self.plan, shapes)

    def export(self, state_dict: Mapping[str, Tensor], path: str | os.PathLike[str],
               calibration: Calibration | None = None, *, code_bytes: int = 0) -> ExportReport:
        """Quantize (with the Hessians of `calibration`, if any), compress and atomically write the
        artifact; with `prune`, the model's byte target is prune_target_bytes - code_bytes."""
        target = self.prune_target_bytes - code_bytes if self.prune else None
        return export(state_dict, path, rules=self.plan, compressor=self.compressor, level=self.level,
                      estimate_level=self.estimate_level, calibration=calibration, byte_shuffle=self.byte_shuffle,
                      backend=self.pergroup_backend, prune_target_bytes=target, prune_max_bits=self.prune_max_bits)
