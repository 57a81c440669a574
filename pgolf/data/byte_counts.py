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
    rule for its dummy prefix). Its UTF-8 length is what the tables must charge."""
    norm = sp.normalize(text).replace("▁", " ")
    return norm[1:] if norm.startswith(" ") else norm


def lut_charges(luts, ids: np.ndarray, bos_id: int) -> np.ndarray:
    """Bytes the tables charge each token of one document that follows a BOS: int64 (len(ids),)."""
    t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    prev = torch.cat([torch.tensor([bos_id]), t[:-1]])
    return luts.count(prev, t).to(torch.int64).numpy()


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
            pieces = "".join(sp.id_to_piece(int(t)) for t in ids[i:j])
            hint = " (it has no standalone '▁' piece)" if "▁" in text and sp.piece_to_id("▁") == sp.unk_id() else ""
            return f"pieces {pieces} spell {text!r} ({want} bytes) but are charged {int(charged[i:j].sum())}{hint}"
        i = j
    return "no single piece explains it"


def check_document(sp, luts, text: str, ids, *, where: str) -> int:
    """Check the tables against one document (`text`, the scorer's view of it, and its token
    `ids` without BOS); returns the bytes charged. Raises PgolfError naming the piece."""
    ids = np.asarray(ids, dtype=np.int64)
    charged = lut_charges(luts, ids, sp.bos_id())
    want = len(scored_text(sp, text).encode())
    if int(charged.sum()) != want:
        raise PgolfError(f"tokenizer byte tables disagree with {where}: {int(charged.sum())} bytes charged for "
                         f"{want} bytes of text; {_culprit(sp, ids, charged)}; {_REBUILD}")
    return want


def check_validation(sp, luts, val_tokens: torch.Tensor, sidecar: torch.Tensor | None, *, pattern: str,
                     max_docs: int = 64) -> str:
    """Check a run's validation split before it is scored: with a sidecar, BOS and CaseOps
    operators are charged 0; without one, the tables against the first `max_docs` whole
    decoded documents, and a CaseOps tokenizer is refused
    (its operators would be charged 3 bytes each). Returns a short log line."""
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
    starts = (toks == sp.bos_id()).nonzero().flatten().tolist()  # whole documents only: the split's cut
    for k, (a, b) in enumerate(zip(starts[:max_docs], starts[1:max_docs + 1])):  # may end mid-document
        ids = toks[a + 1:b].numpy()
        check_document(sp, luts, sp.decode(ids.tolist()), ids, where=f"validation document {k} of {pattern}")
    return f"val_bpb:byte_sidecar:disabled byte_tables_checked_docs:{min(max_docs, max(len(starts) - 1, 0))}"
