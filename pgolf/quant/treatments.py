"""What happens to one tensor: the treatments and their exact integer math.

Fidelity is the point of this file: for the same weights, each treatment yields the same
int8 codes and scales as the challenge's own exporter that it names, bit for bit. Every
formula below says which record it reproduces; the golden tests in tests/test_quant.py pin
the outputs. `fake_quantize` reuses the same code path, so the value a QAT forward sees is
exactly what the artifact will hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf.errors import PgolfError

# The baseline's clip: per-row 99.99984th percentile of |w| (openai/parameter-golf
# train_gpt.py, INT8_CLIP_PERCENTILE). Some records spell it 0.9999984; torch.quantile casts
# q to the input's fp32, where both spellings are the same number.
CLIP_Q = 99.99984 / 100.0
FP16_TINY = torch.finfo(torch.float16).tiny  # 2**-14, smallest normal fp16
# percentile/rowmax/rowmax_floor/rowmax_floor16: the zstd-era exporters (below). sdclip, pctsearch and gate are the
# GPTQ era's scale rules (gptq.py): k*std per row (04-05 #1394), GPTQ-lite's five-percentile
# search (03-22 #414), and the int8 rowmax of the attention-gate weights (04-19 #1736).
CLIPS = ("percentile", "rowmax", "rowmax_floor", "rowmax_floor16", "sdclip", "pctsearch", "gate")
GPTQ_CLIPS = ("sdclip", "pctsearch", "gate")
_NUM = r"([0-9]+(?:\.[0-9]*)?(?:e-?[0-9]+)?)"
_SPEC = re.compile(r"^(gptq:)?int([0-9]+)(?::(percentile|rowmax_floor16|rowmax_floor|rowmax|sdclip|pctsearch|gate))?"
                   rf"(?::k{_NUM})?(?::l{_NUM})?(?::g([0-9]+))?$")


@dataclass(frozen=True)
class Treatment:
    """How one float tensor is stored: `fp16`, `fp32`, or `int` codes with per-row scales.

    `int` codes live in int8 containers whatever `bits` is (the zstd-era records store
    int5/int6 that way, and the compressor squeezes out the unused high bits). `clip` picks
    the scale rule (see `_codes`, and gptq.py for sdclip/pctsearch/gate); `group_size` > 0
    gives one scale per `group_size` columns of each row, as PR #99 does for `.attn.c_k.`.
    `gptq` rounds with full-Hessian GPTQ error feedback (gptq.py) instead of to nearest;
    `clip_sigmas` is SDClip's k; `hessian_lambda` > 0 is Hessian-aware SDClip's lambda (#1412).
    """

    kind: str
    bits: int = 8
    clip: str = "percentile"
    group_size: int = 0
    gptq: bool = False
    clip_sigmas: float = 0.0
    hessian_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("int", "fp16", "fp32"):
            raise PgolfError(f"treatment kind {self.kind!r} is unknown; use 'int', 'fp16' or 'fp32'")
        if self.kind != "int":
            return
        if not 4 <= self.bits <= 8:
            raise PgolfError(f"treatment bits={self.bits} is out of range; use 4..8")
        if self.clip not in CLIPS:
            raise PgolfError(f"treatment clip={self.clip!r} is unknown; use one of {', '.join(CLIPS)}")
        if self.group_size < 0:
            raise PgolfError(f"treatment group_size={self.group_size} is negative; use 0 (per row) or a column count")
        if self.clip == "sdclip" and not self.clip_sigmas > 0:
            raise PgolfError(f"treatment {self.label!r}: sdclip needs k > 0 (clip sigmas), e.g. 'gptq:int6:sdclip:k12.85'")
        if self.clip != "sdclip" and (self.clip_sigmas or self.hessian_lambda):
            raise PgolfError(f"treatment {self.label!r}: k and l belong to the sdclip scale; write e.g. "
                             "'gptq:int6:sdclip:k12.85:l0.175'")
        if self.hessian_lambda < 0:
            raise PgolfError(f"treatment {self.label!r}: hessian lambda must be >= 0 (#1412 used 0.175)")
        if (self.gptq or self.clip in GPTQ_CLIPS) and self.group_size:
            raise PgolfError(f"treatment {self.label!r}: GPTQ and the sdclip/pctsearch/gate scales are per row; "
                             "drop the :g group")

    @classmethod
    def parse(cls, spec: str | Treatment) -> Treatment:
        """`fp16`, `fp32`, `int8`, `int6:rowmax`, `int8:g64`, `int6:rowmax_floor:g128`,
        `gptq:int6:sdclip:k12.85`, `gptq:int6:sdclip:k12.85:l0.175`, `gptq:int6:pctsearch`,
        `int6:sdclip:k12.85` (round to nearest), `int8:gate` -> Treatment."""
        if isinstance(spec, Treatment):
            return spec
        if spec in ("fp16", "fp32"):
            return cls(kind=spec)
        m = _SPEC.match(spec) if isinstance(spec, str) else None
        if m is None:
            raise PgolfError(f"treatment {spec!r} is not understood; write e.g. 'int8', 'int6:rowmax', 'int8:g64', "
                             "'gptq:int6:sdclip:k12.85', 'fp16'")
        return cls(kind="int", bits=int(m[2]), clip=m[3] or "percentile", group_size=int(m[6] or 0),
                   gptq=bool(m[1]), clip_sigmas=float(m[4] or 0.0), hessian_lambda=float(m[5] or 0.0))

    @property
    def label(self) -> str:
        """The spec string `parse` reads back; used in logs and reports."""
        if self.kind != "int":
            return self.kind
        out = ("gptq:" if self.gptq else "") + f"int{self.bits}" + ("" if self.clip == "percentile" else f":{self.clip}")
        out += f":k{self.clip_sigmas:g}" if self.clip_sigmas else ""
        out += f":l{self.hessian_lambda:g}" if self.hessian_lambda else ""
        return out + (f":g{self.group_size}" if self.group_size else "")

    @property
    def needs_hessian(self) -> bool:
        """GPTQ and Hessian-aware SDClip read the tensor's input Hessian (calibrate.py)."""
        return self.kind == "int" and (self.gptq or self.hessian_lambda > 0)

    @property
    def max_level(self) -> int:
        """Largest code R = 2**(bits-1) - 1 (127 for int8, 31 for int6, 15 for int5)."""
        return (1 << (self.bits - 1)) - 1


FP16 = Treatment(kind="fp16")
FP32 = Treatment(kind="fp32")
INT8 = Treatment(kind="int")


# -----------------------------
# THE CODES
# -----------------------------
#
# One function computes codes and scales over the last dim of x (a row, or a group of a
# row), for the exporter and for QAT alike. Only the fp16 rounding of the scale differs
# between the two callers: the exporter uses a real cast, QAT an emulation that
# torch.compile cannot drop (see `fp16_round`).


def _round_to_float32(v: float) -> float:
    # Nearest float32 (ties to even) of a positive double, in plain Python so that
    # torch.compile folds it (numpy scalars would be traced as tensors).
    if v == 0.0:
        return 0.0
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= m < 1
    return math.ldexp(round(m * (1 << 24)), e - 24)


def clip_quantile(x: Tensor, q: float = CLIP_Q) -> Tensor:
    """`torch.quantile(x, q, dim=-1)` bit for bit, from a top-k instead of a full sort.

    q near 1 needs only the top few values of each row (the top 2 for rows under ~600k), so
    this is ~15x faster on the exporter's matrices and in every QAT forward. It repeats
    ATen's arithmetic: rank = float32(q) * (n-1) rounded to float32, the order statistics
    either side of it, `lerp` by the fractional part, and NaN for a row holding a NaN.
    """
    n = x.size(-1)
    rank = _round_to_float32(_round_to_float32(q) * (n - 1))  # exact product, one rounding
    below, above = int(rank), math.ceil(rank)
    k = n - below  # the k largest reach down to the lower order statistic
    top = torch.topk(x, k, dim=-1).values  # (..., k), descending; NaN counts as largest
    lo, hi = top[..., k - 1:k], top[..., n - 1 - above:n - above]
    out = lo.lerp(hi, torch.full_like(lo, rank - below))
    return torch.where(top[..., :1].isnan(), top[..., :1], out).squeeze(-1)


def _codes(x: Tensor, *, bits: int, clip: str, fp16: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """x: float32 (..., n) -> (codes as float32 (..., n), stored scale values as float32 (...))."""
    r = (1 << (bits - 1)) - 1
    if clip == "percentile":
        # Baseline quantize_float_tensor, with R generalized as the int6 records do
        # (2026-03-19_WarmdownQuantization, _MixedQuant_Int6Int8, _smeargate_orthoinit_muonwd,
        # PR #192): clip at the percentile, scale >= 1/R, round with the fp32 scale, store fp16.
        c = clip_quantile(x.abs())
        xc = torch.maximum(torch.minimum(x, c[..., None]), -c[..., None])
        s = (c / float(r)).clamp_min(1.0 / float(r))
        return torch.clamp(torch.round(xc / s[..., None]), -r, r), fp16(s)
    amax = x.abs().amax(dim=-1)
    if clip == "rowmax_floor16":
        # 2026-03-20 #265 and 03-21 #315 (`quantize_int6_per_row`): the scale floored at 1/R (so a
        # row with max |w| < 1 gets step 1/R) and rounded to fp16 before the codes; [-(R+1), R].
        s = fp16((amax / float(r)).clamp_min(1.0 / float(r)))
        return torch.clamp(torch.round(x / s[..., None]), -(r + 1), r), s
    if clip == "rowmax":
        # 2026-03-20_10L_Int5MLP_MuonWD04_SWA50 and _Int6_MLP3x_SmearGate_BigramHash: no
        # clipping, the scale is rounded to fp16 *before* rounding the codes, and the code
        # range is asymmetric [-(R+1), R].
        s = fp16((amax / float(r)).clamp_min(1e-12)).clamp_min(FP16_TINY)
        return torch.clamp(torch.round(x / s[..., None]), -(r + 1), r), s
    # rowmax_floor, PR #99 (LOWBIT_BITS): no clipping, scale floored at 1/R, codes rounded
    # with the fp32 scale, range [-(R+1), R], the scale stored as fp16 afterwards.
    s = (amax / float(r)).clamp_min(1.0 / float(r))
    return torch.clamp(torch.round(x / s[..., None]), -(r + 1), r), fp16(s)


def _cast_fp16(s: Tensor) -> Tensor:
    return s.to(torch.float16).float()


def fp16_round(s: Tensor) -> Tensor:
    """float32 -> float32 holding the nearest fp16 value (ties to even), as `s.half().float()`.

    Inductor keeps fused intermediates in fp32 and silently skips a `.half().float()`
    round trip (emulate_precision_casts is off by default), so QAT under torch.compile would
    see unrounded scales. This does the rounding with integer ops it cannot elide; checked
    against `.half()` on every finite float32 bit pattern.
    """
    b = s.view(torch.int32)
    # Normal range: round the 23-bit mantissa to 10 bits, ties to even.
    normal = ((b + (0x0FFF + ((b >> 13) & 1))) & ~0x1FFF).view(torch.float32)
    # fp16 subnormals sit on a fixed 2**-24 grid; the power-of-two products are exact.
    sub = torch.round(s * 16777216.0) * (1.0 / 16777216.0)
    a = s.abs()
    out = torch.where(a < FP16_TINY, sub, normal)
    return torch.where(a >= 65520.0, torch.copysign(torch.full_like(s, float("inf")), s), out)


def quantize_tensor(t: Tensor, treatment: Treatment) -> tuple[Tensor, Tensor, dict[str, object] | None]:
    """Float tensor -> (int8 codes, scale, qmeta or None) under an `int` treatment.

    2-D tensors get per-row (or per-group) scales; anything else one per-tensor scale. The
    qmeta dicts are the ones the baseline and PR #99 write, so their loaders read ours.
    """
    t32 = t.float()
    bits, clip = treatment.bits, treatment.clip
    if t32.ndim != 2:
        return (*_quantize_per_tensor(t32, bits=bits, clip=clip), None)
    rows, cols = t32.shape
    g = treatment.group_size
    # PR #99 applies a group override only when it divides the row; otherwise the tensor
    # falls through to per-row. validate_rules reports that case before training.
    grouped = 0 < g <= cols and cols % g == 0
    x = t32.view(rows, cols // g, g) if grouped else t32
    if t32.numel() == 0:
        # The references return uninitialized scales here; any fixed value will do.
        q, s = torch.zeros_like(x), torch.full(x.shape[:-1], 1.0 / treatment.max_level)
    else:
        q, s = _codes(x, bits=bits, clip=clip, fp16=_cast_fp16)
    q = q.to(torch.int8).view(rows, cols).contiguous()
    s = s.to(torch.float16).contiguous()
    if grouped:
        return q, s, {"scheme": "per_row_group", "axis": 0, "group_size": g}
    return q, s, {"scheme": "per_row", "axis": 0}


def _quantize_per_tensor(t32: Tensor, *, bits: int, clip: str) -> tuple[Tensor, Tensor]:
    # Vectors and N-d tensors: one scale, computed through Python floats (`.item()`) exactly
    # as the references do, since that double-precision step decides the last bit.
    r = (1 << (bits - 1)) - 1
    if clip == "percentile":
        # Baseline: fp32 0-dim scale, symmetric [-R, R], 1.0 when the clip is zero.
        c = float(clip_quantile(t32.abs().flatten()).item()) if t32.numel() else 0.0
        s = torch.tensor(c / float(r) if c > 0 else 1.0, dtype=torch.float32)
        q = torch.clamp(torch.round(torch.clamp(t32, -c, c) / s), -r, r)
        return q.to(torch.int8).contiguous(), s
    amax = float(t32.abs().max().item()) if t32.numel() else 0.0
    if clip in ("rowmax", "rowmax_floor16", "pctsearch"):
        # 03-20 #265 .. 03-23 #549 give a large int6 vector this one rowmax scale (GPTQ-lite's search is
        # per row; its [-R, R] clamp never binds here: |t| / s <= R (1 + 2**-11) rounds to R at most).
        # 2026-03-20 records: fp16 0-dim scale straight from the double. The records divide
        # by a zero scale on an all-zero tensor; the FP16_TINY floor makes that all zeros.
        s = torch.tensor(max(amax / r, 1e-12), dtype=torch.float16).clamp_min(FP16_TINY)
        q = torch.clamp(torch.round(t32 / s.float()), -(r + 1), r)
        return q.to(torch.int8).contiguous(), s
    # rowmax_floor: PR #99 never applies it to vectors; this is its per-row rule on one row.
    s = torch.tensor(max(amax / r, 1.0 / r), dtype=torch.float32)
    q = torch.clamp(torch.round(t32 / s), -(r + 1), r)
    return q.to(torch.int8).contiguous(), s.to(torch.float16)


def dequantize_tensor(q: Tensor, s: Tensor, *, dtype: torch.dtype, meta: dict[str, object] | None) -> Tensor:
    """Codes and scale -> float tensor of `dtype` (the baseline's and PR #99's dequant math)."""
    if isinstance(meta, dict) and meta.get("scheme") == "per_row_group":
        g = int(meta["group_size"])
        rows, cols = q.shape
        out = q.float().view(rows, cols // g, g) * s.to(torch.float32).view(rows, cols // g, 1)
        return out.reshape_as(q).to(dtype=dtype).contiguous()
    if s.ndim > 0:
        out = q.float() * s.to(torch.float32).view(q.shape[0], *([1] * (q.ndim - 1)))
        return out.to(dtype=dtype).contiguous()
    return (q.float() * float(s.item())).to(dtype=dtype).contiguous()


# -----------------------------
# QAT
# -----------------------------


def fake_quantize(w: Tensor, *, bits: int, clip: str, group_size: int = 0) -> Tensor:
    """Straight-through fake quantization of a 2-D weight for QAT.

    The forward value equals dequantize(quantize(w)) of the exporter bit for bit (same codes,
    same fp16-rounded scales, returned in w's dtype); the gradient w.r.t. w is the identity.
    No `.item()` and no branching on values, so it traces under torch.compile(fullgraph=True).
    """
    t = Treatment(kind="int", bits=bits, clip=clip, group_size=group_size)
    if w.ndim != 2:
        raise PgolfError(f"fake_quantize got a {w.ndim}-d tensor of shape {tuple(w.shape)}; "
                         "apply it to 2-d weights only")
    rows, cols = w.shape
    g = t.group_size
    grouped = 0 < g <= cols and cols % g == 0
    x = w.detach().float()
    x = x.view(rows, cols // g, g) if grouped else x  # (rows, cols) or (rows, cols/g, g)
    q, s = _codes(x, bits=t.bits, clip=t.clip, fp16=fp16_round)  # q like x; s: x.shape[:-1]
    deq = (q * s[..., None]).reshape(rows, cols).to(w.dtype)
    # `w + (deq - w).detach()` is off by an ulp of w wherever the sum rounds; adding an
    # exact zero that carries w's gradient keeps the forward value equal to deq.
    return deq + (w - w.detach())
