"""Tests for pgolf.data: shard format, loader semantics, prepare, download, DataSpec, CLI."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import subprocess
import platform
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import pgolf
import pgolf.data.download as dl
import pgolf.data.prepare as prepare_mod
from pgolf.data import (
    DataSpec,
    DistributedTokenLoader,
    TokenStream,
    load_validation_tokens,
    read_shard,
    stdlib_files,
    write_shard,
)
from pgolf.data import caseops
from pgolf.data.__main__ import build_parser, main
from pgolf.data.download import download
from pgolf.data.prepare import prepare
from pgolf.data.shards import HEADER_BYTES, SHARD_MAGIC
from pgolf.errors import PgolfError

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a of golf tiny model byte token shard loader rank seed train value résumé naïve 42 3.14 2024".split()


def make_shards(d: Path, sizes: list[int], prefix: str = "fineweb_train_") -> np.ndarray:
    """Shards holding consecutive integers, so any slice of the stream names its position."""
    start = 0
    for i, n in enumerate(sizes):
        write_shard(d / f"{prefix}{i:06d}.bin", np.arange(start, start + n))
        start += n
    return np.arange(start)


def make_jsonl(path: Path, num_docs: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(rng.randint(1, 6)))
        for _ in range(num_docs)
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return docs


# ----- shards -----


def test_shard_round_trip(tmp_path):
    toks = np.array([0, 1, 2, 65535, 1024, 7], dtype=np.int64)
    path = tmp_path / "a.bin"
    write_shard(path, torch.from_numpy(toks))
    out = read_shard(path)
    assert out.dtype == torch.uint16 and out.tolist() == toks.tolist()
    assert path.stat().st_size == HEADER_BYTES + 2 * len(toks)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [SHARD_MAGIC, 1, len(toks)] and not header[3:].any()
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp file left behind


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    for bad in ([1, 65536], [-1, 3]):
        with pytest.raises(PgolfError, match="bad.bin.*uint16"):
            write_shard(tmp_path / "bad.bin", bad)
    assert list(tmp_path.iterdir()) == []


def _corrupt(path: Path, *, magic=SHARD_MAGIC, version=1, count=3, extra=b"") -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, count)
    path.write_bytes(header.tobytes() + np.arange(3, dtype="<u2").tobytes() + extra)
    return path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"magic": 123}, "bad shard magic 123 \\(expected 20240520\\)"),
        ({"version": 2}, "version 2 \\(expected 1\\)"),
        ({"count": 5}, "header says 5 tokens"),
        ({"extra": b"\0\0"}, "1032 bytes but its header says 3 tokens \\(1030 bytes\\)"),
    ],
)
def test_read_shard_rejects_corrupt_files(tmp_path, kwargs, message):
    path = _corrupt(tmp_path / "x.bin", **kwargs)
    with pytest.raises(PgolfError, match=message) as e:
        read_shard(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_read_shard_rejects_short_header(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(PgolfError, match="100 bytes is shorter than the 1024-byte shard header") as e:
        read_shard(path)
    assert str(path) in str(e.value)


# ----- loader -----


def test_token_stream_crosses_shards_and_wraps(tmp_path):
    make_shards(tmp_path, [5, 2, 3])
    s = TokenStream(str(tmp_path / "fineweb_train_*.bin"))
    assert s.take(4).tolist() == [0, 1, 2, 3]
    assert s.take(4).tolist() == [4, 5, 6, 7]  # crosses two shard boundaries
    assert s.take(5).tolist() == [8, 9, 0, 1, 2]  # wraps to the first shard
    assert s.take(1).dtype == torch.uint16


def test_token_stream_no_files(tmp_path):
    with pytest.raises(PgolfError, match=f"{tmp_path}/nope_\\*.bin: no file matches"):
        TokenStream(str(tmp_path / "nope_*.bin"))


@pytest.mark.parametrize("sizes", [[5, 0, 3], [0], [0, 0]], ids=["one empty", "only empty", "all empty"])
def test_token_stream_refuses_empty_shards_instead_of_hanging(tmp_path, sizes):
    make_shards(tmp_path, sizes)
    pattern = str(tmp_path / "fineweb_train_*.bin")
    empty = tmp_path / f"fineweb_train_{sizes.index(0):06d}.bin"
    with pytest.raises(PgolfError) as e:
        TokenStream(pattern).take(4)
    assert str(e.value) == (f"{empty} (one of the {len(sizes)} shards of {pattern}) holds no tokens; delete it or "
                            "re-create the shards with `python -m pgolf.data prepare ...`")


def test_token_ids_must_be_below_the_vocab(tmp_path):
    make_shards(tmp_path, [5, 3])  # ids 0..7: the second shard holds 5, 6, 7
    pattern = str(tmp_path / "fineweb_train_*.bin")
    s = TokenStream(pattern, vocab_size=6)  # the first shard (0..4) is fine
    with pytest.raises(PgolfError) as e:
        s.take(6)  # reaches the second shard: checked when first read
    assert str(e.value) == (f"{tmp_path / 'fineweb_train_000001.bin'}: token id 7 is not below vocab_size=6; these "
                            "tokens were made with another tokenizer: use its data.tokenizer_path and model.vocab_size, "
                            "or re-create the shards")
    make_shards(tmp_path, [10], prefix="fineweb_val_")
    val = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(PgolfError, match=rf"^validation split {val.replace('*', '[*]')}: token id 9 is not below"):
        load_validation_tokens(val, 4, vocab_size=8)
    assert len(load_validation_tokens(val, 4, vocab_size=10)) == 9


def test_loader_refuses_a_batch_larger_than_the_data(tmp_path):
    make_shards(tmp_path, [10, 7])
    pattern = str(tmp_path / "*.bin")
    loader = DistributedTokenLoader(pattern, rank=0, world_size=2, device="cpu")
    assert loader.next_batch(8, 4, 1)[0].shape == (1, 4)  # 2 x (4 + 1) tokens of 17
    with pytest.raises(PgolfError) as e:
        loader.next_batch(32, 4, 1)
    assert str(e.value) == (f"train shards {pattern} hold 17 tokens, fewer than one micro-batch reads (2 x 17); add "
                            "training data or lower schedule.train_batch_tokens")


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (2, 1), (4, 2)])
def test_loader_matches_baseline_spans(tmp_path, world_size, grad_accum):
    stream = make_shards(tmp_path, [37, 11, 50])
    pattern = str(tmp_path / "fineweb_train_*.bin")
    global_tokens, seq_len = 8 * world_size * grad_accum, 4
    local = global_tokens // (world_size * grad_accum)
    loaders = [DistributedTokenLoader(pattern, rank=r, world_size=world_size, device="cpu") for r in range(world_size)]
    start = 0
    for _ in range(12):  # enough calls to wrap around the 98-token stream
        spans = []
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(global_tokens, seq_len, grad_accum)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (local // seq_len, seq_len)
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one
            spans.append(torch.cat([x.flatten(), y.flatten()[-1:]]))
        # One contiguous chunk per call, rank r gets the r-th (local+1)-token span of it.
        idx = np.arange(start, start + world_size * (local + 1)) % len(stream)
        assert torch.cat(spans).tolist() == stream[idx].tolist()
        start += world_size * (local + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_cuda_matches_cpu(tmp_path):
    make_shards(tmp_path, [100, 60])
    pattern = str(tmp_path / "*.bin")
    cpu = DistributedTokenLoader(pattern, rank=1, world_size=2, device="cpu")
    gpu = DistributedTokenLoader(pattern, rank=1, world_size=2, device="cuda")
    for _ in range(5):
        (xc, yc), (xg, yg) = cpu.next_batch(32, 4, 2), gpu.next_batch(32, 4, 2)
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)


def test_loader_rejects_batch_not_divisible_by_seq_len(tmp_path):
    make_shards(tmp_path, [100])
    loader = DistributedTokenLoader(str(tmp_path / "*.bin"), rank=0, world_size=2, device="cpu")
    with pytest.raises(PgolfError, match="train_batch_tokens=20 gives 10 tokens .* seq_len=4"):
        loader.next_batch(20, 4, 1)


def test_loader_state_dict_resumes_exactly(tmp_path):
    make_shards(tmp_path, [23, 9, 30])
    pattern = str(tmp_path / "fineweb_train_*.bin")
    a = DistributedTokenLoader(pattern, rank=1, world_size=2, device=torch.device("cpu"))
    for _ in range(3):  # 3 * 2 * 7 = 42 tokens: 10 into the third shard
        a.next_batch(12, 3, 1)
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON/torch.save round trip
    assert state == {"file_idx": 2, "pos": 10, "num_files": 3}
    b = DistributedTokenLoader(pattern, rank=1, world_size=2, device="cpu")
    b.load_state_dict(state)
    for _ in range(4):  # including the wrap back to shard 0
        xa, ya = a.next_batch(12, 3, 1)
        xb, yb = b.next_batch(12, 3, 1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(PgolfError, match="saved with 4 shards but 3 match now"):
        b.load_state_dict({**state, "num_files": 4})


@pytest.mark.parametrize("n, seq_len, kept", [(10, 3, 10), (11, 3, 10), (12, 3, 10), (13, 3, 13), (5, 4, 5)])
def test_validation_cut(tmp_path, n, seq_len, kept):
    make_shards(tmp_path, [n // 2, n - n // 2], prefix="fineweb_val_")
    val = load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len)
    assert val.tolist() == list(range(kept))


def test_validation_errors(tmp_path):
    pattern = str(tmp_path / "fineweb_val_*.bin")
    with pytest.raises(PgolfError, match="validation split .*fineweb_val_\\*.bin: no file matches"):
        load_validation_tokens(pattern, 4)
    make_shards(tmp_path, [4], prefix="fineweb_val_")
    msg = f"validation split {pattern} has 4 tokens, fewer than seq_len\\+1=5; set eval.seq_len \\(default schedule.train_seq_len\\) to at most 3"
    with pytest.raises(PgolfError, match=msg.replace("*", "\\*")):
        load_validation_tokens(pattern, 4)


# ----- prepare -----


def test_prepare_jsonl(tmp_path):
    docs = make_jsonl(tmp_path / "docs.jsonl", num_docs=40)
    out = tmp_path / "out"
    m = prepare(source="jsonl", path=str(tmp_path / "docs.jsonl"), vocab_size=300, out=str(out),
                num_val_docs=7, shard_tokens=400, max_docs=None)
    assert m["stats"]["docs_total"] == 40 and m["stats"]["docs_val"] == 7 and m["stats"]["docs_train"] == 33
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["source"] == "jsonl" and m["tokenizer_path"] == "tokenizer.model" and m["vocab_size"] == 300
    assert m["trainer_settings"]["normalization_rule_name"] == "nmt_nfkc" and m["trainer_settings"]["byte_fallback"]
    want_hash = hashlib.sha256()
    for t in docs:
        want_hash.update(len(t.encode()).to_bytes(8, "little") + t.encode())
    assert m["docs_sha256"] == want_hash.hexdigest()

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    assert (out / "tokenizer.vocab").is_file()

    # Each document is BOS + its tokens, no EOS; train shards hold at most shard_tokens.
    for split, split_docs in (("val", docs[:7]), ("train", docs[7:])):
        files = sorted(out.glob(f"fineweb_{split}_*.bin"))
        assert len(files) == m["stats"][f"files_{split}"] and all(read_shard(f).numel() <= 400 for f in files)
        got = torch.cat([read_shard(f) for f in files]).tolist()
        want = [t for d in split_docs for t in [1, *sp.encode(d)]]
        assert got == want and len(got) == m["stats"][f"tokens_{split}"] and 2 not in got
    assert m["stats"]["files_train"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # temp dir renamed away


CHALLENGE_SETTINGS = {  # data/download_hf_docs_and_tokenize.py's SentencePiece trainer arguments
    "model_type": "bpe", "character_coverage": 0.999, "byte_fallback": True, "split_digits": True,
    "normalization_rule_name": "nmt_nfkc", "add_dummy_prefix": False, "pad_id": 0, "bos_id": 1, "eos_id": 2,
    "unk_id": 3, "hard_vocab_limit": False,
}


def test_prepare_caseops_split_settings_manifest(tmp_path, capsys):
    docs = make_jsonl(tmp_path / "docs.jsonl", num_docs=30)
    docs = [d.replace("golf", "Golf").replace("model", "MODEL") for d in docs]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prepare", "--source", "jsonl", str(tmp_path / "docs.jsonl"), "--vocab-size", "320", "--out", str(out),
                 "--val-docs", "5", "--caseops"]) == 0
    assert "30 docs (5 val, 25 train)" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert {k: m["trainer_settings"][k] for k in CHALLENGE_SETTINGS} == CHALLENGE_SETTINGS
    assert m["trainer_settings"]["required_chars"] == "▁"
    assert m["tokenizer_train"] == {"docs": 30, "sentences": 30, "subset": False, "train_docs": 5_000_000}
    assert m["trainer_settings"]["user_defined_symbols"] == list(caseops.OPERATORS)
    assert (m["num_val_docs"], m["caseops"], m["text_transform"], m["normalization"]) == (
        5, True, "lossless_caps_caseops_v1", "nmt_nfkc")
    assert (m["val_glob"], m["val_bytes_glob"], m["shard_tokens"]) == (
        "fineweb_val_[0-9]*.bin", "fineweb_val_bytes_*.bin", 100_000_000)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for split, split_docs in (("val", docs[:5]), ("train", docs[5:])):
        got = torch.cat([read_shard(f) for f in sorted(out.glob(f"fineweb_{split}_[0-9]*.bin"))]).tolist()
        assert got == [t for d in split_docs for t in [1, *sp.encode(caseops.encode(d))]]  # BOS before every doc
    assert m["stats"]["bytes_val"] == sum(len(d.encode()) for d in docs[:5])
    assert [p.name for p in out.glob("fineweb_val_bytes_*.bin")] == ["fineweb_val_bytes_000000.bin"]
    assert build_parser().parse_args(["prepare", "--source", "stdlib", "--out", "o"]).num_val_docs == 50_000


def test_prepare_refuses_overlapping_splits(tmp_path):
    docs = make_jsonl(tmp_path / "docs.jsonl", num_docs=20)
    docs[12] = docs[3]  # a training document repeats a validation one
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    args = dict(source="jsonl", path=str(tmp_path / "docs.jsonl"), vocab_size=300, out=str(tmp_path / "out"),
                shard_tokens=1000, max_docs=None)
    with pytest.raises(PgolfError, match="training document 12 repeats validation document 3"):
        prepare(num_val_docs=5, **args)
    # The records' prepare_caseops_data.py trap: fewer validation documents than the source declares.
    docs[12] = "a fresh document"
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    (tmp_path / "docs.source_manifest.json").write_text(json.dumps({"num_docs": 20, "docs_val": 8}))
    with pytest.raises(PgolfError, match="--val-docs 5 would train on validation documents 5-7; pass --val-docs 8"):
        prepare(num_val_docs=5, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "docs.source_manifest.json"]
    assert prepare(num_val_docs=8, **args)["source_val_docs"] == 8


def test_prepare_failure_leaves_nothing(tmp_path):
    make_jsonl(tmp_path / "docs.jsonl", num_docs=30)
    with pytest.raises(PgolfError, match="num_val_docs=30 leaves no training documents out of 30"):
        prepare(source="jsonl", path=str(tmp_path / "docs.jsonl"), vocab_size=300, out=str(tmp_path / "out"),
                num_val_docs=30, shard_tokens=1000, max_docs=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_prepare_argument_errors(tmp_path):
    args = dict(vocab_size=300, num_val_docs=2, shard_tokens=100, max_docs=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(PgolfError, match="full already exists and is not empty"):
        prepare(source="stdlib", path=None, out=str(tmp_path / "full"), **args)
    with pytest.raises(PgolfError, match="missing.jsonl not found"):
        prepare(source="jsonl", path=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "o"), **args)
    with pytest.raises(PgolfError, match="max_docs=2 must exceed num_val_docs=2"):
        prepare(source="stdlib", path=None, out=str(tmp_path / "o"), **{**args, "max_docs": 2})
    with pytest.raises(PgolfError, match="source='web' is unknown"):
        prepare(source="web", path=None, out=str(tmp_path / "o"), **args)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(PgolfError, match="bad.jsonl:2: not a"):
        prepare(source="jsonl", path=str(tmp_path / "bad.jsonl"), out=str(tmp_path / "o"), **args)
    with pytest.raises(PgolfError, match="vocab_size=300 is too small: this corpus needs 3\\d\\d pieces"):
        prepare(source="stdlib", path=None, out=str(tmp_path / "o"), **{**args, "max_docs": 12})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "full"]


def test_stdlib_files_exclude_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert rel == sorted(rel) and "os.py" in rel and "json/__init__.py" in rel
    for r in rel:
        parts = r.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts) and not parts[-1].startswith("test_")


def test_prepare_stdlib_small(tmp_path):
    m = prepare(source="stdlib", path=None, vocab_size=512, out=str(tmp_path / "s"),
                num_val_docs=2, shard_tokens=10_000, max_docs=12)
    assert m["stats"]["docs_total"] == 12 and m["stats"]["docs_val"] == 2 and m["stats"]["docs_train"] == 10
    assert m["source_path"] == sysconfig.get_paths()["stdlib"] and m["python_version"] == platform.python_version()
    val = torch.cat([read_shard(f) for f in sorted((tmp_path / "s").glob("fineweb_val_*.bin"))])
    assert val[0] == 1 and (val == 1).sum() == 2


# ----- download -----


def fake_hub(tmp_path: Path, monkeypatch, *, files_train=3, files_val=2, name="fineweb10B_sp1024",
             tokenizer="fineweb_1024_bpe", sidecars=False) -> list[dict]:
    """A fake `hf_hub_download` serving files from a temp dir, returning snapshot symlinks
    into a blob dir the way the real cache does; returns the list of recorded calls. The
    same files answer for every repository (the calls record which one was asked)."""
    hub, blobs = tmp_path / "hub", tmp_path / "blobs"
    ds = f"datasets/datasets/{name}"
    entry = {"name": name, "tokenizer_name": "tok", "stats": {"files_train": files_train, "files_val": files_val}}
    if sidecars:  # as the CaseOps export's manifest (PR #1729) lists them
        entry["val_bytes_glob"] = f"datasets/{name}/fineweb_val_bytes_*.bin"
    manifest = {
        "datasets": [entry],
        "tokenizers": [{"name": "tok", "model_path": f"tokenizers/{tokenizer}.model",
                        "vocab_path": f"tokenizers/{tokenizer}.vocab"}],
    }
    contents = {"datasets/manifest.json": json.dumps(manifest), f"datasets/tokenizers/{tokenizer}.model": "model",
                f"datasets/tokenizers/{tokenizer}.vocab": "vocab"}
    contents |= {f"{ds}/fineweb_val_{i:06d}.bin": f"val{i}" for i in range(files_val)}
    contents |= {f"{ds}/fineweb_val_bytes_{i:06d}.bin": f"bytes{i}" for i in range(files_val) if sidecars}
    contents |= {f"{ds}/fineweb_train_{i:06d}.bin": f"train{i}" for i in range(files_train)}
    for rel, text in contents.items():
        blob = blobs / hashlib.sha1(rel.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_text(text)
        (hub / rel).parent.mkdir(parents=True, exist_ok=True)
        (hub / rel).symlink_to(blob)
    calls: list[dict] = []

    def fake(*, repo_id, filename, subfolder=None, repo_type=None):
        calls.append({"repo_id": repo_id, "filename": filename, "subfolder": subfolder, "repo_type": repo_type})
        return str(hub / subfolder / filename)

    monkeypatch.setattr(dl, "hf_hub_download", fake)
    return calls


def test_download_layout_and_skip(tmp_path, monkeypatch):
    calls = fake_hub(tmp_path, monkeypatch)
    root = tmp_path / "data"
    result = download(variant="sp1024", train_shards=2, root=str(root))
    assert {c["repo_id"] for c in calls} == {"willdepueoai/parameter-golf"}
    assert {c["repo_type"] for c in calls} == {"dataset"}
    ds = "datasets/datasets/fineweb10B_sp1024"
    assert [(c["subfolder"], c["filename"]) for c in calls] == [
        ("datasets", "manifest.json"),
        (ds, "fineweb_val_000000.bin"), (ds, "fineweb_val_000001.bin"),
        (ds, "fineweb_train_000000.bin"), (ds, "fineweb_train_000001.bin"),
        ("datasets/tokenizers", "fineweb_1024_bpe.model"), ("datasets/tokenizers", "fineweb_1024_bpe.vocab"),
    ]
    local = root / "datasets" / "fineweb10B_sp1024"
    assert result["dataset_dir"] == local
    assert sorted(p.name for p in local.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert (local / "fineweb_train_000001.bin").read_text() == "train1"
    assert not (local / "fineweb_train_000001.bin").is_symlink()  # a real file, hard-linked to the blob
    assert (root / "tokenizers" / "fineweb_1024_bpe.model").read_text() == "model"
    assert (root / "manifest.json").is_file() and len(result["downloaded"]) == 7

    calls.clear()
    again = download(variant="sp1024", train_shards=2, root=str(root))
    assert calls == [] and again["downloaded"] == []
    download(variant="sp1024", train_shards=3, root=str(root))
    assert [c["filename"] for c in calls] == ["fineweb_train_000002.bin"]


def test_download_falls_back_to_copy(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch)
    monkeypatch.setattr(dl.os, "link", lambda *a: (_ for _ in ()).throw(OSError("cross-device link")))
    download(train_shards=1, root=str(tmp_path / "data"))
    assert (tmp_path / "data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin").read_text() == "train0"


def test_download_errors(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch, files_train=3)
    with pytest.raises(PgolfError, match="sp1024 has 3 train shards on willdepueoai/parameter-golf, requested 4"):
        download(train_shards=4, root=str(tmp_path / "data"))
    with pytest.raises(PgolfError, match="no dataset fineweb10B_sp4096"):
        download(variant="sp4096", train_shards=1, root=str(tmp_path / "data"))
    with pytest.raises(PgolfError, match="variant 'gpt2' is unknown"):
        download(variant="gpt2", train_shards=1, root=str(tmp_path / "data"))


@pytest.mark.parametrize("variant, repo, name, tokenizer, sidecars", [
    ("sp4096", "kevclark/parameter-golf", "fineweb10B_sp4096", "fineweb_4096_bpe", False),
    ("sp8192", "kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe", False),
    ("sp8192_caseops", "romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
     "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved", True),
])
def test_download_variants(tmp_path, monkeypatch, variant, repo, name, tokenizer, sidecars):
    calls = fake_hub(tmp_path, monkeypatch, name=name, tokenizer=tokenizer, sidecars=sidecars)
    root = tmp_path / "data"
    download(variant=variant, train_shards=1, root=str(root))
    assert {c["repo_id"] for c in calls} == {repo}
    local = root / "datasets" / name
    want = ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    want += ["fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"] if sidecars else []
    assert sorted(p.name for p in local.iterdir()) == sorted(want)
    assert (root / "tokenizers" / f"{tokenizer}.model").read_text() == "model"
    # Another repository's manifest is kept apart from the challenge's (no stale-manifest trap).
    assert (root / f"manifest.{repo.replace('/', '--')}.json").is_file() and not (root / "manifest.json").exists()
    # The matching data config finds what was downloaded, sidecar included.
    cfg = pgolf.compose([f"data=fineweb_{variant}"])
    assert cfg.model.vocab_size == cfg.data.vocab_size == int(variant[2:6])
    kw = {k: v for k, v in cfg.data.items() if not k.startswith("_")}
    monkeypatch.chdir(tmp_path)
    r = DataSpec(**kw).ensure()
    assert r.val_pattern.endswith("fineweb_val_[0-9]*.bin") and len(glob.glob(r.val_pattern)) == 2
    assert r.val_bytes_pattern == (str(local / "fineweb_val_bytes_*.bin") if sidecars else None)
    calls.clear()
    download(variant=variant, train_shards=1, root=str(root), repo_id="me/mirror")
    assert [c["filename"] for c in calls] == ["manifest.json"]  # the mirror's own manifest; shards are present
    (root / "datasets" / name / "fineweb_train_000000.bin").unlink()
    download(variant=variant, train_shards=1, root=str(root), repo_id="me/mirror")
    assert {c["repo_id"] for c in calls} == {"me/mirror"}


def test_caseops_data_without_sidecar_is_refused(tmp_path):
    local = tmp_path / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    make_shards(local, [5])
    make_shards(local, [5], prefix="fineweb_val_")
    (tmp_path / "tok.model").write_text("m")
    spec = DataSpec(name="c", data_path=str(local), tokenizer_path=str(tmp_path / "tok.model"), caseops=True)
    with pytest.raises(PgolfError, match="fineweb_val_bytes_\\*.bin: no shards found; run `python -m pgolf.data "
                       "download --variant sp8192_caseops"):
        spec.ensure()
    make_shards(local, [5], prefix="fineweb_val_bytes_")
    assert spec.ensure().val_bytes_pattern == str(local / "fineweb_val_bytes_*.bin")
    # A glob that would read the sidecar as tokens is refused.
    with pytest.raises(PgolfError, match="also matches the byte sidecar"):
        DataSpec(name="c", data_path=str(local), tokenizer_path=str(tmp_path / "tok.model"),
                 val_files="fineweb_val_*.bin").ensure()


# ----- DataSpec -----


def test_dataspec_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = DataSpec(name="fineweb", data_path="data/datasets/fineweb10B_sp1024",
                    tokenizer_path="data/tokenizers/fineweb_1024_bpe.model")
    with pytest.raises(PgolfError) as e:
        spec.ensure()
    msg = str(e.value)
    assert str(tmp_path / "data/datasets/fineweb10B_sp1024") in msg
    assert "python -m pgolf.data download --variant sp1024 --train-shards 10" in msg and "data=stdlib" in msg
    assert "--root" not in msg

    local = tmp_path / "data/datasets/fineweb10B_sp1024"
    make_shards(local, [5])
    make_shards(local, [5], prefix="fineweb_val_")
    with pytest.raises(PgolfError, match="fineweb_1024_bpe.model: tokenizer not found"):
        spec.ensure()
    (tmp_path / "data/tokenizers").mkdir()
    (tmp_path / "data/tokenizers/fineweb_1024_bpe.model").write_text("m")
    r = spec.ensure()
    assert r.train_pattern == str(local / "fineweb_train_*.bin") and r.val_pattern == str(local / "fineweb_val_[0-9]*.bin")
    assert r.tokenizer_path == str(tmp_path / "data/tokenizers/fineweb_1024_bpe.model")


def test_dataspec_stdlib_builds_once(tmp_path, monkeypatch):
    calls = []
    real_prepare = prepare_mod.prepare
    monkeypatch.setattr(prepare_mod, "prepare", lambda **kw: calls.append(kw) or real_prepare(**kw))
    monkeypatch.setenv("PGOLF_CACHE", str(tmp_path / "cache"))
    spec = DataSpec(name="stdlib", source="stdlib", vocab_size=512, num_val_docs=2, max_docs=8, shard_tokens=5000)
    results = []
    # Concurrent callers (torchrun ranks) must build once and share the result.
    threads = [threading.Thread(target=lambda: results.append(spec.ensure())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1
    r = results[0]
    assert r.tokenizer_path == str(tmp_path / "cache/stdlib_sp512/tokenizer.model")
    assert len(load_validation_tokens(r.val_pattern, 16)) > 16
    assert spec.ensure() == r and len(calls) == 1

    other = DataSpec(name="stdlib", source="stdlib", vocab_size=512, num_val_docs=3, max_docs=8, shard_tokens=5000)
    with pytest.raises(PgolfError, match="built with other settings \\(num_val_docs 2 != 3\\)"):
        other.ensure()


def test_dataspec_rejects_unknown_source():
    with pytest.raises(PgolfError, match="data.source='web' is unknown"):
        DataSpec(name="x", source="web")


# ----- CLI -----


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pgolf.data", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_cli_prepare(tmp_path):
    make_jsonl(tmp_path / "docs.jsonl", num_docs=20)
    ok = run_cli("prepare", "--source", "jsonl", str(tmp_path / "docs.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "out"), "--num-val-docs", "3", "--shard-tokens", "500")
    assert ok.returncode == 0, ok.stderr
    assert "20 docs (3 val, 17 train)" in ok.stdout
    assert json.loads((tmp_path / "out/manifest.json").read_text())["stats"]["docs_val"] == 3


def test_cli_bad_argument_exits_2(tmp_path):
    bad = run_cli("prepare", "--source", "stdlib", "--vocab-size", "many", "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if "error:" in line] == [
        "python -m pgolf.data prepare: error: argument --vocab-size: invalid int value: 'many'"]


def test_cli_user_error_is_one_line(tmp_path, capsys):
    # Same code path as `python -m pgolf.data`, in-process to keep the suite fast.
    missing = tmp_path / "missing.jsonl"
    assert main(["prepare", "--source", "jsonl", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    want = f'error: jsonl source file {missing} not found; pass the path of a file of {{"text": ...}} lines'
    assert err.splitlines() == [want]
    with pytest.raises(SystemExit) as e:
        main(["download", "--train-shards", "x"])
    assert e.value.code == 2
