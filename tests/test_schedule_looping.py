"""The schedule owns when depth recurrence switches on (issue 18 item 4); the model owns which
layers loop. `Schedule.at` returns the loop phase in its `Point`, the trainer turns it into the
model's extra passes, and the records' environment names still set it in a bundled script."""

from __future__ import annotations

import pytest

import pgolf
from pgolf.errors import PgolfError
from pgolf.schedule import LOOP_ALL, LOOP_FIRST, LOOP_OFF, Schedule, loop_passes
from pgolf.submit.entry import apply_env


def test_point_carries_the_loop_phase_of_each_form():
    # 2026-04-06 #1412: one extra pass from 50%, all from 65% (frac = step / iterations without a cap)
    progressive = Schedule(iterations=100, max_wallclock_seconds=0, enable_looping_at=0.5, loop_phase2_at=0.65)
    assert [progressive.at(s, 0.0).loop_phase for s in (0, 49, 50, 64, 65, 99)] == \
        [LOOP_OFF, LOOP_OFF, LOOP_FIRST, LOOP_FIRST, LOOP_ALL, LOOP_ALL]
    # wall clock when capped: 35% of 600 s (2026-04-09 #1493 on)
    capped = Schedule(enable_looping_at=0.35)
    assert [capped.at(10_000, ms).loop_phase for ms in (0.0, 209_999.0, 210_000.0)] == [LOOP_OFF, LOOP_OFF, LOOP_ALL]
    # 2026-03-31 #1204: a training step, whatever the fraction
    by_step = Schedule(recur_start_step=3000)
    assert [by_step.at(s, ms).loop_phase for s, ms in ((2999, 590_000.0), (3000, 1.0))] == [LOOP_OFF, LOOP_ALL]
    assert by_step.loop_phase(0.0, None) == LOOP_ALL  # the end of training
    assert Schedule().at(0, 0.0).loop_phase == LOOP_ALL  # no switch: a looping model loops from the start


def test_phases_become_the_models_passes_and_the_warmup_visits_each():
    assert [loop_passes(p, 2) for p in (LOOP_OFF, LOOP_FIRST, LOOP_ALL)] == [0, 1, 2]
    assert [loop_passes(p, 0) for p in (LOOP_OFF, LOOP_FIRST, LOOP_ALL)] == [0, 0, 0]
    assert Schedule(enable_looping_at=0.5, loop_phase2_at=0.65).loop_phases() == [LOOP_OFF, LOOP_FIRST, LOOP_ALL]
    assert Schedule(recur_start_step=3000).loop_phases() == [LOOP_OFF, LOOP_ALL]
    assert Schedule().loop_phases() == [LOOP_ALL]


@pytest.mark.parametrize("override,msg", [
    ("schedule.enable_looping_at=1.5", "schedule.enable_looping_at=1.5"),
    ("schedule.loop_phase2_at=-0.1", "schedule.loop_phase2_at=-0.1"),
    ("schedule.recur_start_step=-1", "schedule.recur_start_step=-1"),
])
def test_bad_switch_times_fail_at_compose_with_one_line(override, msg):
    with pytest.raises(PgolfError, match=msg) as err:
        pgolf.compose([override])
    assert "\n" not in str(err.value)


def test_two_start_forms_or_a_phase2_before_the_start_are_rejected():
    with pytest.raises(PgolfError, match="alternative to schedule.enable_looping_at"):
        Schedule(recur_start_step=10, enable_looping_at=0.5)
    with pytest.raises(PgolfError, match="schedule.loop_phase2_at=0.3 must be >= schedule.enable_looping_at=0.5"):
        Schedule(enable_looping_at=0.5, loop_phase2_at=0.3)


def test_the_records_environment_names_still_set_the_switch_times():
    """A bundled train_gpt.py reads ENABLE_LOOPING_AT, LOOP_PHASE2_AT, RECUR_START_STEP as the
    records do; they now land in the schedule."""
    config = pgolf.build.to_container(pgolf.compose(["experiment=record_0406_pr1412_progrecur"]))
    applied = apply_env(config, {"ENABLE_LOOPING_AT": "0.4", "LOOP_PHASE2_AT": "0.7", "RECUR_START_STEP": "0"})
    assert sorted(applied) == ["ENABLE_LOOPING_AT=0.4", "LOOP_PHASE2_AT=0.7", "RECUR_START_STEP=0"]
    assert (config["schedule"]["enable_looping_at"], config["schedule"]["loop_phase2_at"]) == (0.4, 0.7)
    assert "enable_looping_at" not in config["model"]
