"""Training length, the LR multiplier as a function of (step, elapsed time), and SWA.

Wall-clock time is an input: with a cap, warmdown starts when the remaining time equals
`warmdown_iters` steps at the average step time so far (the baseline's rule), so the LR
reaches zero exactly when the cap hits, whatever the hardware. Without a cap (0), it is
the classic linear warmdown over the last `warmdown_iters` iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError


@dataclass(frozen=True, kw_only=True)
class Schedule:
    iterations: int = 20000
    warmup_steps: int = 20
    warmdown_iters: int = 1200
    max_wallclock_seconds: float = 600.0
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    train_log_every: int = 200
    swa_every: int = 0
    swa_start_frac: float = 0.4
    qat_start_frac: float = 1.0

    def __post_init__(self):
        for name in ("iterations", "train_batch_tokens", "train_seq_len"):
            if getattr(self, name) <= 0:
                raise PgolfError(f"schedule.{name}={getattr(self, name)} must be positive")
        for name in ("warmup_steps", "warmdown_iters", "max_wallclock_seconds", "swa_every", "train_log_every"):
            if getattr(self, name) < 0:
                raise PgolfError(f"schedule.{name}={getattr(self, name)} must be >= 0")

    def lr_mul(self, step: int, elapsed_ms: float) -> float:
        """LR multiplier in [0, 1] for the step about to run, given train time so far."""
        if self.warmdown_iters <= 0:
            return 1.0
        if self.max_wallclock_seconds <= 0:
            start = max(self.iterations - self.warmdown_iters, 0)
            return max((self.iterations - step) / self.warmdown_iters, 0.0) if start <= step < self.iterations else 1.0
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = self.warmdown_iters * step_ms
        remaining_ms = max(1000.0 * self.max_wallclock_seconds - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0

    def qat_active(self, lr_scale: float) -> bool:
        """Late QAT: fake quantization is on once the LR multiplier falls below qat_start_frac (1.0 = always)."""
        return lr_scale < self.qat_start_frac or self.qat_start_frac >= 1.0

    def swa_due(self, step: int, lr_scale: float) -> bool:
        """SWA (2026-03-20 records): sample after step `step` when scale < start frac and step % every == 0."""
        return self.swa_every > 0 and lr_scale < self.swa_start_frac and step % self.swa_every == 0


class SWA:
    """Running sum of state_dict snapshots on CPU; `average()` is what export uses.

    Sums are kept in fp32 (the record summed bf16 tensors in bf16; identical for fp32 params).
    """

    def __init__(self):
        self.sum: dict[str, Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        state = model.state_dict()
        if self.sum is None:
            self.sum = {k: v.detach().float().cpu().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                self.sum[k] += v.detach().float().cpu()
        self.count += 1

    def average(self, like: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.sum is not None and self.count > 0
        return {k: (v / self.count).to(dtype=like[k].dtype, device=like[k].device) for k, v in self.sum.items()}

    def state_dict(self) -> dict:
        return {"sum": self.sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sum, self.count = state["sum"], state["count"]
