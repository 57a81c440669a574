"""CaseOps: a lossless case transform, and each token's byte count in the original text.

Introduced by record 2026-04-18_PR1626_CaseOps_Taper (PR #1729, `lossless_caps_caseops_v1`),
used by every top record after it. Over each maximal run of ASCII letters:

    lowercase run                -> unchanged               "golf"   -> "golf"
    2+ letters, all upper        -> ALLCAPS + lower(run)    "NASA"   -> ALLCAPS "nasa"
    Upper + all-lower rest       -> TITLE + lower(run)      "Launch" -> TITLE "launch"
    anything else (mixed)        -> [TITLE if the first letter is upper] + first letter lowered,
                                    then CAPNEXT before each later upper letter, all lowered
                                                            "iPhone" -> "i" CAPNEXT "phone"
                                                            "A"      -> TITLE "a"

and each operator character found in the input is written ESC + itself, so `decode(encode(x))
== x` for every string. The operators are private-use characters U+E001..U+E004, reserved as
SentencePiece user-defined symbols so each is always one token. The model predicts operators
too, but bpb must be charged against the ORIGINAL text: `original_byte_counts` gives each token
the UTF-8 bytes it stands for there (operators and ESC 0, an escaped operator its 3 bytes,
everything else its own bytes), which the exporter stores as the validation byte sidecar.
"""

from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_RUN = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")
# In UTF-8 the operators are EE 80 81..84. An ESC and the operator it escapes form one pair
# (the ESC is free, the escaped character costs its 3 bytes); a bare operator is free.
# Each match's first 3 bytes are free; a pair match consumes the escaped operator with it.
_FREE_UTF8 = re.compile(rb"\xee\x80\x84\xee\x80[\x81-\x84]|\xee\x80[\x81-\x83]")


def _encode_run(m: re.Match) -> str:
    run = m.group()
    if run in OPERATORS:
        return ESC + run
    if run.islower():
        return run
    low = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + low
    if run[0].isupper() and run[1:].islower():
        return TITLE + low
    head = TITLE + low[0] if run[0].isupper() else low[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def encode(text: str) -> str:
    """The CaseOps transform of `text` (see the module docstring)."""
    return _RUN.sub(_encode_run, text)


def decode(text: str) -> str:
    """Invert `encode`; raises ValueError on text `encode` cannot produce (a dangling or
    misplaced operator)."""
    out: list[str] = []
    word = ""  # "" outside an ASCII letter run, else "allcaps" or "plain"
    pending = ""  # "title" / "allcaps" set by an operator, consumed by the next letter
    capnext = escaped = False
    for ch in text:
        if escaped:
            out.append(ch)
            escaped, word = False, ""
            continue
        if ch == ESC:
            if pending or capnext:
                raise ValueError("a case operator is followed by ESC instead of a letter")
            escaped = True
        elif ch in (TITLE, ALLCAPS):
            if pending or capnext or word:
                raise ValueError(f"case operator U+{ord(ch):04X} inside a word or after another operator")
            pending = "title" if ch == TITLE else "allcaps"
        elif ch == CAPNEXT:
            if pending or capnext or not word:
                raise ValueError("CAPNEXT outside a word")
            capnext = True
        elif "a" <= ch <= "z" or "A" <= ch <= "Z":
            if not word:
                word = "allcaps" if pending == "allcaps" else "plain"
                up = bool(pending)
            else:
                up = word == "allcaps" or capnext
            out.append(ch.upper() if up else ch)
            pending, capnext = "", False
        else:
            if pending or capnext:
                raise ValueError(f"a case operator is followed by {ch!r}, not an ASCII letter")
            out.append(ch)
            word = ""
    if pending or capnext or escaped:
        raise ValueError("text ends with a dangling case operator")
    return "".join(out)


def original_byte_counts(transformed: str, spans: list[tuple[int, int]]) -> np.ndarray:
    """Bytes of the original text behind each token of `transformed` (= `encode(original)`).

    `spans` are the tokens' (begin, end) offsets in the UTF-8 bytes of `transformed`, in order
    (SentencePiece's `piece.begin`, `piece.end`). Token k is charged the original bytes from
    the end of token k-1 to its own end (the first from 0, the last to the end of the text),
    so the counts sum to len(original.encode()) exactly; an operator token passes what it was
    charged on to the next other token, so operators always cost 0. (The record charges each
    piece its surface; the two agree wherever surfaces tile the text, and differ only where
    the normaliser drops whitespace outside every piece, e.g. a document's leading spaces.)
    Returns int64 (len(spans),)."""
    raw = transformed.encode("utf-8")
    weight = np.ones(len(raw) + 1, dtype=np.int64)
    weight[0] = 0  # cum[i] = original bytes before offset i
    for m in _FREE_UTF8.finditer(raw):
        weight[m.start() + 1 : m.start() + 4] = 0
    cum = np.cumsum(weight)
    if not spans:
        return np.zeros(0, dtype=np.int64)
    begin, end = np.array(spans, dtype=np.int64).T
    counts = np.diff(cum[np.concatenate([[0], end[:-1], [len(raw)]])])
    free = (end > begin) & (cum[end] == cum[begin])  # the token is an operator (or an ESC)
    for k in np.flatnonzero(free & (counts > 0)):  # rare: whitespace the normaliser dropped before it
        later = np.flatnonzero(~free[k + 1:])
        to = k + 1 + later[0] if later.size else np.flatnonzero(~free[:k])[-1]
        counts[to] += counts[k]
        counts[k] = 0
    return counts
