"""Byte counts at the edges (issue 21 items 2, 3): the bpb denominator is right or the run refuses.

Right values are computed here from the text itself (its UTF-8 length), never by pgolf:
- a literal '▁' (U+2581) costs its 3 bytes: SentencePiece writes it as the space symbol, so the
  tables charge it 1; `prepare` then keeps a byte sidecar for the validation split and reports the
  text's real byte count;
- a validation split without BOS, or with fewer documents than the check reads, is checked on spans
  of its decoded text: a tokenizer whose tables disagree is refused, one short line;
- an error line never quotes the whole text.
"""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.data import read_shard
from pgolf.data.byte_counts import check_validation, load_sidecar, sidecar_pattern, text_spans
from pgolf.data.prepare import prepare
from pgolf.errors import PgolfError
from pgolf.evaluate import build_byte_luts

WORDS = "the golf model tiny byte token shard ten min ok x = 1 ( ) : def return".split()


def write_docs(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")


def make_docs(n: int, seed: int, sep: str = " ") -> list[str]:
    rng = random.Random(seed)
    return [sep.join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def literal_data(tmp_path_factory):
    """Identity-normalised data whose validation documents hold literal '▁' (and one leads with it)."""
    d = tmp_path_factory.mktemp("lit")
    docs = make_docs(50, 0)
    docs[1] = "a literal \u2581 in the text"
    docs[3] = "x\u2581y = '\u2581\u2581' ok"
    docs[4] = "\u2581starts with it"
    write_docs(d / "docs.jsonl", docs)
    m = prepare(source="jsonl", path=str(d / "docs.jsonl"), vocab_size=300, out=str(d / "out"), num_val_docs=6,
                shard_tokens=10**6, max_docs=None, normalization="identity")
    return d / "out", docs[:6], m


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    docs = make_docs(50, 1)
    write_docs(d / "docs.jsonl", docs)
    m = prepare(source="jsonl", path=str(d / "docs.jsonl"), vocab_size=300, out=str(d / "out"), num_val_docs=6,
                shard_tokens=10**6, max_docs=None, normalization="identity")
    return d / "out", docs, m


def val_tokens(out: Path) -> torch.Tensor:
    return torch.cat([read_shard(f) for f in sorted(glob.glob(str(out / "fineweb_val_[0-9]*.bin")))]).to(torch.int64)


def test_literal_space_costs_its_three_bytes(literal_data):
    out, docs, m = literal_data
    real = sum(len(t.encode("utf-8")) for t in docs)  # the right value: the text's UTF-8 length
    assert m["stats"]["bytes_val"] == real and m["stats"]["val_docs_with_literal_space"] == 3
    assert m["val_bytes_glob"] == "fineweb_val_bytes_*.bin"
    toks = val_tokens(out)
    side = load_sidecar(sidecar_pattern(str(out / "fineweb_val_[0-9]*.bin")), toks.numel())
    assert int(side.sum()) == real
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    luts = build_byte_luts(sp, sp.vocab_size())
    tables = int(luts.count(toks[:-1], toks[1:]).sum())
    assert real - tables == 2 * 4 + 3  # four literal '▁' charged 1 instead of 3, one after BOS charged 0
    assert check_validation(sp, luts, toks, side, pattern="v") == f"val_bpb:byte_sidecar:enabled bytes:{real}"


def test_no_literal_space_no_sidecar(plain_data):
    out, _, m = plain_data
    assert m["val_bytes_glob"] is None and not glob.glob(str(out / "fineweb_val_bytes_*.bin"))


def test_split_without_bos_is_checked_on_text_spans(plain_data):
    out, docs, _ = plain_data
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    luts = build_byte_luts(sp, sp.vocab_size())
    # BOS-less: the documents' tokens back to back, joined by a space (as one long text)
    text = " ".join(docs[6:40])
    toks = torch.tensor(sp.encode(text), dtype=torch.int64)
    line = check_validation(sp, luts, toks, None, pattern="v")
    assert "docs:0" in line and "spans:" in line
    spans = text_spans(sp, toks, max_spans=10_000, span_tokens=64)
    assert len(spans) > 3
    checked = int(luts.count(toks[:-1], toks[1:]).sum())
    # the right value: all but the first token's text, from the text itself
    first = sp.decode(toks[:1].tolist())
    assert checked == len(text.encode()) - len(first.encode())


@pytest.fixture(scope="module")
def nospace_sp(tmp_path_factory):
    """A tokenizer trained the challenge's way on text without spaces: no standalone '▁' piece, so
    each space is 3 byte-fallback pieces charged 1 byte each (the issue's BOS-less report)."""
    d = tmp_path_factory.mktemp("nospace")
    docs = make_docs(40, 2, sep="")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(d / "m"), model_type="bpe", vocab_size=300,
        character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "m.model"))
    assert sp.piece_to_id("▁") == sp.unk_id()
    return sp


@pytest.mark.parametrize("bos", [False, True])
def test_disagreeing_tables_are_refused_with_or_without_bos(nospace_sp, bos):
    sp = nospace_sp
    luts = build_byte_luts(sp, sp.vocab_size())
    docs = make_docs(30, 3)
    ids = [t for doc in docs for t in ([sp.bos_id()] if bos else []) + sp.encode(doc)]
    with pytest.raises(PgolfError) as e:
        check_validation(sp, luts, torch.tensor(ids), None, pattern="v")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 500 and "(it has no standalone '▁' piece)" in msg


def test_error_line_never_quotes_the_whole_text(nospace_sp):
    """A 45 KB run of byte pieces (a character outside the vocabulary between spaces) that the
    tables charge wrongly: the line names the run, its length and a 40-character prefix."""
    sp = nospace_sp
    luts = build_byte_luts(sp, sp.vocab_size())
    text = " ".join(["中"] * 7500)
    ids = [sp.bos_id(), *sp.encode(text), sp.bos_id(), *sp.encode("golf")]
    with pytest.raises(PgolfError) as e:
        check_validation(sp, luts, torch.tensor(ids), None, pattern="v")
    msg = str(e.value)
    assert len(msg) < 600 and "chars)" in msg, msg[:600]


def test_split_with_nothing_checkable_is_refused(nospace_sp):
    """Text tokens but no whole character to check (a byte run cut by the split's end)."""
    sp = nospace_sp
    luts = build_byte_luts(sp, sp.vocab_size())
    run = sp.encode("中中")[:5]
    with pytest.raises(PgolfError, match="could not be checked"):
        check_validation(sp, luts, torch.tensor([2, *run]), None, pattern="v")
