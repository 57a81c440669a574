"""A whole state dict through a rule set, and back.

The quantized object keeps the baseline's layout (`quantize_state_dict_int8` in
openai/parameter-golf train_gpt.py): for the `int8` preset it is the same dict, key for key,
so it pickles to the same bytes and the baseline's own loader reads it. It holds only
tensors, strings, ints and dicts, so `torch.load(..., weights_only=True)` accepts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.quant.lqer import apply_lqer, lqer_correction, lqer_label
from pgolf.quant.gptq import awq_candidates, dequantize_awq, quantize_weight
from pgolf.quant.rules import PRESETS, QuantRules, get_rules
from pgolf.quant.treatments import GPTQ_CLIPS, Treatment, dequantize_tensor, quantize_tensor

BASELINE_FORMAT = "int8_clean_per_row_v1"
GROUPED_FORMAT = "pgolf_per_row_group_v1"  # PR #99's loader reads it; the baseline's does not
AWQ_FORMAT = "pgolf_per_row_awq_v1"  # AWQ-lite's protected columns carry a second scale (qmeta)
# Every tag an artifact may carry: the three above and the records' own (see QuantRules.quant_format).
KNOWN_FORMATS = (BASELINE_FORMAT, GROUPED_FORMAT, AWQ_FORMAT,
                 *sorted({r.quant_format for r in PRESETS.values() if r.quant_format}))


def _nbytes(t: Tensor) -> int:
    return int(t.numel()) * int(t.element_size())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: object) -> torch.dtype:
    # Artifact metadata is data from a file: only accept real dtype names.
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PgolfError(f"quantized object names dtype {name!r}; re-export the artifact with pgolf.quant.export")
    return dtype


def _keep_float(t: Tensor, treatment: Treatment) -> Tensor:
    # Baseline keep_float_tensor: fp32 and bf16 go to fp16, other float dtypes stay as they
    # are; fp32 is a plain upcast.
    if treatment.kind == "fp32":
        return t.float().contiguous()
    if t.dtype in (torch.float32, torch.bfloat16):
        return t.to(dtype=torch.float16).contiguous()
    return t


def _recon_error(w: Tensor, deq: Tensor, H: Tensor | None) -> float:
    # Relative reconstruction error: ||E||^2 / ||W||^2, or tr(E H E^T) / tr(W H W^T) with the
    # input Hessian (the loss-relevant error GPTQ minimises) when the tensor was calibrated.
    w, e = w.float(), w.float() - deq.float()
    if H is not None and w.ndim == 2 and H.shape[0] == w.shape[1]:
        num, den = ((e @ H) * e).sum(), ((w @ H) * w).sum()
    else:
        num, den = e.pow(2).sum(), w.pow(2).sum()
    return float(num / den) if float(den) > 0 else 0.0


def awq_selection(state_dict: Mapping[str, Tensor], rules: QuantRules,
                  act_rms: Mapping[str, Tensor]) -> dict[str, tuple[list[int], int, int]]:
    """AWQ-lite (#1908): pool the `awq_lite_group_size`-column groups of every GPTQ tensor below
    `awq_lite_bits` with activation statistics, keep the top `awq_lite_group_top_k` model-wide.
    Returns {name: (group starts, group size, bits)}; {} when AWQ-lite is off."""
    if not rules.awq_lite_bits:
        return {}
    pool = []
    for name, t in state_dict.items():
        if not (t.is_floating_point() and t.ndim == 2 and t.numel() > rules.small_numel and name in act_rms):
            continue
        tr = rules.treatment_for(name, t.shape)
        if tr.kind == "int" and tr.gptq and tr.clip == "sdclip" and tr.bits < rules.awq_lite_bits:
            pool += [(score, name, a) for score, a in awq_candidates(t, act_rms[name], rules.awq_lite_group_size)]
    pool.sort(key=lambda c: -c[0])  # stable, as the record's list.sort
    chosen: dict[str, tuple[list[int], int, int]] = {}
    for _, name, a in pool[:rules.awq_lite_group_top_k]:
        chosen.setdefault(name, ([], rules.awq_lite_group_size, rules.awq_lite_bits))[0].append(a)
    return chosen


def quantize_state_dict(
    state_dict: Mapping[str, Tensor], *, rules: QuantRules | str, calibration: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """State dict -> (quantized object, stats) under a rule set or preset name.

    `calibration` (calibrate.Calibration, or anything with `hessians` and `act_rms` dicts keyed by
    parameter name) feeds GPTQ, Hessian-aware SDClip and AWQ-lite. stats has the baseline's
    counters (param_count, num_tensors, num_float_tensors, num_nonfloat_tensors,
    baseline_tensor_bytes, int8_payload_bytes) plus `tensors`: {name: {"treatment", "numel",
    "payload_bytes", "bits", "error", "weighted", "note"}} in state-dict order, where `error` is
    the relative reconstruction error (Hessian-weighted when `weighted`).
    """
    rules = get_rules(rules)
    hessians = dict(getattr(calibration, "hessians", None) or {})
    awq = awq_selection(state_dict, rules, dict(getattr(calibration, "act_rms", None) or {}))
    quantized: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    dtypes: dict[str, str] = {}
    passthrough: dict[str, Tensor] = {}
    orig_dtypes: dict[str, str] = {}
    qmeta: dict[str, dict[str, object]] = {}
    stats: dict[str, Any] = dict.fromkeys(
        ("param_count", "num_tensors", "num_float_tensors", "num_nonfloat_tensors", "baseline_tensor_bytes",
         "int8_payload_bytes"), 0,
    )
    table: dict[str, dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise PgolfError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor; "
                             "pass model.state_dict()")
        t = tensor.detach().to("cpu").contiguous()
        stats["param_count"] += int(t.numel())
        stats["num_tensors"] += 1
        stats["baseline_tensor_bytes"] += _nbytes(t)
        row: dict[str, Any] = {"bits": 8 * t.element_size(), "error": 0.0, "weighted": False, "note": ""}
        if not t.is_floating_point():
            stats["num_nonfloat_tensors"] += 1
            passthrough[name] = t
            label, payload = "exact", _nbytes(t)
        else:
            treatment = rules.treatment_for(name, t.shape)
            label = treatment.label
            H = hessians.get(name)
            if treatment.kind == "int":
                stats["num_float_tensors"] += 1
                if treatment.gptq or (treatment.clip in GPTQ_CLIPS and t.ndim == 2):  # else: one per-tensor scale
                    r = quantize_weight(t, treatment, hessian=H, awq=awq.get(name))
                    q, s, meta, deq, row["note"] = r.q, r.scale, r.meta, r.dequantized, r.note
                    payload = _nbytes(meta["scale_hi"]) if meta and "scale_hi" in meta else 0
                else:
                    q, s, meta = quantize_tensor(t, treatment)
                    deq, payload = dequantize_tensor(q, s, dtype=torch.float32, meta=meta), 0
                if meta is not None:
                    qmeta[name] = meta
                quantized[name], scales[name] = q, s
                dtypes[name] = _dtype_name(t.dtype)
                payload += _nbytes(q) + _nbytes(s)
                row["bits"] = treatment.bits
            else:
                kept = _keep_float(t, treatment)
                if kept.dtype != t.dtype:
                    orig_dtypes[name] = _dtype_name(t.dtype)
                passthrough[name] = kept
                payload, deq, row["bits"] = _nbytes(kept), kept, 8 * kept.element_size()
            row["error"] = _recon_error(t, deq, H)
            row["weighted"] = H is not None and t.ndim == 2 and H.shape[0] == t.shape[1]
        stats["int8_payload_bytes"] += payload
        table[name] = {"treatment": label, "numel": int(t.numel()), "payload_bytes": payload, **row}
    schemes = {m.get("scheme") for m in qmeta.values()}
    fmt = AWQ_FORMAT if "per_row_awq" in schemes else GROUPED_FORMAT if "per_row_group" in schemes else BASELINE_FORMAT
    obj: dict[str, Any] = {
        "__quant_format__": rules.quant_format or fmt,
        "quantized": quantized,
        "scales": scales,
        "dtypes": dtypes,
        "passthrough": passthrough,
    }
    if qmeta:
        obj["qmeta"] = qmeta
    if orig_dtypes:
        obj["passthrough_orig_dtypes"] = orig_dtypes
    if rules.lqer is not None:  # after every tensor has its codes: the top-K errors are global
        obj["lqer"] = apply_lqer(state_dict, obj, rules.lqer, dequant=dequantize_codes)
        for name, entry in obj["lqer"].items():
            extra = sum(_nbytes(t) for t in entry.values())
            table[name]["treatment"] += "+" + lqer_label(entry)
            deq = dequantize_codes(quantized[name], scales[name], qmeta.get(name)) + lqer_correction(entry)
            table[name]["error"] = _recon_error(state_dict[name].detach().cpu(), deq, hessians.get(name))
            table[name]["payload_bytes"] += extra
            stats["int8_payload_bytes"] += extra
    stats["tensors"] = table
    return obj, stats


def dequantize_codes(q: Tensor, s: Tensor, meta: dict[str, object] | None) -> Tensor:
    """One tensor's codes and scales -> float32 weights (per-row, grouped, or AWQ-lite's)."""
    if isinstance(meta, dict) and meta.get("scheme") == "per_row_awq":
        return dequantize_awq(q, s, meta)
    return dequantize_tensor(q, s, dtype=torch.float32, meta=meta)


def dequantize_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Quantized object -> state dict with every tensor back in its original dtype."""
    fmt = obj.get("__quant_format__") if isinstance(obj, Mapping) else None
    if fmt not in KNOWN_FORMATS:
        raise PgolfError(f"quantized object has format {fmt!r}; expected one of {', '.join(KNOWN_FORMATS)} "
                         "from pgolf.quant.export")
    qmeta = obj.get("qmeta", {})
    orig_dtypes = obj.get("passthrough_orig_dtypes", {})
    factors = obj.get("lqer", {})
    out: dict[str, Tensor] = {}
    for name, q in obj["quantized"].items():
        meta = qmeta.get(name)
        dtype = _dtype(obj["dtypes"][name])
        w = dequantize_codes(q, obj["scales"][name], meta)
        if name in factors:  # W_hat + A_hat @ B_hat in float32, then the cast (#1855 dequantize_mixed)
            w = w + lqer_correction(factors[name])
        out[name] = w.to(dtype=dtype).contiguous()
    for name, t in obj["passthrough"].items():
        t = t.detach().to("cpu").contiguous()
        orig = orig_dtypes.get(name)
        out[name] = t if orig is None else t.to(dtype=_dtype(orig)).contiguous()
    return out
