"""Training length and every switch that depends on it, as functions of (step, elapsed time).

`Schedule.at(step, elapsed_ms)` is the one place the loop asks "where are we": it returns a
`Point` with the training fraction, the LR multiplier, the Muon WD multiplier and the
switches (late QAT, EMA window, the depth-recurrence loop phase, the training sequence length of
progressive context growth, pgolf/progressive.py). Wall-clock time is an input,
so a run ends its warm-down when its time budget ends, whatever the hardware. The model keeps
which layers loop and how (`model.recurrence.num_loops`, `loop_start`, `loop_end`); the schedule says when:
`enable_looping_at` / `loop_phase2_at` (fractions of the budget, 2026-04-05 #1394, progressive
2026-04-06 #1412) or `recur_start_step` (a training step, 2026-03-31 #1204).

Two warm-down forms (the records' own):
- `warmdown_iters` (<= 2026-03-31): with a wall-clock cap, warm-down starts when the remaining
  time equals `warmdown_iters` steps at the average step time so far; without one (0), it is
  linear over the last `warmdown_iters` iterations.
- `warmdown_frac` (2026-04-01 #1218 onward; takes precedence when > 0): f = elapsed /
  (max_wallclock - gptq_reserve) (or step / iterations without a cap); lr = 1 until
  f >= 1 - w, then max((1 - f) / w, min_lr). `min_lr` is the floor of #1787.
The budget is shortened by `gptq_reserve_seconds` (#1060 onward) so that GPTQ calibration,
which reads training data, happens inside the 600 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.progressive import describe_plan, parse_train_seq_schedule, seq_len_at


# Depth-recurrence phases (Point.loop_phase): no extra pass, one extra pass (#1412's first
# phase), all of the model's `num_loops` extra passes.
LOOP_OFF, LOOP_FIRST, LOOP_ALL = 0, 1, 2


def loop_passes(phase: int, num_loops: int) -> int:
    """Extra passes a model with `num_loops` runs in loop phase `phase` (what `GPT.set_looping` takes)."""
    return {LOOP_OFF: 0, LOOP_FIRST: min(1, num_loops), LOOP_ALL: num_loops}[phase]


@dataclass(frozen=True)
class Point:
    """The schedule at one step: `frac` of the training budget used (>= 0; 1 = budget spent),
    the LR multiplier, the Muon weight-decay multiplier (WD taper), the switch states and the
    depth-recurrence phase (LOOP_OFF / LOOP_FIRST / LOOP_ALL)."""

    frac: float
    lr_mul: float
    wd_mul: float
    qat: bool
    ema: bool
    loop_phase: int = field(default=LOOP_ALL)
    seq_len: int = 0  # the training sequence length (pgolf.progressive; the whole run's without a schedule)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    iterations: int = 20000
    warmup_steps: int = 20
    warmdown_iters: int = 1200
    warmdown_frac: float = 0.0
    min_lr: float = 0.0
    max_wallclock_seconds: float = 600.0
    gptq_reserve_seconds: float = 0.0
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    train_log_every: int = 200
    swa_every: int = 0
    swa_start_frac: float = 0.4
    ema_decay: float = 0.0
    ema_start_frac: float = 0.0
    qat_start_frac: float = 1.0
    wd_taper_start_frac: float = 1.0
    wd_taper_final_mult: float = 1.0
    enable_looping_at: float = 0.0
    loop_phase2_at: float = 0.0
    recur_start_step: int = 0
    train_seq_schedule: str = ""  # progressive context (#2014): "1024@0.100,2048@0.700,3072@1.000"
    seq_change_warmup_steps: int = 0  # LR re-warm after each length change (#2014: 32)
    seq_change_drop_batches: int = 0  # micro-batches dropped at a change (#2014's flushed prefetch: 2)

    def __post_init__(self):
        for name in ("iterations", "train_batch_tokens", "train_seq_len"):
            if getattr(self, name) <= 0:
                raise PgolfError(f"schedule.{name}={getattr(self, name)} must be positive")
        for name in ("warmup_steps", "warmdown_iters", "max_wallclock_seconds", "swa_every", "train_log_every",
                     "gptq_reserve_seconds", "wd_taper_final_mult", "seq_change_warmup_steps",
                     "seq_change_drop_batches"):
            if getattr(self, name) < 0:
                raise PgolfError(f"schedule.{name}={getattr(self, name)} must be >= 0")
        for name in ("warmdown_frac", "min_lr", "ema_start_frac", "wd_taper_start_frac", "enable_looping_at",
                     "loop_phase2_at"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PgolfError(f"schedule.{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise PgolfError(f"schedule.ema_decay={self.ema_decay} must be in [0, 1) "
                             "(0 = no EMA; records 0.997, 0.9965)")
        if self.ema_decay > 0 and self.swa_every > 0:
            raise PgolfError("schedule.ema_decay and schedule.swa_every are both set; only one average can be exported "
                             "(the records after 2026-03-20 use EMA): set swa_every=0 or ema_decay=0")
        if self.loop_phase2_at and self.loop_phase2_at < self.enable_looping_at:
            raise PgolfError(f"schedule.loop_phase2_at={self.loop_phase2_at} must be >= "
                             f"schedule.enable_looping_at={self.enable_looping_at}")
        if self.recur_start_step < 0 or (self.recur_start_step and self.enable_looping_at):
            raise PgolfError(f"schedule.recur_start_step={self.recur_start_step} must be >= 0 (0 = start at "
                             "schedule.enable_looping_at) and is an alternative to schedule.enable_looping_at: "
                             "set one of them")
        if self.max_wallclock_seconds > 0 and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise PgolfError(f"schedule.gptq_reserve_seconds={self.gptq_reserve_seconds} leaves no training time of "
                             f"max_wallclock_seconds={self.max_wallclock_seconds}; lower it")
        object.__setattr__(self, "seq_plan", parse_train_seq_schedule(self.train_seq_schedule, self.train_seq_len))

    @property
    def seq_lens(self) -> list[int]:
        """Every training length of the run, in order (one without a train_seq_schedule)."""
        return list(dict.fromkeys(length for _, length in self.seq_plan))

    @property
    def budget_ms(self) -> float:
        """Training time in ms before the loop stops (0 = no cap): the cap minus the GPTQ reserve."""
        if self.max_wallclock_seconds <= 0:
            return 0.0
        return 1000.0 * (self.max_wallclock_seconds - self.gptq_reserve_seconds)

    def frac(self, step: int, elapsed_ms: float) -> float:
        """Fraction of the budget used: elapsed / budget with a cap, else step / iterations (the
        records' `training_frac`)."""
        return elapsed_ms / max(self.budget_ms, 1e-9) if self.budget_ms > 0 else step / max(self.iterations, 1)

    def lr_mul(self, step: int, elapsed_ms: float) -> float:
        """LR multiplier for the step about to run, given train time so far."""
        if self.warmdown_frac > 0:
            f, w = self.frac(step, elapsed_ms), self.warmdown_frac
            return max((1.0 - f) / w, self.min_lr) if f >= 1.0 - w else 1.0
        if self.warmdown_iters <= 0:
            return 1.0
        if self.budget_ms <= 0:
            start = max(self.iterations - self.warmdown_iters, 0)
            mul = max((self.iterations - step) / self.warmdown_iters, 0.0) if start <= step < self.iterations else 1.0
        else:
            warmdown_ms = self.warmdown_iters * elapsed_ms / max(step, 1)
            remaining_ms = max(self.budget_ms - elapsed_ms, 0.0)
            mul = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
        return max(mul, self.min_lr) if mul < 1.0 else mul

    def wd_mul(self, frac: float) -> float:
        """Muon WD taper (#1729): 1 until `wd_taper_start_frac`, then linear to `wd_taper_final_mult` at f=1."""
        start = self.wd_taper_start_frac
        if frac <= start or start >= 1.0:
            return 1.0
        progress = min((frac - start) / (1.0 - start), 1.0)
        return 1.0 + (self.wd_taper_final_mult - 1.0) * progress

    def qat_active(self, lr_scale: float) -> bool:
        """Late QAT: fake quantization is on once the LR multiplier falls below qat_start_frac (1.0 = always)."""
        return lr_scale < self.qat_start_frac or self.qat_start_frac >= 1.0

    def swa_due(self, step: int, lr_scale: float) -> bool:
        """SWA (2026-03-20 records): sample after step `step` when scale < start frac and step % every == 0."""
        return self.swa_every > 0 and lr_scale < self.swa_start_frac and step % self.swa_every == 0

    def loop_phase(self, frac: float, step: int | None = None) -> int:
        """Depth-recurrence phase at budget fraction `frac` (and training step `step`; None = the end
        of training): off before enable_looping_at, one extra pass before loop_phase2_at (#1412),
        then all. With recur_start_step (#1204's RECUR_START_STEP) the start is that step instead."""
        if self.recur_start_step:
            return LOOP_ALL if step is None or step >= self.recur_start_step else LOOP_OFF
        if frac < self.enable_looping_at:
            return LOOP_OFF
        if self.loop_phase2_at and frac < self.loop_phase2_at:
            return LOOP_FIRST
        return LOOP_ALL

    def loop_phases(self) -> list[int]:
        """Every phase a run goes through, in order (the warm-up compiles each one's layer sequence)."""
        return sorted({self.loop_phase(f, s) for f, s in
                       ((0.0, 0), (self.enable_looping_at, 0), (self.loop_phase2_at, 0), (1.0, None))})

    def at(self, step: int, elapsed_ms: float) -> Point:
        """Everything the loop switches on before running step `step` (0-based) at `elapsed_ms` of train time."""
        f = self.frac(step, elapsed_ms)
        lr = self.lr_mul(step, elapsed_ms)
        return Point(frac=f, lr_mul=lr, wd_mul=self.wd_mul(f), qat=self.qat_active(lr),
                     ema=self.ema_decay > 0 and f >= self.ema_start_frac, loop_phase=self.loop_phase(f, step),
                     seq_len=seq_len_at(self.seq_plan, f))

    def describe(self) -> str:
        """One log line naming the schedule options in effect."""
        form = (f"warmdown_frac:{self.warmdown_frac}" if self.warmdown_frac > 0
                else f"warmdown_iters:{self.warmdown_iters}")
        return (f"schedule: {form} min_lr:{self.min_lr} budget_ms:{self.budget_ms:.0f} "
                f"gptq_reserve_seconds:{self.gptq_reserve_seconds} ema_decay:{self.ema_decay} "
                f"swa_every:{self.swa_every} qat_start_frac:{self.qat_start_frac} "
                f"wd_taper:{self.wd_taper_start_frac}->x{self.wd_taper_final_mult}"
                + (f" recur_start_step:{self.recur_start_step}" if self.recur_start_step else
                   f" enable_looping_at:{self.enable_looping_at} loop_phase2_at:{self.loop_phase2_at}"
                   if self.enable_looping_at or self.loop_phase2_at else "")
                + (f" train_seq_schedule:{describe_plan(self.seq_plan)} seq_change_warmup_steps:"
                   f"{self.seq_change_warmup_steps} seq_change_drop_batches:{self.seq_change_drop_batches}"
                   if len(self.seq_lens) > 1 else ""))


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


class EMA:
    """Exponential moving average of the whole state_dict (2026-03-20 #287, 1.1271; all later records).

    An fp32 shadow on the model's device, updated after every optimizer step:
    ema <- d * ema + (1 - d) * theta. `average(like)` casts it back to the model's dtypes; the
    trainer loads it before export, so the averaged weights are what gets quantized and scored.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.shadow: dict[str, Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        if self.shadow is None:  # the records start the shadow from the initial weights (after warm-up restore)
            self.shadow = {k: v.detach().float().clone() for k, v in state.items()}
        for k, v in state.items():
            self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
        self.count += 1

    @torch.no_grad()
    def start(self, model: nn.Module) -> None:
        """Begin the shadow at the current weights (the records do this before the first step)."""
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def average(self, like: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self.shadow is not None
        return {k: v.to(dtype=like[k].dtype, device=like[k].device) for k, v in self.shadow.items()}

    def state_dict(self) -> dict:
        return {"shadow": None if self.shadow is None else {k: v.cpu() for k, v in self.shadow.items()},
                "count": self.count}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        shadow = state["shadow"]
        self.shadow = None if shadow is None else {k: v.to(device) for k, v in shadow.items()}
        self.count = state["count"]
