"""The bad-input table of docs/bad-input.md, row by row, through `python run.py` as a user types it.

Every row must give one `error: ...` line naming the value and the fix, exit 2, and leave
nothing half-done: a config error leaves no directory at all; an error found inside the
job (data, tokenizer, rules against the real model) leaves only the run's config, log and
`metrics.json` = {"status": "failed", ...}, never a model, artifact or checkpoint. The one
row that can go on (an artifact over the cap) finishes with a warning line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from runs import FAST, metrics, run_py

import pgolf
from pgolf.build import build
from pgolf.data.shards import write_shard

JOB = [*FAST, "logger=none", "hydra.run.dir=run"]


@pytest.fixture(scope="module")
def shards(fast_cache, tmp_path_factory) -> Path:
    """A pre-built dataset folder (the challenge layout), copied from the shared small dataset."""
    built = build(pgolf.compose([*FAST, fast_cache]), "data").ensure()
    out = tmp_path_factory.mktemp("prebuilt")
    for f in [*Path(built.train_pattern).parent.glob("fineweb_*.bin"), Path(built.tokenizer_path)]:
        shutil.copy(f, out / f.name)
    return out


def prebuilt(folder: Path) -> list[str]:
    """Overrides that point the challenge's data group at `folder` (replacing FAST's data option)."""
    return ["data=fineweb_sp1024", f"data.data_path={folder}", f"data.tokenizer_path={folder / 'tokenizer.model'}"]


def damaged(shards: Path, tmp: Path, how: str) -> tuple[list[str], Path]:
    folder = shutil.copytree(shards, tmp / "data")
    val = next(folder.glob("fineweb_val_*.bin"))
    raw = bytearray(val.read_bytes())
    if how == "header":
        raw[0:4] = (123).to_bytes(4, "little")
    else:
        del raw[-10:]
    val.write_bytes(bytes(raw))
    return prebuilt(folder), val


# Rows the config check refuses before Hydra makes a directory: (args, the whole stderr line).
CONFIG_ROWS = {
    "unknown override": (["model.foo=1"], "error: bad override: Could not override 'model.foo'. To append to your "
                                          "config use +model.foo=1"),
    "unknown key": (["+model.foo=1"], "error: model.foo is not an option of model (pgolf.model.GPT); known: "),
    "wrong type": (["model.num_layers=abc"], "error: model.num_layers='abc' has the wrong type: expected int"),
    "inconsistent shape": (["model.num_heads=7"], "error: model.model_dim=512 is not divisible by model.num_heads=7; "
                                                  "pick num_heads among [1, 2, 4, 8, 16, 32]"),
    "missing data": ([], "error: {cwd}/data/datasets/fineweb10B_sp1024/fineweb_train_*.bin: no shards found; run "
                         "`python -m pgolf.data download --variant sp1024 --train-shards 10` (or use data=stdlib for "
                         "a run with no download)"),
    "stride 0": (["experiment=smoke", "eval.stride=0"], "error: eval.stride=0 must be in 1..128 (the eval seq_len); use "
                                                        "e.g. eval.stride=64 (the records use 64), or null for no overlap"),
    "stride > seq_len": (["experiment=smoke", "eval.stride=200"], "error: eval.stride=200 must be in 1..128 (the eval "
                                                                  "seq_len); use e.g. eval.stride=64 (the records use "
                                                                  "64), or null for no overlap"),
}


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=str)
def test_config_rows_write_nothing(row, tmp_path):
    args, line = CONFIG_ROWS[row]
    r = run_py(args, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(line.format(cwd=tmp_path)) and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def job_rows(shards: Path, tmp: Path, cache: str) -> dict[str, tuple[list[str], str]]:
    header, bad_header = damaged(shards, tmp / "h", "header")
    cut, truncated = damaged(shards, tmp / "t", "truncate")
    return {
        "corrupt shard header": (header, f"error: {bad_header}: bad shard magic 123 (expected 20240520); "),
        "truncated shard": (cut, f"error: {truncated}: file is {truncated.stat().st_size} bytes but its header says "),
        "tokenizer vocab mismatch": ([cache, "model.vocab_size=512"], "error: model.vocab_size=512 does not match the "
                                     "tokenizer "),
        "seq_len > validation": ([cache, "eval.seq_len=1000000", "eval.stride=64"], "error: validation split "),
        "quant rule matches nothing": ([cache, "quant.rules=[[nothing_here,int6]]"],
                                       "error: quant rule pattern 'nothing_here' matches no parameter (have: "),
    }


@pytest.mark.parametrize("row", ["corrupt shard header", "truncated shard", "tokenizer vocab mismatch",
                                 "seq_len > validation", "quant rule matches nothing"])
def test_job_rows_leave_only_a_failure_record(row, shards, fast_cache, tmp_path):
    args, line = job_rows(shards, tmp_path, fast_cache)[row]
    job = [a for a in JOB if not a.startswith("data.")] if "data=fineweb_sp1024" in args else JOB
    r = run_py([*job, *args], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(line) and r.stderr.count("error:") == 1, r.stderr[-2000:]
    run = tmp_path / "run"
    assert metrics(run) == {"status": "failed", "error": last.removeprefix("error: ")}
    assert sorted(p.name for p in run.iterdir()) <= [".hydra", "config.yaml", "metrics.json", "train.log"]


def replaced(shards: Path, tmp: Path, split: str, contents: list[list[int]],
             keep: bool = False) -> tuple[list[str], Path]:
    """A copy of the dataset whose `split` shards are `contents` (kept beside the old ones with keep=True)."""
    folder = shutil.copytree(shards, tmp / "data")
    if not keep:
        for f in folder.glob(f"fineweb_{split}_*.bin"):
            f.unlink()
    for i, tokens in enumerate(contents):
        write_shard(folder / f"fineweb_{split}_{900 + i:06d}.bin", np.array(tokens, dtype=np.int64))
    return prebuilt(folder), folder


# Shard contents the header check does not see: (split, shards, keep the others, the whole line but the folder).
CONTENT_ROWS = {
    "an empty train shard": ("train", [[]], True, "error: {d}/fineweb_train_000900.bin (one of the 8 shards of "
                             "{d}/fineweb_train_*.bin) holds no tokens; delete it or re-create the shards with `python "
                             "-m pgolf.data prepare ...`"),
    "all train shards empty": ("train", [[], []], False, "error: {d}/fineweb_train_000900.bin (one of the 2 shards of "
                               "{d}/fineweb_train_*.bin) holds no tokens; delete it or re-create the shards with "
                               "`python -m pgolf.data prepare ...`"),
    "train token id >= vocab": ("train", [[5] * 999 + [1500]], False, "error: {d}/fineweb_train_000900.bin: token id "
                                "1500 is not below vocab_size=1024; these tokens were made with another tokenizer: use "
                                "its data.tokenizer_path and model.vocab_size, or re-create the shards"),
    "validation token id >= vocab": ("val", [[5] * 999 + [4000]], False, "error: validation split "
                                     "{d}/fineweb_val_[0-9]*.bin: token id 4000 is not below vocab_size=1024; these tokens "
                                     "were made with another tokenizer: use its data.tokenizer_path and "
                                     "model.vocab_size, or re-create the shards"),
    "too few train tokens": ("train", [list(range(2, 102))], False, "error: train shards {d}/fineweb_train_*.bin hold "
                             "100 tokens, fewer than one micro-batch reads (1 x 513); add training data or lower "
                             "schedule.train_batch_tokens"),
    "validation without bytes": ("val", [[1] * 300], False, "error: the validation split's 256 targets decode to no "
                                 "bytes (only control tokens such as BOS); bpb is undefined: check that the shards were "
                                 "made with this tokenizer"),
}


@pytest.mark.parametrize("row", CONTENT_ROWS, ids=str)
def test_shard_content_rows_stop_before_training(row, shards, tmp_path):
    split, contents, keep, line = CONTENT_ROWS[row]
    args, folder = replaced(shards, tmp_path, split, contents, keep)
    r = run_py([*[a for a in JOB if not a.startswith("data.")], *args], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == line.format(d=folder) and r.stderr.count("error:") == 1, r.stderr
    assert "train_loss" not in r.stdout and "warmup_step" not in r.stdout
    run = tmp_path / "run"
    assert metrics(run) == {"status": "failed", "error": line.format(d=folder).removeprefix("error: ")}
    assert {p.name for p in run.iterdir()} <= {".hydra", "config.yaml", "metrics.json", "train.log", "run.log"}


def test_seq_len_row_names_the_largest_usable_value(shards, fast_cache, tmp_path):
    r = run_py([*JOB, fast_cache, "eval.seq_len=1000000", "eval.stride=64"], tmp_path)
    err = r.stderr.strip().splitlines()[-1]
    have = int(err.split(" has ")[1].split(" tokens")[0])
    assert err.endswith(f"fewer than seq_len+1=1000001; set eval.seq_len (default schedule.train_seq_len) to at most "
                        f"{have - 1}")


@pytest.mark.slow
def test_an_artifact_over_the_cap_finishes_with_a_warning(fast_cache, tmp_path):
    # 4.4M fp32 bigram-hash weights (random normal, barely compressible) with no quantization: ~17 MB.
    r = run_py([*JOB, fast_cache, "schedule.iterations=1", "quant=none", "model.embeddings.bigram_buckets=2200000",
                "model.embeddings.bigram_dim=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = metrics(tmp_path / "run")
    assert m["artifact/over_cap"] is True and m["status"] == "finished"
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: artifact")]
    assert warning == [f"warning: artifact {tmp_path / 'run' / 'final_model.fp32.ptz'} + code = "
                       f"{m['artifact/total_bytes']:,} bytes exceeds the 16,000,000-byte cap by "
                       f"{m['artifact/total_bytes'] - 16_000_000:,}; this run cannot be submitted (use a smaller quant "
                       "preset or fewer parameters)"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["artifact/total_bytes"] > 16_000_000
