"""Byte counts a tokenizer cannot fool: the bpb denominator, checked against real text.

bpb divides by the bytes of the text scored. The challenge charges each target token from
per-piece tables (`pgolf.evaluate.build_byte_luts`), which are right only if the tokenizer
agrees with them: a tokenizer with no standalone `▁` piece writes each space as the three
byte-fallback pieces of `▁` (E2 96 81), each charged 1 byte, so a 47-byte sentence is
charged 69 bytes and bpb comes out 32% too low. CaseOps (PR #1729) replaces the tables by a
per-token sidecar of original-text bytes. Here: reading that sidecar, the text a table-charged
tokenizer is scored on (`scored_text`), and the checks run when a dataset is built
(`check_document`, on the source documents) and when a run loads its validation split
(`check_validation`, on the decoded documents), which refuse a disagreeing tokenizer with
one line naming the piece.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch

from pgolf.data.caseops import OPERATORS
from pgolf.data.shards import read_shard
from pgolf.errors import PgolfError

SIDECAR_PREFIX = "fineweb_val_bytes_"
# A literal U+2581 in a text: SentencePiece cannot tell it from a space. While a document is
# normalised it is swapped for a private-use character of the same UTF-8 length (3 bytes) that
# no normaliser touches, so it keeps its 3 bytes in the count.
LITERAL_SPACE, _KEEP = "\u2581", "\ue000"
SHOWN_CHARS = 40  # error lines quote at most this much text
_REBUILD = "rebuild it with `python -m pgolf.data prepare ...`, which always makes '▁' a piece"


def sidecar_pattern(val_pattern: str) -> str:
    """The byte-sidecar glob beside a validation glob (`fineweb_val_X.bin` -> `fineweb_val_bytes_X.bin`),
    the record's naming (PR #1729)."""
    p = Path(val_pattern)
    return str(p.with_name(p.name.replace("fineweb_val_", SIDECAR_PREFIX, 1).replace("[0-9]", "")))


def load_sidecar(pattern: str, num_tokens: int) -> torch.Tensor:
    """Concatenate the sidecar shards (sorted) into int32 (num_tokens,): the original-text bytes
    of each validation token, aligned with `load_validation_tokens`' output (its cut applies)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise PgolfError(f"{pattern}: no byte sidecar found; re-download or re-prepare the CaseOps data")
    counts = torch.cat([read_shard(f) for f in files]).to(torch.int32)
    if counts.numel() < num_tokens:
        raise PgolfError(f"{pattern}: the byte sidecar has {counts.numel()} entries for {num_tokens} validation "
                         "tokens; it belongs to other shards, re-download or re-prepare the data")
    return counts[:num_tokens].contiguous()


def scored_text(sp, text: str) -> str:
    """The document as table-based bpb counts it: SentencePiece's normalised text with `▁` read
    as a space, less a leading space (a `▁` right after BOS is never charged, the challenge's
    rule for its dummy prefix). A literal `▁` in the text stays itself, 3 UTF-8 bytes
    (sentencepiece#863: the tokenizer writes it as the space symbol, so the tables charge it 1).
    Its UTF-8 length is what a document must be charged."""
    norm = sp.normalize(text.replace(LITERAL_SPACE, _KEEP)).replace("▁", " ").replace(_KEEP, LITERAL_SPACE)
    return norm[1:] if norm.startswith(" ") else norm


def lut_charges(luts, ids: np.ndarray, bos_id: int) -> np.ndarray:
    """Bytes the tables charge each token of one document that follows a BOS: int64 (len(ids),)."""
    t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    prev = torch.cat([torch.tensor([bos_id]), t[:-1]])
    return luts.count(prev, t).to(torch.int64).numpy()


def _shown(text: str) -> str:
    """At most SHOWN_CHARS characters of `text`, quoted, with its full length when cut."""
    return repr(text) if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]!r}... ({len(text)} chars)"


def _culprit(sp, ids: np.ndarray, charged: np.ndarray) -> str:
    """The first run of byte-fallback pieces charged differently from the text it spells."""
    i = 0
    while i < len(ids):
        if not sp.is_byte(int(ids[i])):
            i += 1
            continue
        j = i
        while j < len(ids) and sp.is_byte(int(ids[j])):
            j += 1
        text = bytes(int(sp.id_to_piece(int(t))[3:5], 16) for t in ids[i:j]).decode("utf-8", errors="replace")
        want = len(text.replace("▁", " ").encode())
        if int(charged[i:j].sum()) != want:
            pieces = "".join(sp.id_to_piece(int(t)) for t in ids[i:min(j, i + 12)]) + ("..." if j - i > 12 else "")
            hint = " (it has no standalone '▁' piece)" if "▁" in text and sp.piece_to_id("▁") == sp.unk_id() else ""
            return (f"pieces {pieces} spell {_shown(text)} ({want} bytes) but are charged {int(charged[i:j].sum())}"
                    f"{hint} (a run of {j - i} pieces at token {i})")
        i = j
    return "no single piece explains it"


def literal_space_counts(luts, text: str, ids, spans, bos_id: int) -> np.ndarray:
    """Bytes of each token of one document that follows a BOS, a literal `▁` charged its 3 UTF-8
    bytes: the tables' charges, plus, for a token whose leading `▁` is a literal `▁` of `text`
    (its surface `text.encode()[begin:end]`, SentencePiece's byte offsets `spans`), 3 bytes less
    the 1 (0 right after BOS) the tables charge a space. int64 (len(ids),)."""
    ids = np.asarray(ids, dtype=np.int64)
    counts = lut_charges(luts, ids, bos_id)
    raw, literal = text.encode("utf-8"), LITERAL_SPACE.encode("utf-8")
    lead = luts.has_leading_space[torch.as_tensor(ids)].numpy()
    for k, (begin, end) in enumerate(spans):
        if lead[k] and literal in raw[begin:end]:
            counts[k] += 3 - (0 if k == 0 else 1)
    return counts


def check_document(sp, luts, text: str, ids, *, where: str, counts: np.ndarray | None = None) -> int:
    """Check one document's charges against its text (`text`, the scorer's view of it, and its
    token `ids` without BOS): the tables', or `counts` (a byte sidecar's, from
    `literal_space_counts`); returns the bytes charged. Raises PgolfError naming the piece."""
    ids = np.asarray(ids, dtype=np.int64)
    charged = lut_charges(luts, ids, sp.bos_id()) if counts is None else np.asarray(counts, dtype=np.int64)
    want = len(scored_text(sp, text).encode())
    if int(charged.sum()) != want:
        raise PgolfError(f"tokenizer byte tables disagree with {where}: {int(charged.sum())} bytes charged for "
                         f"{want} bytes of text; {_culprit(sp, ids, charged)}; {_REBUILD}")
    return want


def check_validation(sp, luts, val_tokens: torch.Tensor, sidecar: torch.Tensor | None, *, pattern: str,
                     max_docs: int = 64) -> str:
    """Check a run's validation split before it is scored: with a sidecar, BOS and CaseOps
    operators are charged 0; without one, a CaseOps tokenizer is refused (its operators would be
    charged 3 bytes each) and the tables are checked against the decoded text of the first
    `max_docs` spans (`text_spans`: documents, or pieces of them, so a split with no BOS or
    with one long document is checked too; issue 21). Returns a short log line."""
    toks = val_tokens.to(torch.int64)
    ops = [sp.piece_to_id(o) for o in OPERATORS]
    has_ops = any(i != sp.unk_id() for i in ops)
    if sidecar is not None:
        free = toks == sp.bos_id()
        for i in ops:
            if i != sp.unk_id():
                free |= toks == i
        if int(sidecar[free].abs().sum()) != 0:
            raise PgolfError(f"{pattern}: the byte sidecar charges BOS or CaseOps operator tokens; it does not "
                             "belong to these shards, re-download or re-prepare the data")
        return f"val_bpb:byte_sidecar:enabled bytes:{int(sidecar[1:].sum())}"
    if has_ops:
        raise PgolfError(f"{pattern}: the tokenizer has CaseOps operators but the split has no byte sidecar "
                         f"({sidecar_pattern(pattern)}); bpb would charge each operator 3 bytes. Set data.caseops=true "
                         "and re-download or re-prepare the data")
    spans = text_spans(sp, toks, max_spans=max_docs)
    checked = sum(check_span(sp, luts, toks, a, b, pattern=pattern) for a, b in spans)
    text_tokens = [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    if checked == 0 and not bool(torch.isin(toks[1:], torch.tensor(text_tokens)).any()):
        # only control tokens: no bytes at all, which the unigram floor refuses right after, naming it
        return "val_bpb:byte_sidecar:disabled byte_tables_checked spans:0 (no text: only control tokens)"
    if checked == 0:
        raise PgolfError(f"{pattern}: the byte tables could not be checked: its {toks.numel()} tokens spell no whole "
                         "character (only control or cut byte pieces); check that the shards were made with this "
                         "tokenizer")
    docs = int((toks[:spans[-1][1]] == sp.bos_id()).sum())
    return (f"val_bpb:byte_sidecar:disabled byte_tables_checked spans:{len(spans)} docs:{docs} "
            f"tokens:{spans[-1][1] - spans[0][0]} bytes:{checked}")


def text_spans(sp, toks: torch.Tensor, *, max_spans: int = 64, span_tokens: int = 1024) -> list[tuple[int, int]]:
    """Target ranges [a, b) of the stream `toks` that decode to whole text: cut before every BOS
    (a document start) and, in a long document or a split with no BOS at all, about every
    `span_tokens` where a character starts (a token that is not a byte piece, or one right after
    a BOS). Starts at target 1 (token 0 is never scored) and at a character, ends before a
    trailing byte run (the split's cut may end inside a character). At most `max_spans` spans."""
    n = toks.numel()
    is_byte = np.array([sp.is_byte(i) for i in range(sp.vocab_size())] + [False], dtype=bool)
    ids = toks.clamp(max=sp.vocab_size()).numpy()
    bos = ids == sp.bos_id()
    cut = ~is_byte[ids]  # a span may start here: not inside a character's byte pieces
    cut[1:] |= bos[:-1]
    end = n
    while end > 1 and not cut[end - 1]:
        end -= 1
    a, spans = 1, []
    while a < end and not cut[a]:
        a += 1
    while a < end and len(spans) < max_spans:
        nxt = np.flatnonzero(bos[a + 1:min(a + span_tokens, end)])
        b = a + 1 + int(nxt[0]) if nxt.size else min(a + span_tokens, end)
        while b < end and not cut[b]:
            b += 1
        spans.append((a, b))
        a = b
    return spans


def check_span(sp, luts, toks: torch.Tensor, a: int, b: int, *, pattern: str) -> int:
    """Check the tables on targets a..b-1 of the stream (each charged given the token before it)
    against the text those tokens decode to, `▁` read as a space; returns the bytes charged.
    Raises PgolfError naming the first disagreeing piece, never quoting the whole text."""
    ids = toks[a:b].numpy()
    charged = luts.count(toks[a - 1:b - 1], toks[a:b]).to(torch.int64).numpy()
    keep = [i for i in range(len(ids)) if not (sp.is_control(int(ids[i])) or sp.is_unknown(int(ids[i])))]
    if not keep:
        return 0
    text = sp.decode([int(ids[i]) for i in keep]).replace("▁", " ")
    first = keep[0]
    if sp.id_to_piece(int(ids[first])).startswith("▁"):  # its space: charged unless it follows BOS
        text = text if text.startswith(" ") else " " + text  # (a decoder may drop a leading space)
        prev = int(toks[a + first - 1])
        if sp.is_control(prev) or sp.is_unknown(prev) or sp.is_unused(prev):
            text = text[1:]
    want = len(text.encode())
    if int(charged.sum()) != want:
        doc = int((toks[:a + 1] == sp.bos_id()).sum()) - 1  # the document the span is in (-1: before any BOS)
        whole = sp.bos_id() in (int(toks[a]), int(toks[a - 1])) and (b == toks.numel() or int(toks[b]) == sp.bos_id())
        where = (f"validation document {doc} of {pattern}" if whole else
                 f"validation tokens {a}..{b - 1} (document {doc}) of {pattern}")
        raise PgolfError(f"tokenizer byte tables disagree with {where}: {int(charged.sum())} bytes charged for "
                         f"{want} bytes of text; {_culprit(sp, ids, charged)}; {_REBUILD}")
    return want
