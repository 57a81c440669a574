"""LQER: low-rank reconstruction of the quantization error of the worst tensors.

After every tensor has its codes, E = W - deq(Q(W)) is formed in plain weight space for each
candidate (an integer-quantized 2-D tensor in scope), the `top_k` largest by Frobenius norm
are kept, and each gets a rank-r SVD fit E ~ A B with A = U_r S_r (rows x r) and B = V_r^T
(r x cols). The factors are stored as small integers:

- asymmetric (2026-04-27 #1855's `_lqer_pack_asym`, via #1797): A in {-2, -1, 0, 1} with ONE
  fp16 scale max|A| / 1.5; B flattened into groups of `asym_group` values in [-8, 7], one fp16
  scale per group (group max / 7.5);
- symmetric fallback (#1855's `_lqer_pack`), used when B's size is not a multiple of the group:
  A and B per-row in [-R, R], R = 2**(factor_bits-1) - 1, fp16 scale rowmax / R.

Dequantization adds A_hat @ B_hat to deq(Q(W)) in float32 before the cast back to the tensor's
dtype. The quantizer only has to produce codes that `dequantize_tensor` reads (per-row or
grouped scales), so any treatment, round-to-nearest or GPTQ, gets LQER the same way. The error
is not Hessian-weighted, as in the record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.quant.treatments import dequantize_tensor


@dataclass(frozen=True)
class LQER:
    """LQER settings, the records' LQER_* variables (#1855: rank 4, factor bits 4, asym group
    64, top 3). `scope` lists name patterns (substrings, `re:` regex) of the candidates; empty
    means every integer-quantized 2-D tensor (#1855: every GPTQ'd tensor)."""

    rank: int = 4
    factor_bits: int = 4
    asym: bool = True
    asym_group: int = 64
    top_k: int = 3
    scope: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", tuple(self.scope))
        for key, lo in (("rank", 1), ("top_k", 1), ("asym_group", 1)):
            if getattr(self, key) < lo:
                raise PgolfError(f"lqer {key}={getattr(self, key)} must be >= {lo}")
        if not 2 <= self.factor_bits <= 8:
            raise PgolfError(f"lqer factor_bits={self.factor_bits} is out of range; use 2..8 (#1855: 4)")


def _fp16(x: Tensor) -> Tensor:
    return x.to(torch.float16)


def lqer_pack_asym(A: Tensor, B: Tensor, group: int) -> dict[str, Tensor]:
    """A (rows, r), B (r, cols) float32 -> int8 codes and fp16 scales (#1855 `_lqer_pack_asym`)."""
    sA = _fp16(A.abs().amax().clamp_min(1e-10) / 1.5)  # 0-dim: one scale for all of A
    qA = torch.clamp(torch.round(A / sA.float()), -2, 1).to(torch.int8)
    Bg = B.reshape(-1, group)  # (r * cols / group, group), groups run across B's rows
    sB = _fp16(Bg.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 7.5).reshape(-1)
    qB = torch.clamp(torch.round(Bg / sB.float().reshape(-1, 1)), -8, 7).to(torch.int8).reshape(B.shape)
    return {"A": qA, "A_scale": sA, "B": qB, "B_scale": sB}


def lqer_pack_sym(A: Tensor, B: Tensor, bits: int) -> dict[str, Tensor]:
    """A (rows, r), B (r, cols) float32 -> per-row int codes in [-R, R] (#1855 `_lqer_pack`)."""
    r = 2 ** (bits - 1) - 1
    out = {}
    for key, x in (("A", A), ("B", B)):
        s = _fp16(x.abs().amax(dim=1).clamp_min(1e-10) / r)
        out[key] = torch.clamp(torch.round(x / s.float().view(-1, 1)), -r, r).to(torch.int8)
        out[f"{key}_scale"] = s
    return out


def lqer_factors(E: Tensor, spec: LQER) -> dict[str, Tensor]:
    """Error E (rows, cols) float32 -> packed rank-`spec.rank` factors (the asym form when B's
    size divides into groups, else the symmetric one)."""
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    r = min(spec.rank, S.numel())
    A = (U[:, :r] * S[:r]).contiguous()  # (rows, r)
    B = Vh[:r, :].contiguous()  # (r, cols)
    if spec.asym and B.numel() % spec.asym_group == 0:
        return lqer_pack_asym(A, B, spec.asym_group)
    return lqer_pack_sym(A, B, spec.factor_bits)


def lqer_correction(entry: Mapping[str, Tensor]) -> Tensor:
    """Packed factors -> A_hat @ B_hat, float32 (rows, cols)."""
    qA, sA, qB, sB = entry["A"], entry["A_scale"], entry["B"], entry["B_scale"]
    if sA.ndim == 0:  # asymmetric: one scale for A, one per group of flattened B
        A = qA.float() * float(sA)
        g = qB.numel() // sB.numel()
        B = (qB.reshape(-1, g).float() * sB.float().view(-1, 1)).reshape(qB.shape)
    else:
        A = qA.float() * sA.float().view(-1, 1)
        B = qB.float() * sB.float().view(-1, 1)
    return A @ B


def lqer_label(entry: Mapping[str, Tensor]) -> str:
    """'lqer_asym' or 'lqer', the suffix the records log after a tensor's treatment."""
    return "lqer_asym" if entry["A_scale"].ndim == 0 else "lqer"


def apply_lqer(state_dict: Mapping[str, Tensor], obj: Mapping[str, Any], spec: LQER,
               dequant: Callable[[Tensor, Tensor, Any], Tensor] | None = None) -> dict[str, dict[str, Tensor]]:
    """Fit LQER factors for the quantized object `obj` of `state_dict`: {name: packed factors}.

    Candidates are `obj["quantized"]` 2-D tensors matching `spec.scope`, in state-dict order;
    ties in error norm keep that order (#1855 sorts the same way, stably). `dequant(q, s, meta)`
    gives a tensor's float32 weights back (default: `dequantize_tensor`; the state module
    passes its own, which also reads AWQ-lite's codes, as #1908 fits LQER after AWQ).
    """
    if dequant is None:
        dequant = lambda q, s, meta: dequantize_tensor(q, s, dtype=torch.float32, meta=meta)  # noqa: E731
    from pgolf.quant.rules import matches  # rules imports this module

    qmeta = obj.get("qmeta", {})

    def error(name: str) -> Tensor:
        q = obj["quantized"][name]
        w_hat = dequant(q, obj["scales"][name], qmeta.get(name))
        return state_dict[name].detach().cpu().float() - w_hat

    norms = {}
    for name, q in obj["quantized"].items():
        if q.ndim == 2 and (not spec.scope or any(matches(p, name) for p in spec.scope)):
            norms[name] = float(error(name).norm())
    top = sorted(norms.items(), key=lambda kv: -kv[1])[: spec.top_k]
    return {name: lqer_factors(error(name), spec) for name, _ in top}
