"""CaseOps (PR #1729): the transform is a bijection on every string, and the byte sidecar's
counts add up to the original text's UTF-8 length however the tokens cut it."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgolf.data import caseops
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE

# Arbitrary Unicode (every category but lone surrogates, so control characters too), with ASCII
# letters, spaces and the four operator characters themselves drawn often enough to meet.
CHARS = st.one_of(st.characters(), st.sampled_from(string.ascii_letters), st.sampled_from(OPERATORS + (" ", "\n")))
TEXT = st.text(CHARS, max_size=40)
EXAMPLES = 10_000
calls: list[int] = []


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(TEXT)
def _round_trip(text: str) -> None:
    calls.append(1)
    enc = caseops.encode(text)
    assert caseops.decode(enc) == text
    assert not any("A" <= c <= "Z" for c in enc)  # the lexical stream is lower case
    if any("\ud800" <= c <= "\udfff" for c in text):
        return  # a lone surrogate round-trips as a string but is not UTF-8 text: no bytes to count
    # Every cut into tokens charges exactly the original bytes, operators and ESC nothing.
    raw = len(enc.encode())
    cuts = [0, *sorted({raw * k // 7 for k in range(1, 7)}), raw]
    spans = list(zip(cuts[:-1], cuts[1:]))
    assert caseops.original_byte_counts(enc, spans).sum() == len(text.encode())


def test_round_trip_on_arbitrary_unicode():
    calls.clear()
    _round_trip()
    assert len(calls) >= EXAMPLES


@pytest.mark.parametrize("text, want", [
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
    ("iPhone OpenAI", f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i"),
    ("A golf", f"{TITLE}a golf"),
    ("naïve Éclair", f"naïve É{'clair'}"),  # only ASCII letters carry case operators
    (f"x{TITLE}y{ESC}", f"x{ESC}{TITLE}y{ESC}{ESC}"),
])
def test_record_examples(text, want):
    assert caseops.encode(text) == want and caseops.decode(want) == text


def test_sidecar_counts_per_token():
    enc = caseops.encode("The NASA")  # TITLE the ␠ ALLCAPS nasa
    b = enc.encode()
    # tokens: [TITLE] [the] [ ] [ALLCAPS] [nasa]
    spans = [(0, 3), (3, 6), (6, 7), (7, 10), (10, len(b))]
    assert caseops.original_byte_counts(enc, spans).tolist() == [0, 3, 1, 0, 4]
    esc = caseops.encode(TITLE)  # ESC TITLE: the escaped operator is 3 bytes of the original
    assert caseops.original_byte_counts(esc, [(0, 3), (3, 6)]).tolist() == [0, 3]
    # Whitespace the normaliser dropped before an operator goes to the word, not the operator.
    lead = caseops.encode("  The")
    assert caseops.original_byte_counts(lead, [(2, 5), (5, 8)]).tolist() == [0, 5]


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE} x", f"a{TITLE}b", f"{CAPNEXT}a", ESC, f"{TITLE}{ESC}{TITLE}"])
def test_decode_rejects_text_encode_cannot_make(bad):
    with pytest.raises(ValueError):
        caseops.decode(bad)
