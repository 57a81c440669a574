"""The scorer (pgolf/ttt/scorer.py): score-before-update, exactly once, full normalised
distributions, and a ledger that re-checks (issue 20 item 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.evaluate import ByteLUTs
from pgolf.ttt.scorer import Context, Event, Scorer, ScoringError, check_ledger, load_ledger, to_runs

V = 16


def tables(seed: int = 0) -> ByteLUTs:
    g = torch.Generator().manual_seed(seed)
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:2] = True
    return ByteLUTs(torch.randint(1, 5, (V,), generator=g).to(torch.int16), torch.rand(V, generator=g) < 0.5, boundary)


def stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(seed))


def test_commit_matches_cross_entropy_and_bytes():
    s, luts = stream(50), tables()
    logits = torch.randn(50, V, generator=torch.Generator().manual_seed(1))
    sc = Scorer(s, luts)
    nll = sc.score(torch.arange(50), logits)
    ref = F.cross_entropy(logits, s[1:], reduction="none")
    assert torch.allclose(nll, ref)
    loss_sum, tokens, nbytes = sc.totals()
    assert tokens == 50 and math.isclose(loss_sum, float(ref.double().sum()), rel_tol=1e-12)
    assert nbytes == float(luts.count(s[:-1], s[1:]).double().sum())
    sidecar = torch.arange(51, dtype=torch.int32)
    sc2 = Scorer(s, luts, token_bytes=sidecar)
    sc2.score(torch.arange(50), logits)
    assert sc2.totals()[2] == float(sidecar[1:].sum())
    assert sc.result()[0] == pytest.approx(float(ref.double().mean()), rel=1e-12)


def test_double_score_update_before_score_and_missing_targets_raise():
    s, luts = stream(20), tables()
    sc = Scorer(s, luts)
    sc.score(torch.arange(0, 10), torch.randn(10, V))
    with pytest.raises(ScoringError, match="scored twice"):
        sc.score(torch.tensor([9, 10]), torch.randn(2, V))
    with pytest.raises(ScoringError, match="before it was scored"):
        sc.update(torch.arange(5, 12))
    sc.update(torch.arange(0, 10))
    with pytest.raises(ScoringError, match="never scored"):
        sc.result()
    assert sc.result(expect_all=False)[0] > 0


def test_tilt_must_normalise_and_is_committed():
    s, luts = stream(30), tables()
    logits = torch.randn(30, V)
    bad = lambda logp, ctx: logp + 0.01  # noqa: E731 - sums to e^0.01
    with pytest.raises(ScoringError, match="sums to"):
        Scorer(s, luts, tilt=bad).score(torch.arange(30), logits)

    def boost(logp, ctx):  # an n-gram-style hint: boost the previous token, renormalise
        hint = ctx.stream[ctx.positions]
        out = logp.clone()
        out[torch.arange(len(hint)), hint] += 2.0
        return torch.log_softmax(out, dim=-1)

    sc = Scorer(s, luts, tilt=boost)
    nll = sc.score(torch.arange(30), logits)
    assert torch.allclose(nll, F.cross_entropy(logits, s[1:], reduction="none"))  # returned: untilted
    tilted = -boost(torch.log_softmax(logits, -1), Context(torch.arange(30), s))
    assert sc.totals()[0] == pytest.approx(float(tilted.gather(1, s[1:, None]).sum()), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 200), chunk=st.integers(1, 64), seed=st.integers(0, 10_000))
def test_ledger_of_a_random_score_first_schedule_checks(n, chunk, seed):
    """Random chunkings in random order: scoring then updating each chunk is always legal, and the
    saved ledger re-checks; updating a chunk before scoring it always raises."""
    rng = np.random.default_rng(seed)
    s, luts = stream(n, seed), tables()
    sc = Scorer(s, luts)
    order = rng.permutation(n)
    chunks = [torch.as_tensor(order[i:i + chunk]) for i in range(0, n, chunk)]
    for k, c in enumerate(chunks):
        if k + 1 < len(chunks) and rng.random() < 0.3:
            with pytest.raises(ScoringError):
                sc.update(chunks[k + 1])
        sc.score(c, torch.randn(len(c), V))
        sc.update(torch.cat(chunks[:k + 1]))
    assert check_ledger(sc.ledger, n) is None
    sc.result()


def test_ledger_roundtrip_and_illegal_ledgers(tmp_path):
    s, luts = stream(12), tables()
    sc = Scorer(s, luts)
    sc.score(torch.tensor([0, 1, 2, 5, 6]), torch.randn(5, V))
    sc.update(torch.tensor([1, 2]))
    sc.score(torch.tensor([3, 4, 7, 8, 9, 10, 11]), torch.randn(7, V))
    sc.save_ledger(tmp_path / "ledger.jsonl")
    events = load_ledger(tmp_path / "ledger.jsonl")
    assert [e.kind for e in events] == ["score", "update", "score"]
    assert events[0].runs.tolist() == [[0, 3], [5, 7]]
    assert check_ledger(events, 12) is None
    early = [Event("update", to_runs(torch.tensor([3]))), *events]
    assert "before it was scored" in check_ledger(early, 12)
    twice = [*events, Event("score", to_runs(torch.tensor([4])))]
    assert "scored twice" in check_ledger(twice, 12)
    assert "never scored" in check_ledger(events[:2], 12)
