"""pgolf.search on the smoke preset: the greedy procedure keeps what helps, drops what hurts, writes
its trail, continues an interrupted search without re-running, and refuses a bad candidate first."""

from __future__ import annotations

import json

import pytest
import yaml
from runs import FAST

from pgolf.search import combine, main


def test_combine_replaces_a_key_already_in_the_best():
    assert combine(["a=1", "b=2"], ["b=3", "+c=4"]) == ["a=1", "b=3", "+c=4"]


@pytest.mark.slow
def test_greedy_search_keeps_what_helps_and_continues(tmp_path, fast_cache, capsys):
    spec = {"base": [*FAST, fast_cache, "logger=none", "eval.stride=null"], "seeds": [1], "margin": 0.0,
            "candidates": ["schedule.iterations=16",                      # more steps: better
                           ["schedule.iterations=2", "schedule.warmup_steps=0"]]}  # fewer: worse
    cands = tmp_path / "cands.yaml"
    cands.write_text(yaml.safe_dump(spec))
    out = tmp_path / "search"
    assert main([str(cands), "--out", str(out)]) == 0
    trail = json.loads((out / "trail.json").read_text())["trail"]
    assert [t["kept"] for t in trail] == [True, True, False]
    assert trail[1]["mean"] < trail[0]["mean"] and trail[2]["mean"] > trail[1]["mean"]
    assert trail[1]["best_before"] == trail[0]["mean"] and trail[2]["best_before"] == trail[1]["mean"]
    assert trail[2]["overrides"][-2:] == ["schedule.iterations=2", "schedule.warmup_steps=0"]
    assert "schedule.iterations=16" not in trail[2]["overrides"]  # the candidate's key replaced the kept one
    for t in trail:  # each trial's mean is its run's own metrics.json figure
        m = json.loads((out / "runs" / str(t["index"]) / "seed1" / "metrics.json").read_text())
        assert t["values"]["1"] == m["final/quant_sliding_bpb"] == t["mean"]
    md = (out / "trail.md").read_text()
    assert "| 1 | `schedule.iterations=16` |" in md and md.count("| yes |") == 2
    assert (out / "trail.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "trial 2 schedule.iterations=2 schedule.warmup_steps=0" in printed and "dropped" in printed
    # Run again: every run is reused (no file rewritten), the trail is the same.
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed1/metrics.json")}
    assert main([str(cands), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed1/metrics.json")} == stamp
    assert json.loads((out / "trail.json").read_text())["trail"] == trail


def test_a_bad_candidate_is_refused_before_any_run(tmp_path, capsys):
    cands = tmp_path / "cands.yaml"
    cands.write_text(yaml.safe_dump({"base": ["experiment=smoke"], "candidates": ["model.nope=1"]}))
    assert main([str(cands), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: candidate model.nope=1: bad override") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()
    cands.write_text(yaml.safe_dump({"base": ["experiment=smoke"]}))
    assert main([str(cands)]) == 2 and "needs a non-empty `candidates:`" in capsys.readouterr().err
