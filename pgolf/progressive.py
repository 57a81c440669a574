"""Progressive context growth: the training sequence length as a function of the budget fraction.

2026-04-30 #2014 (`R/2026-04-30_SP8192_CaseOps_Progressive3k_ShortDocTTT`, simonbissonnette)
trains its first 10% of the budget at 1024 tokens, then 2048 until 70%, then 3072:
`TRAIN_SEQ_SCHEDULE=1024@0.100,2048@0.700,3072@1.000`. The tokens per step stay 786,432, so a
short context buys more, shorter documents per step early, when the model cannot use long ones.

- **Length** (`parse_train_seq_schedule`, `seq_len_at`; the record's `parse_train_seq_schedule`,
  `current_train_seq_len`): stages `LEN@FRAC` sorted by fraction; at budget fraction f (clamped
  to [0, 1]; the schedule's `frac`: wall clock when capped, else step / iterations) the length is
  that of the first stage with f <= FRAC; a last fraction below 1 extends to 1. Every length
  must divide the tokens of a micro-batch (`schedule.train_batch_tokens / 8`) and be at most
  `schedule.train_seq_len`, the longest context (eval and GPTQ calibration use it).
- **LR re-warm** (`SeqGrowth.advance`; `SEQ_CHANGE_WARMUP_STEPS`, #2014: 32): at a change at step
  s0 > 0 the LR multiplier (after warm-down) is scaled by min((step - s0 + 1) / W, 1) for W
  steps; a second change restarts it.
- **Data**: a length is the longest segment of a packed row under document attention (documents
  longer than it are cut), else the row length. #2014's `DocumentPackingLoader.next_batch`
  flushes its two-deep prefetch queue at a change, and the two micro-batches already prepared
  are never used: `schedule.seq_change_drop_batches=2` reproduces that token stream
  (tests/test_progressive.py against the record's loader); 0 skips nothing.
- **Compile**: one graph per (length, loop-pass count) (`train_shapes`, the record's
  `_compile_warmup_work_items` with `COMPILE_SHAPE_WARMUP=1`), each primed by the warm-up.
"""

from __future__ import annotations

from typing import Any, Callable

from pgolf.errors import PgolfError

Plan = tuple[tuple[float, int], ...]  # ((budget fraction the stage ends at, length), ...), fractions ascending


def parse_train_seq_schedule(text: str, train_seq_len: int) -> Plan:
    """`"1024@0.100,2048@0.700,3072@1.000"` -> ((0.1, 1024), (0.7, 2048), (1.0, 3072)); "" -> one
    stage at `train_seq_len`. Raises PgolfError (one line) on a malformed stage, a length <= 0 or
    above `train_seq_len`, a fraction outside (0, 1]."""
    stages = [s.strip() for s in str(text).split(",") if s.strip()]
    if not stages:
        return ((1.0, int(train_seq_len)),)
    plan = []
    for stage in stages:
        try:
            length, frac = stage.split("@")
            plan.append((float(frac), int(length)))
        except ValueError:
            raise PgolfError(f"schedule.train_seq_schedule stage {stage!r} is not LEN@FRAC; write e.g. "
                             "1024@0.100,2048@0.700,3072@1.000 (#2014)") from None
    for frac, length in plan:
        if not 0.0 < frac <= 1.0 or not 0 < length <= train_seq_len:
            raise PgolfError(f"schedule.train_seq_schedule stage {length}@{frac}: each length must be in "
                             f"(0, schedule.train_seq_len={train_seq_len}] and each fraction in (0, 1]; set "
                             "schedule.train_seq_len to the longest stage")
    plan.sort(key=lambda stage: stage[0])
    if plan[-1][0] < 1.0:
        plan.append((1.0, plan[-1][1]))
    return tuple(plan)


def seq_len_at(plan: Plan, frac: float) -> int:
    """The training length at budget fraction `frac` (the first stage whose end is >= frac)."""
    frac = min(max(frac, 0.0), 1.0)
    return next((length for end, length in plan if frac <= end), plan[-1][1])


def describe_plan(plan: Plan) -> str:
    return ",".join(f"{length}@{end:.3f}" for end, length in plan)


def train_shapes(schedule: Any, num_loops: int) -> list[tuple[int, int]]:
    """The (length, loop-pass count) pairs a run trains at, in the order it reaches them: one
    compiled graph each. Intervals of the budget between switch points decide (the record's
    rule: a stage is plain if it starts before the loop switch, looped if it ends after it);
    with a step-based loop start (`recur_start_step`) every length is paired with both."""
    from pgolf.schedule import loop_passes

    plan = schedule.seq_plan
    if schedule.recur_start_step:
        phases = schedule.loop_phases()
        return list(dict.fromkeys((length, loop_passes(p, num_loops)) for _, length in plan for p in phases))
    cuts = sorted({0.0, 1.0, *(end for end, _ in plan), schedule.enable_looping_at, schedule.loop_phase2_at} - {0.0})
    points = [0.0] + [(a + b) / 2 for a, b in zip([0.0, *cuts], cuts)]  # the start, then each interval's middle
    return list(dict.fromkeys((seq_len_at(plan, f), loop_passes(schedule.loop_phase(f, 0), num_loops))
                              for f in points))


class SeqGrowth:
    """The length the run trains at now and the LR re-warm after a change (state for resume).

    `advance(step, point, log)` is called once per step with the schedule's `Point`: on a change
    it logs `seq_len:A->B step:S frac:F`, drops `drop_batches` micro-batches through `drop`
    (the record's flushed prefetch), starts the re-warm, and returns the LR factor (1 when none)."""

    def __init__(self, schedule: Any, drop: Callable[[int], None] = lambda seq_len: None):
        self.plan, self.warmup_steps = schedule.seq_plan, schedule.seq_change_warmup_steps
        self.drop_batches, self.drop = schedule.seq_change_drop_batches, drop
        self.seq_len = self.plan[0][1]
        self.rewarm_start: int | None = None
        self.switches: list[list[int]] = []  # [step, new length] per change

    @property
    def active(self) -> bool:
        return len({length for _, length in self.plan}) > 1

    def advance(self, step: int, point: Any, log: Callable[[str], None]) -> float:
        if point.seq_len != self.seq_len:
            log(f"seq_len:{self.seq_len}->{point.seq_len} step:{step} frac:{point.frac:.3f}"
                + (f" rewarm_steps:{self.warmup_steps}" if self.warmup_steps and step > 0 else "")
                + (f" dropped_batches:{self.drop_batches}" if self.drop_batches else ""))
            self.seq_len = point.seq_len
            self.switches.append([step, self.seq_len])
            for _ in range(self.drop_batches):
                self.drop(self.seq_len)
            if self.warmup_steps > 0 and step > 0:
                self.rewarm_start = step
        if self.rewarm_start is None:
            return 1.0
        factor = min(max((step - self.rewarm_start + 1) / self.warmup_steps, 0.0), 1.0)
        if factor >= 1.0:
            self.rewarm_start = None
        return factor

    def state_dict(self) -> dict:
        return {"seq_len": self.seq_len, "rewarm_start": self.rewarm_start, "switches": self.switches}

    def load_state_dict(self, state: dict) -> None:
        self.seq_len, self.rewarm_start = int(state["seq_len"]), state["rewarm_start"]
        self.switches = [list(s) for s in state["switches"]]
