"""The token-only n-gram tilt (pgolf/ttt/ngram.py): hints equal #2135's own helpers on the same
stream (golden), depend on the prefix only (C1), and the tilt is a normalised distribution (C2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.errors import PgolfError
from pgolf.ttt.ngram import NgramTilt, token_ngram_hints

GOLDEN = json.loads((Path(__file__).parent / "goldens" / "ngram_hints_2135.json").read_text())


def synthetic_stream(n: int = 6000, seed: int = 7) -> torch.Tensor:
    """Phrases of 5-30 tokens (ids 2..8191) drawn from a bank of 40, 10% of tokens redrawn: contexts
    recur with competing continuations. The golden was computed on exactly this stream."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 31, (40,), generator=g)
    bank = [torch.randint(2, 8192, (int(k),), generator=g) for k in lens]
    out, total = [], 0
    while total < n:
        p = bank[int(torch.randint(0, 40, (1,), generator=g))].clone()
        noise = torch.rand(len(p), generator=g) < 0.1
        p[noise] = torch.randint(2, 8192, (int(noise.sum()),), generator=g)
        out.append(p)
        total += len(p)
    return torch.cat(out)[:n]


def naive_hints(tokens: list[int], order: int, threshold: float) -> tuple[list[int], list[bool]]:
    """Dictionary version on exact contexts (no hashing), for small streams."""
    ctx_len, pair, top, hint, fired = order - 1, {}, {}, [], []
    for i in range(len(tokens) - 1):
        tok = tokens[i + 1]
        if i + 1 < ctx_len:
            hint.append(0), fired.append(False)
            continue
        ctx = tuple(tokens[i + 1 - ctx_len:i + 1])
        total, count, best = top.get(ctx, (0, 0, 0))
        ok = total > 0 and np.float32(count) / np.float32(total) >= np.float32(threshold)
        hint.append(best if ok else 0), fired.append(bool(ok))
        pair[ctx, tok] = pair.get((ctx, tok), 0) + 1
        c = pair[ctx, tok]
        top[ctx] = (total + 1, c, tok) if c > count or total == 0 else (total + 1, count, best)
    return hint, fired


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"order{c['token_order']}")
def test_hints_equal_2135(case):
    targets = synthetic_stream()
    stream = torch.cat([targets[:1], targets])  # #2135 seeds its context ring with the first target
    h = token_ngram_hints(stream, token_order=case["token_order"], token_threshold=case["token_threshold"])
    fired = torch.nonzero(h.fired).flatten()
    assert fired.tolist() == case["fired_idx"]
    assert h.hint[fired].tolist() == case["hint_at_fired"]
    assert int(h.hint[~h.fired].abs().sum()) == 0


@pytest.mark.parametrize("order,threshold", [(1, 0.2), (2, 0.5), (3, 0.8), (5, 0.6)])
def test_hints_equal_exact_counts(order, threshold):
    g = torch.Generator().manual_seed(order)
    toks = torch.randint(0, 6, (800,), generator=g)  # a small alphabet: contexts recur, ties happen
    h = token_ngram_hints(toks, token_order=order, token_threshold=threshold)
    hint, fired = naive_hints(toks.tolist(), order, threshold)
    assert h.fired.tolist() == fired and h.hint.tolist() == hint


def test_hints_are_causal():
    toks = synthetic_stream(3000)
    base = token_ngram_hints(toks, token_order=4)
    for t in (0, 500, 2998):
        other = toks.clone()
        other[t + 1:] = torch.randint(2, 8192, (len(toks) - t - 1,), generator=torch.Generator().manual_seed(t))
        h = token_ngram_hints(other, token_order=4)
        # hint for target j (token j+1) reads tokens 0..j: equal for every j <= t
        assert torch.equal(h.hint[:t + 1], base.hint[:t + 1]) and torch.equal(h.fired[:t + 1], base.fired[:t + 1])


def test_tilt_normalises_and_closed_form_matches():
    toks = synthetic_stream(2000) % 64
    tilt = NgramTilt(toks, token_order=3, token_threshold=0.3, token_boost=2.625)
    idx = torch.arange(len(toks) - 1)
    assert int(tilt.hints.fired.sum()) > 200
    logits = torch.randn(len(idx), 64, generator=torch.Generator().manual_seed(0)) * 3
    logp = tilt.log_probs(logits, idx)
    assert (torch.logsumexp(logp, dim=-1).abs() < 1e-12).all()  # C2 at every position
    y = toks[1:]
    nll = tilt.nll(logits, y, idx)
    assert torch.allclose(nll, -logp.gather(1, y[:, None]).squeeze(1), atol=1e-12)
    untilted = torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")
    assert torch.equal(nll[~tilt.hints.fired], untilted[~tilt.hints.fired])
    assert tilt.fired == int(tilt.hints.fired.sum()) and tilt.hits > 0 and "fired:" in tilt.describe()


def test_bad_order_is_one_line():
    with pytest.raises(PgolfError, match="token_order"):
        token_ngram_hints(torch.arange(10), token_order=40)


def test_tilt_through_the_ttt_scorer_equals_the_closed_form():
    """The same NgramTilt as pgolf.ttt.scorer's hook (what TTT scores with) and as the sliding
    eval's closed form commit the same losses."""
    from pgolf.evaluate import ByteLUTs
    from pgolf.ttt.scorer import Scorer

    toks = synthetic_stream(600) % 64
    no = torch.zeros(64, dtype=torch.bool)
    luts = ByteLUTs(torch.ones(64, dtype=torch.int16), no, no)
    tilt = NgramTilt(toks, token_order=3, token_threshold=0.3)
    logits = torch.randn(599, 64, generator=torch.Generator().manual_seed(1)) * 3
    scorer = Scorer(toks, luts, tilt=tilt)
    scorer.score(torch.arange(599), logits)
    via_hook, fired = scorer.totals()[0], tilt.fired
    closed = float(tilt.nll(logits, toks[1:], torch.arange(599)).sum())
    assert fired == int(tilt.hints.fired.sum()) > 50 and via_hook == pytest.approx(closed, rel=1e-6)


def test_lora_ttt_scores_through_the_tilt():
    """The #2135 combination at a tiny shape: LoRA TTT (pgolf.ttt.lora) with the tilt as the scorer's
    hook. The tilt fires, lowers the committed loss on a repetitive stream, keeps the ledger legal,
    and takes as many LoRA steps as without it."""
    from pgolf.evaluate import ByteLUTs
    from pgolf.model import GPT
    from pgolf.ttt.common import TTTRuntime
    from pgolf.ttt.lora import LoRATTT
    from pgolf.ttt.scorer import Scorer, check_ledger

    toks = synthetic_stream(700) % 62 + 2
    toks[::100] = 1  # seven documents
    luts = ByteLUTs(torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.arange(64) < 2)
    results, states = [], []
    for tilt in (None, NgramTilt(toks, token_order=3, token_threshold=0.3)):
        torch.manual_seed(0)
        model = GPT(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
        scorer = Scorer(toks, luts, tilt=tilt)
        torch.manual_seed(1)
        LoRATTT(ttt_lora_rank=4, ttt_chunk_size=16, ttt_batch_size=2, ttt_lora_lr=1e-2).run(
            model, scorer, TTTRuntime(log=lambda s: None), seq_len=32)
        assert check_ledger(scorer.ledger, scorer.num_targets) is None
        results.append(scorer.result()[0])
        states.append(sum(int(e.kind == "update") for e in scorer.ledger))
    assert tilt.fired > 50 and tilt.scored == 699 and results[1] < results[0] and states[0] == states[1] > 0


@pytest.mark.parametrize("override,field", [("eval.token_order=40", "token_order"),
                                            ("eval.token_threshold=1.5", "token_threshold"),
                                            ("eval.token_boost=-1", "token_boost")])
def test_bad_tilt_options_fail_at_compose_time(override, field):
    from pgolf.build import compose

    with pytest.raises(PgolfError, match=f"eval.{field}="):
        compose(["experiment=smoke", "eval.ngram_tilt_enabled=true", override])
