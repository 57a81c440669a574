"""Byte counts a tokenizer cannot fool (issue 15): for every tokenizer pgolf builds or accepts,
the bytes charged to each validation document equal the document's UTF-8 bytes as the scorer
defines it; a tokenizer whose tables disagree is refused with one line naming the piece."""

from __future__ import annotations

import glob
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import pgolf
from pgolf.build import build
from pgolf.data import read_shard
from pgolf.data.byte_counts import check_document, check_validation, load_sidecar, lut_charges, scored_text
from pgolf.data.prepare import iter_documents, prepare
from pgolf.errors import PgolfError
from pgolf.evaluate import build_byte_luts, eval_sliding, eval_standard
from runs import FAST, metrics, run_py

CPU = dict(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
WORDS = "The golf MODEL iPhone OpenAI tiny byte token Shard résumé naïve 42 3.14 ﬁne NASA x".split()


def docs_jsonl(path: Path, n: int, *, sep: str = " ", seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [(sep and "\n").join(sep.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4)))
            for _ in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return docs


def val_documents(out: Path, sp) -> list[np.ndarray]:
    """The validation split cut at BOS into each document's token ids (without BOS)."""
    toks = torch.cat([read_shard(f) for f in sorted(glob.glob(str(out / "fineweb_val_[0-9]*.bin")))]).numpy()
    starts = list(np.flatnonzero(toks == sp.bos_id())) + [toks.size]
    return [toks[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


@pytest.fixture(scope="module")
def stdlib_data(fast_cache):
    """The sp1024 stdlib tokenizer exactly as the smoke preset builds it (the session's shared
    dataset, 5 validation documents)."""
    built = build(pgolf.compose([*FAST, fast_cache]), "data").ensure()
    return Path(built.tokenizer_path).parent, list(iter_documents(source="stdlib", path=None, max_docs=5))


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bc")
    docs = docs_jsonl(d / "docs.jsonl", 60)
    docs[2] = "  Leading and TRAILING whitespace  \n\n"  # the normaliser drops some of it; the sidecar may not
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    m = prepare(source="jsonl", path=str(d / "docs.jsonl"), vocab_size=320, out=str(d / "out"), num_val_docs=8,
                shard_tokens=200, max_docs=None, caseops=True)
    return d / "out", docs[:8], m


@pytest.fixture(scope="module")
def nospace_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bc")
    docs = docs_jsonl(d / "docs.jsonl", 40, sep="")
    prepare(source="jsonl", path=str(d / "docs.jsonl"), vocab_size=300, out=str(d / "out"), num_val_docs=6,
            shard_tokens=10**8, max_docs=None)
    return d, docs


def test_invariant_stdlib_tokenizer(stdlib_data):
    out, docs = stdlib_data
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    luts = build_byte_luts(sp, sp.vocab_size())
    got = val_documents(out, sp)
    assert len(got) == len(docs) == 5
    assert sp.vocab_size() == 1024 and sp.normalize(" a\n\tb  ") == "▁a\n\tb▁▁"  # identity: whitespace kept
    for doc, ids in zip(docs, got):
        assert sp.decode(ids.tolist()) == doc  # the code byte for byte
        assert lut_charges(luts, ids, sp.bos_id()).sum() == len(doc.encode("utf-8"))


def test_invariant_caseops_tokenizer(caseops_data):
    out, docs, m = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == ["\ue001", "\ue002", "\ue003", "\ue004"]
    assert m["trainer_settings"]["user_defined_symbols"] == ["\ue001", "\ue002", "\ue003", "\ue004"]
    toks = torch.cat([read_shard(f) for f in sorted(out.glob("fineweb_val_[0-9]*.bin"))])
    side = torch.cat([read_shard(f) for f in sorted(out.glob("fineweb_val_bytes_*.bin"))]).to(torch.int64)
    assert m["stats"]["files_val"] > 1 and len(list(out.glob("fineweb_val_bytes_*.bin"))) == m["stats"]["files_val"]
    assert side.shape == toks.shape and (side[toks == sp.bos_id()] == 0).all()
    assert all((side[toks == i] == 0).all() for i in range(4, 8))  # operators cost nothing
    starts = (toks == sp.bos_id()).nonzero().flatten().tolist() + [toks.numel()]
    per_doc = [int(side[a:b].sum()) for a, b in zip(starts[:-1], starts[1:])]
    assert per_doc == [len(d.encode("utf-8")) for d in docs]
    assert m["stats"]["bytes_val"] == sum(per_doc)


class Uniform(torch.nn.Module):
    """Every token equally likely: loss ln(V) per target, so bpb reveals the byte count."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.w = vocab, torch.nn.Parameter(torch.zeros(()))

    def hidden(self, x):
        return torch.zeros(*x.shape, 1)

    def logits(self, h):
        return torch.zeros(*h.shape[:-1], self.vocab)

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.logits(self.hidden(x)).reshape(-1, self.vocab), y.reshape(-1))


def test_caseops_bpb_denominator_is_the_original_bytes(caseops_data):
    out, docs, _ = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    luts = build_byte_luts(sp, sp.vocab_size())
    toks = torch.cat([read_shard(f) for f in sorted(out.glob("fineweb_val_[0-9]*.bin"))])
    side = load_sidecar(str(out / "fineweb_val_bytes_*.bin"), toks.numel())
    n, want = toks.numel() - 1, sum(len(d.encode("utf-8")) for d in docs)
    model = Uniform(sp.vocab_size())
    for loss, bpb in (
        eval_standard(model, toks, luts, seq_len=n, batch_tokens=n, token_bytes=side, **CPU),
        eval_sliding(model, toks, luts, seq_len=64, stride=16, batch_seqs=4, token_bytes=side, **CPU),
    ):
        assert loss == pytest.approx(math.log(sp.vocab_size()))
        assert round(loss / math.log(2) * n / bpb) == want
    # Without the sidecar the tables would charge each operator 3 bytes: that run is refused.
    assert check_validation(sp, luts, toks, side, pattern="v").startswith("val_bpb:byte_sidecar:enabled")
    with pytest.raises(PgolfError, match="has CaseOps operators but the split has no byte sidecar"):
        check_validation(sp, luts, toks, None, pattern=str(out / "fineweb_val_[0-9]*.bin"))


def test_invariant_tokenizer_trained_without_spaces(nospace_data):
    d, docs = nospace_data
    out = d / "out"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.piece_to_id("▁") != sp.unk_id()  # prepare always makes it a piece
    luts = build_byte_luts(sp, sp.vocab_size())
    for doc, ids in zip(docs[:6], val_documents(out, sp)):
        assert lut_charges(luts, ids, sp.bos_id()).sum() == len(scored_text(sp, doc).encode())
    sentence = "a tiny golf model of the byte set in ten min ok"
    assert (len(sentence.encode()), sentence.count(" ")) == (47, 11)
    assert check_document(sp, luts, sentence, sp.encode(sentence), where="s") == 47


def test_tokenizer_without_space_piece_is_refused(nospace_data, tmp_path):
    """The issue's case: trained the challenge's way on text with no spaces, each space becomes
    the 3 byte-fallback pieces of '▁', each charged a byte: 47 bytes charged 69."""
    d, docs = nospace_data
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(tmp_path / "m"), model_type="bpe", vocab_size=300,
        character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    assert sp.piece_to_id("▁") == sp.unk_id()
    luts = build_byte_luts(sp, sp.vocab_size())
    sentence = "a tiny golf model of the byte set in ten min ok"
    ids = sp.encode(sentence)
    assert lut_charges(luts, ids, sp.bos_id()).sum() == 69
    with pytest.raises(PgolfError) as e:
        check_document(sp, luts, sentence, ids, where="document 0")
    msg = str(e.value)
    assert "\n" not in msg and "69 bytes charged for 47 bytes of text" in msg
    assert "pieces <0xE2><0x96><0x81> spell '▁' (1 bytes) but are charged 3 (it has no standalone '▁' piece)" in msg
    # Accepting such shards (download, or data_path) is refused the same way before any scoring.
    val = torch.tensor([1, *ids, 1, *sp.encode("golf model"), 1], dtype=torch.int64)
    with pytest.raises(PgolfError, match="validation document 0 of v: 69 bytes charged for 47"):
        check_validation(sp, luts, val, None, pattern="v")


@pytest.mark.slow
def test_smoke_with_caseops_scores_with_the_sidecar(tmp_path):
    """The issue's done-when at test scale: the CaseOps stdlib data is built on first use, and
    the run says it scored with the sidecar."""
    args = [*FAST, "data.caseops=true", "data.max_docs=40", "data.vocab_size=512", f"data.cache_dir={tmp_path / 'c'}",
            "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    r = run_py(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "val_bpb:byte_sidecar:enabled" in log and "building stdlib data" in r.stdout
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["caseops"] and m["normalization"] == "identity" and m["vocab_size"] == 512
    assert math.isfinite(metrics(tmp_path / "run")["final/quant_sliding_bpb"])
