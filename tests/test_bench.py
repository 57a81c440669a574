"""`python -m pgolf.bench` measures a config and a comparison in one process."""

from __future__ import annotations

import json

from pgolf.bench import main


def test_bench_prints_table_and_ratios(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    assert main(["experiment=smoke", "--compare", "experiment=smoke model.mlp_mult=3.0", "--steps", "2",
                 "--warmup", "1", "--eval-windows", "8", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "train step (median)" in table and "sliding eval tokens/s" in table and "x" in table
    out = json.loads(out_json.read_text())
    a, b = out["results"]
    assert b["params"] > a["params"] and a["step_ms"] > 0 and a["artifact_model_bytes"] > 0
    assert out["ratios"]["step_ms"] == b["step_ms"] / a["step_ms"]
    assert a["projected_steps_in_cap"] == "no cap"


def test_bench_bad_override_is_one_line(capsys):
    assert main(["model.num_heads=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.model_dim=512 is not divisible")
