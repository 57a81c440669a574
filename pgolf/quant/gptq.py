"""The GPTQ era's per-tensor math: scales (SDClip, Hessian-aware SDClip, GPTQ-lite's percentile
search, the gate's int8 rowmax) and full-Hessian GPTQ with AWQ-lite's protected group.

Each function reproduces a record's own arithmetic, operation for operation, so that on the same
weight and Hessian the codes and fp16 scales are the record's bit for bit (tests/test_gptq.py holds
the goldens): GPTQ of 2026-03-25 #1019 / 03-29 #1060 (five percentile candidates, keep the lowest
unweighted MSE) and 04-05 #1394 on (one pass with SDClip scales), Hessian-aware SDClip of 04-06
#1412, the quant-gate of 04-19 #1736 / 04-27 #1855, AWQ-lite of #1908 / #1945 (commit 70067534).

GPTQ (Frantar et al. 2023), as the records run it, for W (rows, cols) and input Hessian H (cols, cols):
dead columns (H_jj = 0) get H_jj = 1 and W_:j = 0; H += 0.01 mean(diag H) I; columns in descending
diag order (act order); U = chol(H^-1) upper; then in blocks of 128 columns, column by column:
q_j = clamp(round(w_j / s), +-R), e = (w_j - q_j s) / U_jj, and the block's later columns absorb
e U_j,j:; after each block the columns beyond it absorb E U_blk,rest. `quantize_weight` is the
entry point (the codes, the scales and the dequantized weight, for LQER to fit the residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.quant.treatments import Treatment, clip_quantile

# GPTQ-lite's candidates (03-22 #414 `quantize_int6_per_row`; 1.0 is the row max).
PERCENTILES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)
DAMP = 0.01  # percdamp, every GPTQ record
BLOCK = 128  # columns per error-feedback block, every GPTQ record


@dataclass
class Quantized:
    """One tensor's result: int8 codes (rows, cols), fp16 scales (rows,), the qmeta the artifact
    stores (None for plain per-row), the float32 dequantized weight, and what was done."""

    q: Tensor
    scale: Tensor
    meta: dict | None
    dequantized: Tensor
    note: str = ""
    extra: dict = field(default_factory=dict)


# -----------------------------
# SCALES (fp16, one per row)
# -----------------------------


def sdclip_scale(w: Tensor, clip_sigmas: float, max_level: int) -> Tensor:
    """SDClip (04-05 #1394): s_i = k std(W_i) / R, floor 1e-10, fp16 (std with Bessel's correction)."""
    return (clip_sigmas * w.float().std(dim=1) / max_level).clamp_min(1e-10).to(torch.float16)


def hessian_sdclip_scale(w: Tensor, h_diag: Tensor, clip_sigmas: float, max_level: int, lam: float) -> Tensor:
    """Hessian-aware SDClip (04-06 #1412): c = d / mean(d) for d the damped diag(H) (floor 1e-8),
    r_i = mean_j |W_ij| c_j normalised to mean 1, s_i = k std(W_i) (1 + lam (r_i - 1)) / R."""
    w = w.float()
    d = h_diag.clamp_min(1e-8)
    importance = (w.abs() * (d / d.mean()).unsqueeze(0)).mean(dim=1)
    adj = 1.0 + lam * (importance / importance.mean() - 1.0)
    return (clip_sigmas * w.std(dim=1) * adj / max_level).clamp_min(1e-10).to(torch.float16)


def percentile_scale(w: Tensor, pct: float, max_level: int) -> Tensor:
    """One GPTQ-lite candidate: per-row clip at quantile `pct` of |W| (1.0: the row max), s =
    max(clip / R, 1 / R) in fp16 (the 1/R floor is the records')."""
    a = w.float().abs()
    clip = a.amax(dim=1) if pct >= 1.0 else clip_quantile(a, pct)
    return (clip / max_level).clamp_min(1.0 / max_level).to(torch.float16)


def gate_scale(w: Tensor, max_level: int) -> Tensor:
    """Quant-gate (04-19 #1736, `_quantize_gate_int8_row`): s_i = max(max_j |W_ij|, 1e-10) / R in fp16."""
    return (w.float().abs().amax(dim=1).clamp_min(1e-10) / max_level).to(torch.float16)


def round_codes(w: Tensor, scale: Tensor, max_level: int) -> Tensor:
    """Round to nearest with fp16 scales: clamp(round(W / s), +-R) as int8."""
    return torch.clamp(torch.round(w.float() / scale.float()[:, None]), -max_level, max_level).to(torch.int8)


# -----------------------------
# GPTQ
# -----------------------------


def prepare_hessian(H: Tensor, damp: float = DAMP) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """H (cols, cols) -> (damped diag in column order, dead-column mask, act-order permutation,
    U = upper Cholesky factor of the permuted H^-1). Raises torch.linalg.LinAlgError if H is not
    positive definite after damping."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * H.diag().mean())
    perm = torch.argsort(H.diag(), descending=True)
    diag = H.diag().clone()
    H = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return diag, dead, perm, U


def gptq_solve(W: Tensor, U: Tensor, scale: Tensor, max_level: int, *, block_size: int = BLOCK,
               protect: Tensor | None = None, scale_hi: Tensor | None = None, max_level_hi: int = 0) -> Tensor:
    """Error-feedback rounding of W (rows, cols), already in act order, against U (cols, cols).

    `protect` (cols,) bool in the same order marks AWQ-lite's columns, rounded with `scale_hi` to
    +-`max_level_hi` instead. Returns int8 codes in act order."""
    rows, cols = W.shape
    sf = scale.float()
    sf_hi = scale_hi.float() if scale_hi is not None else None
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    W = W.clone()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Wb = W[:, i1:i2].clone()
        Ub = U[i1:i2, i1:i2]
        Err = torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            w = Wb[:, j]
            if protect is not None and bool(protect[i1 + j]):
                q = torch.clamp(torch.round(w / sf_hi), -max_level_hi, max_level_hi)
                recon = q.float() * sf_hi
            else:
                q = torch.clamp(torch.round(w / sf), -max_level, max_level)
                recon = q.float() * sf
            Q[:, i1 + j] = q.to(torch.int8)
            err = (w - recon) / Ub[j, j]
            Err[:, j] = err
            Wb[:, j:] -= err.unsqueeze(1) * Ub[j, j:].unsqueeze(0)
        if i2 < cols:
            W[:, i2:] -= Err @ U[i1:i2, i2:]
    return Q


def _gptq(w: Tensor, H: Tensor, t: Treatment, awq: tuple[list[int], int, int] | None) -> Quantized:
    R = t.max_level
    W0 = w.float().clone()
    diag, dead, perm, U = prepare_hessian(H)
    invperm = torch.argsort(perm)
    Wp = W0[:, perm].clone()
    Wp[:, dead[perm]] = 0
    if t.clip == "pctsearch":
        # 03-25 / 03-29: one GPTQ pass per percentile, keep the lowest unweighted MSE (first wins ties).
        best = None
        for pct in PERCENTILES:
            s = percentile_scale(W0, pct, R)
            Q = gptq_solve(Wp, U, s, R)
            mse = (Wp - Q.float() * s.float()[:, None]).pow(2).mean().item()
            if best is None or mse < best[0]:
                best = (mse, Q, s)
        _, Q, s = best
        return _result(Q[:, invperm], s, R)
    s = _scale(W0, t, diag)
    if awq is None:
        return _result(gptq_solve(Wp, U, s, R)[:, invperm], s, R)
    # AWQ-lite (#1908): the protected groups' columns get s_hi = k std / R_hi inside the same solve.
    starts, size, bits_hi = awq
    R_hi = (1 << (bits_hi - 1)) - 1
    mask = torch.zeros(W0.shape[1], dtype=torch.bool)
    for a in starts:
        mask[a:a + size] = True
    s_hi = sdclip_scale(W0, t.clip_sigmas, R_hi)
    Q = gptq_solve(Wp, U, s, R, protect=mask[perm], scale_hi=s_hi, max_level_hi=R_hi)[:, invperm]
    out = _result(Q, s, R)
    meta = {"scheme": "per_row_awq", "axis": 0, "group_size": size, "starts": list(starts), "scale_hi": s_hi}
    return Quantized(Q, s, meta, dequantize_awq(Q, s, meta), note=f"+awq{bits_hi}:{','.join(map(str, starts))}")


def _scale(w: Tensor, t: Treatment, h_diag: Tensor | None) -> Tensor:
    R = t.max_level
    if t.clip == "sdclip":
        if t.hessian_lambda > 0:
            return hessian_sdclip_scale(w, h_diag, t.clip_sigmas, R, t.hessian_lambda)
        return sdclip_scale(w, t.clip_sigmas, R)
    if t.clip == "gate":
        return gate_scale(w, R)
    if t.clip == "pctsearch":
        raise AssertionError("pctsearch is searched, not a single scale")
    raise PgolfError(f"treatment {t.label!r}: GPTQ needs a per-row scale rule; use sdclip, pctsearch or gate")


def _result(Q: Tensor, s: Tensor, R: int) -> Quantized:
    return Quantized(Q.contiguous(), s.contiguous(), {"scheme": "per_row", "axis": 0},
                     Q.float() * s.float()[:, None])


def _pctsearch_rtn(w: Tensor, R: int) -> tuple[Tensor, Tensor]:
    # GPTQ-lite round to nearest (03-22 #414 `quantize_int6_per_row`).
    best = None
    for pct in PERCENTILES:
        s = percentile_scale(w, pct, R)
        q = round_codes(w, s, R)
        err = (w.float() - q.float() * s.float()[:, None]).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, q, s)
    return best[1], best[2]


def quantize_weight(w: Tensor, t: Treatment, *, hessian: Tensor | None = None,
                    awq: tuple[list[int], int, int] | None = None) -> Quantized:
    """One 2-D weight (rows, cols) under a GPTQ-era treatment -> `Quantized`.

    `t.gptq` runs GPTQ against `hessian` (cols, cols), the input's H = X^T X / N from calibrate.py;
    otherwise the codes are rounded to nearest with the same scale rule. `awq` = (group starts,
    group size, bits) keeps AWQ-lite's columns at higher precision (GPTQ only). A Hessian that is not
    positive definite falls back to round to nearest (as 03-29 did), noted in `note`."""
    if w.ndim != 2:
        raise PgolfError(f"treatment {t.label!r} is per row and needs a 2-D tensor, got shape {tuple(w.shape)}; "
                         "give vectors their own rule or set the plan's `vector` treatment")
    if t.needs_hessian and hessian is None:
        raise PgolfError(f"treatment {t.label!r} needs the tensor's input Hessian but none was collected; set "
                         "quant.calibration=train or generated (calibrate.py)")
    if t.gptq:
        try:
            return _gptq(w, hessian, t, awq)
        except torch.linalg.LinAlgError:
            fallback = quantize_weight(w, Treatment(kind="int", bits=t.bits, clip=t.clip, clip_sigmas=t.clip_sigmas))
            fallback.note = "rtn-fallback (H not positive definite)"
            return fallback
    if t.clip == "pctsearch":
        q, s = _pctsearch_rtn(w, t.max_level)
        return _result(q, s, t.max_level)
    diag = prepare_hessian(hessian)[0] if t.hessian_lambda > 0 else None
    s = _scale(w, t, diag)
    return _result(round_codes(w, s, t.max_level), s, t.max_level)


def dequantize_awq(q: Tensor, s: Tensor, meta: dict) -> Tensor:
    """Codes of an AWQ-lite tensor -> float32: the protected groups' columns use `scale_hi`."""
    out = q.float() * s.float()[:, None]
    size, s_hi = int(meta["group_size"]), meta["scale_hi"].float()[:, None]
    for a in meta["starts"]:
        out[:, a:a + size] = q[:, a:a + size].float() * s_hi
    return out


def awq_candidates(w: Tensor, act_rms: Tensor, group_size: int) -> list[tuple[float, int]]:
    """AWQ-lite's saliency of each contiguous `group_size`-column group (#1908
    `_awq_lite_group_candidates`): score = sum over the group of act_rms_j * mean_i |W_ij|."""
    saliency = act_rms.float() * w.float().abs().mean(dim=0)
    return [(float(saliency[a:a + group_size].sum()), a) for a in range(0, (w.shape[1] // group_size) * group_size,
                                                                         group_size)]
