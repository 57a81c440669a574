"""`python -m pgolf.submit` on three real smoke runs: the record folder it writes, every refusal
(each must name the run, the value and the fix, and write nothing), and the bundled
train_gpt.py, which must reproduce the runs' metrics with no pgolf importable, in both forms:
the counted two-line script (minified, lzma, base85) and the readable source."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from runs import FAST, tree

import pgolf
from pgolf.errors import PgolfError
from pgolf.submit import bundle
from pgolf.submit.__main__ import main
from pgolf.submit.record import Run, check_runs, read_run

SEEDS = (1, 2, 3)
STEPS = 10
ID = ["--name", "Smoke pair", "--author", "Ada L", "--github-id", "adal"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_cache) -> list[Path]:
    """Three finished short smoke runs that differ only by seed (and run_id); with the optional
    pre-quant sliding eval, so that the bundle must carry it too."""
    root = tmp_path_factory.mktemp("runs")
    for seed in SEEDS:
        cfg = pgolf.compose([*FAST, f"schedule.iterations={STEPS}", "logger=none", fast_cache,
                             "eval.prequant_sliding=true", f"seed={seed}"])
        pgolf.train(cfg, run_dir=root / f"seed{seed}")
    return [root / f"seed{s}" for s in SEEDS]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def copy_run(src: Path, dst: Path, *, metrics_update: dict | None = None, config_update: dict | None = None) -> Path:
    """A copy of a run dir with some metrics.json keys and dotted config.yaml keys replaced."""
    shutil.copytree(src, dst)
    if metrics_update is not None:
        m = json.loads((dst / "metrics.json").read_text())
        (dst / "metrics.json").write_text(json.dumps({**m, **metrics_update}))
    if config_update is not None:
        c = yaml.safe_load((dst / "config.yaml").read_text())
        for dotted, value in config_update.items():
            *groups, key = dotted.split(".")
            node = c
            for g in groups:
                node = node[g]
            node[key] = value
        (dst / "config.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
    return dst


def snapshot(*roots: Path) -> dict:
    """Every file and folder under the roots (files with size and mtime): to assert nothing was written."""
    return {str(r): (tree(r), sorted(str(p) for p in r.rglob("*") if p.is_dir())) for r in roots}


def test_record_folder_holds_the_runs_figures(runs, tmp_path, capsys):
    out = tmp_path / "records/track_10min_16mb/2026-03-21_SmokePair"
    rc = main(["record", *map(str, runs), *ID, "--blurb", "Two seeds of the smoke config.", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "submission.json", "train_gpt.py",
                                                     "train_gpt_readable.py",
                                                     *(f"train_seed{seed}.log" for seed in SEEDS)]
    ms = [metrics(r) for r in runs]
    bpbs = [m["final/quant_sliding_bpb"] for m in ms]
    losses = [m["final/quant_sliding_loss_nats"] for m in ms]
    code = (out / "train_gpt.py").stat().st_size
    sub = json.loads((out / "submission.json").read_text())

    assert list(sub)[:8] == ["name", "author", "github_id", "blurb", "date", "track", "val_loss", "val_bpb"]
    assert (sub["name"], sub["author"], sub["github_id"]) == ("Smoke pair", "Ada L", "adal")
    assert sub["blurb"] == "Two seeds of the smoke config."
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sub["date"])
    assert sub["track"] == "10min_16mb" and "non_record_reason" not in sub
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(bpbs), abs=1e-8)
    assert sub["val_loss"] == pytest.approx(statistics.fmean(losses), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpbs), abs=1e-8)
    assert sub["val_loss_std"] == pytest.approx(statistics.stdev(losses), abs=1e-8)
    assert bpbs[0] != bpbs[1]  # the seeds really differ, so mean and std are not trivially right
    assert sub["bytes_code"] == code == ms[0]["artifact/code_bytes"]  # a run counts the bytes of its bundle
    assert sub["bytes_total"] == max(m["artifact/model_bytes"] for m in ms) + code
    assert sub["seeds"] == list(SEEDS)
    for seed, m in zip(SEEDS, ms):
        assert sub["seed_results"][str(seed)] == {
            "val_loss": round(m["final/quant_sliding_loss_nats"], 8), "val_bpb": round(m["final/quant_sliding_bpb"], 8),
            "bytes_total": m["artifact/model_bytes"] + code, "bytes_model": m["artifact/model_bytes"],
            "steps": m["train/steps"], "train_time_seconds": round(m["train/time_s"], 3),
            "step_avg_ms": round(1000 * m["train/time_s"] / m["train/steps"], 2)}
    assert sub["model_params"] == ms[0]["model/params"] and sub["train_steps"] == STEPS
    assert sub["train_time_seconds"] == round(max(m["train/time_s"] for m in ms), 3)
    assert sub["hardware"] == ms[0]["hardware"]
    assert (sub["eval_method"], sub["eval_stride"], sub["quantization"], sub["compression"]) == (
        "sliding_window", 64, "int8", "zlib-9")

    # The logs are the runs' own; the script is the real bundle of the first run's config.
    for seed, run in zip(SEEDS, runs):
        assert (out / f"train_seed{seed}.log").read_bytes() == (run / "train.log").read_bytes()
    source = (out / "train_gpt.py").read_text()
    compile(source, "train_gpt.py", "exec")
    assert source.count("\n") == 2 and source.startswith("import lzma as L,base64 as B\nexec(")
    assert bundle.write_bundle(runs[0], tmp_path / "again.py").read_text() == source
    readable = (out / "train_gpt_readable.py").read_text()
    assert readable == bundle.write_bundle(runs[0], tmp_path / "plain.py", plain=True).read_text()
    assert len(readable) > 3 * code

    readme = (out / "README.md").read_text()
    for needle in [f"**val_bpb {statistics.fmean(bpbs):.8f}**", f"std {statistics.stdev(bpbs):.8f}",
                   f"| {statistics.stdev(bpbs):.8f} | {statistics.stdev(losses):.8f} |",
                   f"**{sub['bytes_total']:,}**",
                   f"bytes_code (train_gpt.py, minified + lzma + base85): {code:,}; `train_gpt_readable.py` is the "
                   "same code as readable source (not counted)",
                   "SEED=1 torchrun --standalone --nproc_per_node=8 train_gpt.py",
                   "SEED=2 torchrun --standalone --nproc_per_node=8 train_gpt.py",
                   "2 layers x 128 dim, 4 heads / 2 KV heads, MLP 2.0x (hidden 256)",
                   "quantization: preset int8; compression zlib-9", "sliding-window eval, stride 64",
                   "```yaml\nseed: 1\n", "Record submission, track `10min_16mb`"]:
        assert needle in readme, needle
    for seed, m in zip(SEEDS, ms):
        assert (f"| {seed} | {m['final/quant_sliding_bpb']:.8f} | {m['final/quant_sliding_loss_nats']:.8f} | {STEPS} |"
                in readme)
    assert "Non-record" not in readme
    assert f"val_bpb {sub['val_bpb']:.5f}" in captured.out
    assert "warning: hardware is '1xCPU" in captured.err and "seed(s)" not in captured.err


def test_over_time_runs_become_a_non_record_submission_only_when_allowed(runs, tmp_path, capsys):
    slow = [copy_run(r, tmp_path / f"slow{s}", metrics_update={"train/time_s": 700.0 + s, "train/steps": 7000})
            for s, r in zip(SEEDS, runs)]
    out = tmp_path / "records/track_non_record_16mb/2026-03-21_Slow"
    before = snapshot(tmp_path)
    assert main(["record", *map(str, slow), *ID, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {slow[2]}: train/time_s=703.000 exceeds the 10min_16mb track's 600 s (plus one step "
                   f"of {703.0 / 7000:.3f} s); rerun with schedule.max_wallclock_seconds=600, or pass "
                   "--allow-non-record to submit it to the unlimited-compute track\n")
    assert snapshot(tmp_path) == before

    assert main(["record", *map(str, slow), *ID, "--allow-non-record", "--plain", "-o", str(out)]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    assert (out / "train_gpt.py").read_text() == bundle.render(read_run(slow[0]).config)  # the readable source
    assert not (out / "train_gpt_readable.py").exists()
    assert sub["track"] == "non-record-unlimited-compute-16mb"
    assert sub["non_record_reason"] == "unlimited compute: seed 3 trained 703.0 s, over the 10min_16mb track's 600 s"
    assert sub["blurb"].startswith("Non-record (unlimited compute")
    assert sub["train_time_seconds"] == 703.0
    readme = (out / "README.md").read_text()
    assert "**Non-record submission** (unlimited compute: seed 3 trained 703.0 s" in readme
    assert f"bytes_code (train_gpt.py): {sub['bytes_code']:,}\n" in readme


def test_a_capped_run_may_finish_the_step_that_crossed_the_cap(runs):
    """The baseline checks the cap after each step, so a capped run trains a bit past 600 s."""
    run = read_run(runs[0])

    def at(time_s: float) -> Run:
        return Run(run.dir, run.seed, run.config, {**run.metrics, "train/time_s": time_s, "train/steps": 7000}, run.log)

    assert check_runs([at(600.08)], allow_non_record=False) == ("10min_16mb", None)  # step 0.086 s
    with pytest.raises(PgolfError, match="train/time_s=600.100 exceeds"):
        check_runs([at(600.1)], allow_non_record=False)
    assert check_runs([at(590.0)], allow_non_record=True) == (
        "non-record-16mb", "submitted as non-record (--allow-non-record)")


def test_config_falls_back_to_hydra_config(runs, tmp_path):
    run = shutil.copytree(runs[0], tmp_path / "hydra_run")
    (run / ".hydra").mkdir()
    (run / "config.yaml").rename(run / ".hydra/config.yaml")
    assert read_run(run).config == read_run(runs[0]).config


def fixed_size_bundle(run_dir: Path, out: Path, *, plain: bool = False) -> Path:
    out.write_bytes(b"#" * 1000)
    return out


# Each case: (name, a function (runs, tmp_path) -> (run dirs, extra args, expected error line)).
def over_cap(runs, tmp):
    big = copy_run(runs[1], tmp / "big", metrics_update={"artifact/model_bytes": 15_999_001})
    return [runs[0], big], [], (f"{big} (seed 2): total bytes 16,000,001 = model 15,999,001 + code 1,000 exceeds the "
                                "16,000,000-byte cap by 1; shrink the model (fewer parameters, a smaller quant preset)")


def over_cap_non_record(runs, tmp):
    dirs, _, line = over_cap(runs, tmp)
    return dirs, ["--allow-non-record"], line


def over_cap_plain(runs, tmp):
    dirs, _, line = over_cap(runs, tmp)
    return dirs, ["--plain"], line + " or drop --plain"


def config_differs(runs, tmp):
    other = copy_run(runs[1], tmp / "other", config_update={
        "optimizer.matrix_lr": 0.05, "data.cache_dir": "/elsewhere", "run_id": "x", "logger._target_": "y"})
    return [runs[0], other], ["--allow-non-record"], (
        f"{other} differs from {runs[0]} beyond the seed: optimizer.matrix_lr: 0.04 in {runs[0]} vs 0.05; a "
        "submission's seeds must share one config, so rerun them with the same overrides")


def no_metrics(runs, tmp):
    run = shutil.copytree(runs[1], tmp / "nometrics")
    (run / "metrics.json").unlink()
    return [runs[0], run], ["--allow-non-record"], (
        f"{run}: the run is unfinished (no metrics.json); wait for it to finish or leave it out")


def still_running(runs, tmp):
    run = copy_run(runs[1], tmp / "running", metrics_update={"status": "running"})
    return [runs[0], run], [], (f"{run}: the run is unfinished (metrics.json has status 'running'); wait for it to "
                                "finish or leave it out")


def failed(runs, tmp):
    run = tmp / "failed"
    shutil.copytree(runs[1], run)
    (run / "metrics.json").write_text(json.dumps({"status": "failed", "error": "train loss is nan at step 3"}))
    return [runs[0], run], [], f"{run}: the run failed (train loss is nan at step 3); rerun it or leave it out"


def duplicate_seed(runs, tmp):
    twin = shutil.copytree(runs[0], tmp / "twin")
    return [runs[0], runs[1], twin], [], (f"seed 1 appears twice ({runs[0]} and {twin}); each seed counts once, "
                                          "drop one of them")


def output_not_empty(runs, tmp):
    out = tmp / "records/track_10min_16mb/2026-03-21_SmokePair"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    return runs, [], f"-o {out} exists and is not empty; give a new folder or remove it"


def record_into_non_record_track(runs, tmp):
    return runs, ["-o", str(tmp / "records/track_non_record_16mb/x")], (
        f"-o {tmp / 'records/track_non_record_16mb/x'} is under records/track_non_record_16mb but this is a record "
        "submission; use records/track_10min_16mb/x, or pass --allow-non-record")


@pytest.mark.parametrize("case", [over_cap, over_cap_non_record, over_cap_plain, config_differs, no_metrics, still_running, failed,
                                  duplicate_seed, output_not_empty, record_into_non_record_track],
                         ids=lambda f: f.__name__)
def test_refusals_name_the_run_value_and_fix_and_write_nothing(case, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bundle, "write_bundle", fixed_size_bundle)  # every case is refused; none ships a script
    dirs, extra, line = case(runs, tmp_path)
    track = "track_non_record_16mb" if "--allow-non-record" in extra else "track_10min_16mb"
    out = ["-o", str(tmp_path / f"records/{track}/2026-03-21_SmokePair")] if "-o" not in extra else []
    before = snapshot(tmp_path, runs[0].parent)
    assert main(["record", *map(str, dirs), *ID, *out, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {line}\n" and captured.out == ""
    assert snapshot(tmp_path, runs[0].parent) == before


def test_bundle_command_writes_the_script_and_refuses_a_dir_without_config(runs, tmp_path, capsys):
    assert main(["bundle", str(runs[0]), "-o", str(tmp_path)]) == 0
    script = tmp_path / "train_gpt.py"
    assert capsys.readouterr().out == f"wrote {script} ({script.stat().st_size:,} bytes)\n"
    assert script.read_text() == bundle.write_bundle(runs[0], tmp_path / "again.py").read_text()
    assert script.stat().st_size == metrics(runs[0])["artifact/code_bytes"]  # what the run counted
    assert main(["bundle", str(runs[0]), "-o", str(tmp_path / "readable.py"), "--plain"]) == 0
    assert (tmp_path / "readable.py").read_text() == bundle.render(read_run(runs[0]).config)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bundle", str(empty), "-o", str(tmp_path / "x.py")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty}: no config.yaml") and err.count("\n") == 1
    assert not (tmp_path / "x.py").exists()


FINAL = ("final/quant_sliding_bpb", "final/quant_sliding_loss_nats", "final/quant_bpb", "final/quant_loss_nats",
         "final/prequant_bpb", "final/prequant_loss_nats", "final/prequant_sliding_bpb", "final/quant_sliding_gap_bpb")
# Runs a script as `python train_gpt.py` would, with every pgolf import made to fail.
NO_PGOLF = "import runpy, sys; sys.modules['pgolf'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def run_script(script: Path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_PGOLF, str(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


@pytest.mark.slow
@pytest.mark.parametrize("plain", [True, False], ids=["plain", "counted"])
def test_the_bundle_reproduces_the_run_of_its_seed(runs, tmp_path, plain):
    index = 0 if plain else 1  # the script's SEED picks the run; its default is the first run's seed
    script = bundle.write_bundle(runs[0], tmp_path / "train_gpt.py", plain=plain)
    r = run_script(script, tmp_path, {"SEED": str(SEEDS[index]), "RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = metrics(tmp_path / "run"), metrics(runs[index])
    assert got["train/steps"] == want["train/steps"] == STEPS
    for key in FINAL:
        assert abs(got[key] - want[key]) <= 1e-6, key
    assert got["artifact/model_bytes"] == want["artifact/model_bytes"]
    assert got["artifact/code_bytes"] == script.stat().st_size
    assert f"env overrides: SEED={SEEDS[index]}" in r.stdout


def test_the_bundle_imports_only_the_allowed_packages(runs, tmp_path):
    source = bundle.write_bundle(runs[0], tmp_path / "train_gpt.py", plain=True).read_text()
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    # FlashAttention is optional (model/docs.py imports it under try/except ImportError); so are the
    # compressors' packages: brotli under try/except ImportError, zpaq inside the per-group back end.
    optional = {"zstandard", "flash_attn_interface", "flash_attn", "brotli", "zpaq"}
    assert roots - set(sys.stdlib_module_names) - optional == {"torch", "numpy", "sentencepiece"}
    assert "pgolf.data.prepare is not part of this bundled script" in source  # the one unused path
    counted = bundle.write_bundle(runs[0], tmp_path / "counted.py").read_text()
    assert counted.count("\n") == 2 and len(counted) < len(source) / 3
    assert "class BigramHash" not in source and "class DocumentPackingLoader" not in source  # parts left out


def test_the_bundle_rejects_a_bad_environment_value(runs, tmp_path):
    script = bundle.write_bundle(runs[0], tmp_path / "train_gpt.py")
    r = run_script(script, tmp_path, {"ITERATIONS": "ten"})
    assert r.returncode == 2
    assert r.stderr == f"error: ITERATIONS='ten' is not a int; e.g. ITERATIONS={STEPS}\n"
    # An option whose other values need code the bundle left out cannot be switched from outside.
    r = run_script(script, tmp_path, {"SMEAR_GATE": "token"})
    assert r.returncode == 2
    assert r.stderr == ("error: model.embeddings.smear_gate='token': this script was bundled for model.embeddings.smear_gate='none' and "
                        "left out the code other values use; bundle a run with that setting (python -m pgolf.submit "
                        "bundle RUN_DIR)\n")
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_the_bundle_runs_under_torchrun(runs, tmp_path):
    script = bundle.write_bundle(runs[0], tmp_path / "train_gpt.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ITERATIONS": "4", "WARMUP_STEPS": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs").iterdir()  # logs/<run_id>, one directory shared by both ranks
    m = metrics(run_dir)
    assert (m["world_size"], m["train/steps"], m["train/ranks_identical"]) == (2, 4, True)
    assert m["artifact/code_bytes"] == script.stat().st_size
