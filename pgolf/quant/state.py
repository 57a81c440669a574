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
from pgolf.quant import lqer
from pgolf.quant.rules import PRESETS, QuantRules, get_rules
from pgolf.quant.treatments import Treatment, dequantize_tensor, quantize_tensor

BASELINE_FORMAT = "int8_clean_per_row_v1"
GROUPED_FORMAT = "pgolf_per_row_group_v1"  # PR #99's loader reads it; the baseline's does not
# Every tag an artifact may carry: the two above and the records' own (see QuantRules.quant_format).
KNOWN_FORMATS = (BASELINE_FORMAT, GROUPED_FORMAT, *sorted({r.quant_format for r in PRESETS.values() if r.quant_format}))


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


def quantize_state_dict(
    state_dict: Mapping[str, Tensor], *, rules: QuantRules | str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """State dict -> (quantized object, stats) under a rule set or preset name.

    stats has the baseline's counters (param_count, num_tensors, num_float_tensors,
    num_nonfloat_tensors, baseline_tensor_bytes, int8_payload_bytes) plus `tensors`:
    {name: {"treatment", "numel", "payload_bytes"}} in state-dict order.
    """
    rules = get_rules(rules)
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
        if not t.is_floating_point():
            stats["num_nonfloat_tensors"] += 1
            passthrough[name] = t
            label, payload = "exact", _nbytes(t)
        else:
            treatment = rules.treatment_for(name, t.shape)
            label = treatment.label
            if treatment.kind == "int":
                stats["num_float_tensors"] += 1
                q, s, meta = quantize_tensor(t, treatment)
                if meta is not None:
                    qmeta[name] = meta
                quantized[name], scales[name] = q, s
                dtypes[name] = _dtype_name(t.dtype)
                payload = _nbytes(q) + _nbytes(s)
            else:
                kept = _keep_float(t, treatment)
                if kept.dtype != t.dtype:
                    orig_dtypes[name] = _dtype_name(t.dtype)
                passthrough[name] = kept
                payload = _nbytes(kept)
        stats["int8_payload_bytes"] += payload
        table[name] = {"treatment": label, "numel": int(t.numel()), "payload_bytes": payload}
    grouped = any(m.get("scheme") == "per_row_group" for m in qmeta.values())
    obj: dict[str, Any] = {
        "__quant_format__": rules.quant_format or (GROUPED_FORMAT if grouped else BASELINE_FORMAT),
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
        obj["lqer"] = lqer.apply_lqer(state_dict, obj, rules.lqer)
        for name, entry in obj["lqer"].items():
            extra = sum(_nbytes(t) for t in entry.values())
            table[name]["treatment"] += "+" + lqer.label(entry)
            table[name]["payload_bytes"] += extra
            stats["int8_payload_bytes"] += extra
    stats["tensors"] = table
    return obj, stats


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
        dtype = _dtype(obj["dtypes"][name])
        if name in factors:  # W_hat + A_hat @ B_hat in float32, then the cast (#1855 dequantize_mixed)
            w = dequantize_tensor(q, obj["scales"][name], dtype=torch.float32, meta=qmeta.get(name))
            out[name] = (w + lqer.correction(factors[name])).to(dtype=dtype).contiguous()
            continue
        out[name] = dequantize_tensor(q, obj["scales"][name], dtype=dtype, meta=qmeta.get(name))
    for name, t in obj["passthrough"].items():
        t = t.detach().to("cpu").contiguous()
        orig = orig_dtypes.get(name)
        out[name] = t if orig is None else t.to(dtype=_dtype(orig)).contiguous()
    return out
