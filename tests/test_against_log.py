"""`python -m pgolf.report --against-log`: both record log formats and pgolf's own, hand-written lines."""

from __future__ import annotations

import json

import pytest

from pgolf.report.__main__ import main
from pgolf.report.against_log import compare_logs, parse_log

# The March records' format (and pgolf's): `step:S/N train_loss:X ...`, `step:S/N val_loss:X val_bpb:Y ...`.
MARCH = """world_size:8 grad_accum_steps:1
warmup_step:1/20
step:0/9000 val_loss:6.9000 val_bpb:4.1000 train_time:0ms step_avg:0.01ms
step:100/9000 train_loss:3.0000 train_time:8000ms step_avg:80.00ms
step:200/9000 train_loss:2.6000 train_time:16000ms step_avg:80.00ms
step:200/9000 val_loss:2.5000 val_bpb:1.5000 train_time:16000ms step_avg:80.00ms
step:300/9000 train_loss:2.4000 train_time:24000ms step_avg:80.00ms
DIAGNOSTIC post_ema val_loss:2.4000 val_bpb:1.4200 eval_time:1971ms
final_int6_sliding_window_exact val_loss:2.38000000 val_bpb:1.41000000
"""
# The April records' format (#1394's logger): `S/N train_loss: X train_time: Tm tok/s: R`.
APRIL = """  grad_accum_steps: 1
0/20000 val_loss: 9.0000 val_bpb: 3.5000
100/20000 train_loss: 3.0000 train_time: 0.1m tok/s: 8000000
200/20000 train_loss: 2.8000 train_time: 0.2m tok/s: 8000000
300/20000 train_loss: 2.6000 train_time: 0.3m tok/s: 8000000
300/20000 val_loss: 2.7000 val_bpb: 1.1000
quantized_ttt val_loss:2.79241542 val_bpb:1.08103103 eval_time:368074ms
"""
# A pgolf train.log logging every 50 steps.
RUN = """run_dir:outputs/x
step:0/300 val_loss:6.9100 val_bpb:4.1100 train_time:0ms step_avg:0.00ms
step:100/300 train_loss:3.0100 train_time:800ms step_avg:8.00ms lr_scale:1.0000 wd_mul:1.0000
step:150/300 train_loss:2.8100 train_time:1200ms step_avg:8.00ms lr_scale:1.0000 wd_mul:1.0000
step:200/300 train_loss:2.7000 train_time:1600ms step_avg:8.00ms lr_scale:1.0000 wd_mul:1.0000
step:200/300 val_loss:2.5100 val_bpb:1.5100 train_time:1600ms step_avg:8.00ms
step:300/300 train_loss:2.4100 train_time:2400ms step_avg:8.00ms lr_scale:1.0000 wd_mul:1.0000
final_quant_sliding val_loss:2.39000000 val_bpb:1.41500000 stride:64 eval_time:1000ms
"""


def test_both_record_formats_parse():
    m, a = parse_log(MARCH), parse_log(APRIL)
    assert m.train == {100: 3.0, 200: 2.6, 300: 2.4} and m.val == {0: (6.9, 4.1), 200: (2.5, 1.5)}
    assert m.finals == {"DIAGNOSTIC post_ema": (2.4, 1.42), "final_int6_sliding_window_exact": (2.38, 1.41)}
    assert a.train == {100: 3.0, 200: 2.8, 300: 2.6} and a.val == {0: (9.0, 3.5), 300: (2.7, 1.1)}
    assert a.finals == {"quantized_ttt": (2.79241542, 1.08103103)}


def test_first_divergence_on_interpolated_steps(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").write_text(RUN)
    (tmp_path / "record.log").write_text(MARCH)
    cmp = compare_logs(tmp_path / "record.log", tmp_path / "run", tol_loss=0.05, tol_bpb=0.02)
    rows = {r["step"]: r for r in cmp["train_loss"]}
    assert rows[150]["record"] == pytest.approx(2.8) and not rows[150]["exact"]  # halfway between 3.0 and 2.6
    assert rows[100]["diff"] == pytest.approx(0.01) and rows[100]["exact"]
    assert cmp["first_divergence"] == {"train_loss": 200, "val_bpb": None}    # 2.70 vs 2.60 at step 200
    assert cmp["finals"]["run"] == {"final_quant_sliding": (2.39, 1.415)}


def test_cli_writes_table_and_png_and_refuses_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text(RUN)
    (tmp_path / "record.log").write_text(APRIL)
    assert main(["--against-log", str(tmp_path / "record.log"), str(run), "--tol-loss", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "more than 0.5: never" in out and "val_bpb differs by more than 0.02: step 0" in out
    assert (run / "against_log.png").read_bytes()[:4] == b"\x89PNG"
    js = json.loads((run / "against_log.json").read_text())
    assert js["first_divergence"] == {"train_loss": None, "val_bpb": 0}
    assert "| 150 | 2.8100 | 2.9000 | -0.0900 |  |" in (run / "against_log.md").read_text()
    (tmp_path / "empty.log").write_text("nothing here\n")
    cases = [([str(tmp_path / "nope.log"), str(run)], "no such file"),
             ([str(tmp_path / "empty.log"), str(run)], "no train_loss or val_bpb"),
             ([str(tmp_path / "record.log"), str(tmp_path / "nope")], "no train.log there"),
             ([str(tmp_path / "record.log"), str(run), str(run)], "takes one RUN_DIR")]
    for (log, *dirs), expect in cases:
        assert main(["--against-log", log, *dirs]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expect in err and err.count("\n") == 1
