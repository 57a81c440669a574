"""bpb byte counting, the standard eval and the sliding window, on cases checked by hand."""

from __future__ import annotations

import math

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.errors import PgolfError
from pgolf.evaluate import EvalSpec, build_byte_luts, eval_sliding, eval_standard, sliding_windows

CPU = dict(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A real SentencePiece BPE trained with the challenge's settings on a few lines."""
    d = tmp_path_factory.mktemp("sp")
    text = ["the cat sat on the mat", "the dog ate the bone", "héllo wörld 123", "a bat and a cat"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(d / "m"), model_type="bpe", vocab_size=300,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
    )
    return spm.SentencePieceProcessor(model_file=str(d / "m.model"))


def test_byte_luts_follow_the_challenge_rules(sp):
    luts = build_byte_luts(sp, vocab_size=320)
    assert luts.base_bytes.shape == (320,)
    for i in range(4):  # pad/bos/eos/unk: boundary tokens, zero bytes
        assert luts.is_boundary[i] and luts.base_bytes[i] == 0
    assert luts.is_boundary[300:].all() and (luts.base_bytes[300:] == 0).all()  # ids past the tokenizer
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(luts.base_bytes[i] == 1 for i in byte_ids)
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
            continue
        assert bool(luts.has_leading_space[i]) == piece.startswith("▁")
        assert luts.base_bytes[i] == len(piece.removeprefix("▁").encode("utf-8"))
    # "▁cat" after a normal token costs 4 bytes (the space counts); after BOS it costs 3.
    cat = sp.piece_to_id("▁cat")
    the = sp.piece_to_id("the")
    assert luts.count(torch.tensor([the]), torch.tensor([cat])).item() == 4
    assert luts.count(torch.tensor([1]), torch.tensor([cat])).item() == 3


def test_byte_count_of_a_document_equals_its_utf8_length(sp):
    text = "the cat sat on the mat héllo wörld 123"
    ids = [1] + sp.encode(text)  # BOS-prefixed, as shards store documents
    luts = build_byte_luts(sp, vocab_size=sp.vocab_size())
    t = torch.tensor(ids)
    assert luts.count(t[:-1], t[1:]).sum().item() == len(text.encode("utf-8"))


class ConstantLoss(nn.Module):
    """Uniform logits: every target costs exactly ln(V) nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dim = nn.Parameter(torch.zeros(1))

    def hidden(self, ids):
        return torch.zeros(*ids.shape, 1)

    def logits(self, h):
        return torch.zeros(*h.shape[:-1], self.vocab)

    def forward(self, x, y):
        return F.cross_entropy(self.logits(self.hidden(x)).reshape(-1, self.vocab), y.reshape(-1))


def test_bpb_on_a_case_computed_by_hand(sp):
    luts = build_byte_luts(sp, vocab_size=sp.vocab_size())
    the, cat = sp.piece_to_id("the"), sp.piece_to_id("▁cat")
    # targets: the(3 bytes after BOS) ▁cat(4) the(3: no leading space) ▁cat(4) -> 14 bytes, 4 tokens
    val = torch.tensor([1, the, cat, the, cat], dtype=torch.int64)
    loss, bpb = eval_standard(ConstantLoss(sp.vocab_size()), val, luts, seq_len=4, batch_tokens=4, **CPU)
    assert loss == pytest.approx(math.log(300), abs=1e-6)
    assert bpb == pytest.approx(math.log(300) / math.log(2) * 4 / 14, abs=1e-6)


@pytest.mark.parametrize("n,seq_len,stride", [(64, 16, 4), (70, 16, 4), (67, 16, 5), (10, 16, 4), (16, 16, 16),
                                              (48, 16, 16), (50, 16, 16), (1000, 128, 64), (1001, 128, 64)])
def test_sliding_windows_score_every_target_exactly_once(n, seq_len, stride):
    starts, offsets = sliding_windows(n, seq_len, stride)
    seen = torch.zeros(n, dtype=torch.int64)
    for ws, off in zip(starts, offsets):
        length = min(seq_len, n)
        assert ws >= 0 and ws + length <= n
        seen[ws + off:ws + length] += 1
    assert (seen == 1).all()
    # Every scored target after the first window has at least seq_len - stride tokens of context.
    for ws, off in zip(starts[1:], offsets[1:]):
        assert off >= seq_len - stride


class Bigram(nn.Module):
    """Logits depend on the current token only: per-target loss is context-free."""

    def __init__(self, vocab: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def hidden(self, ids):
        return F.one_hot(ids, self.table.size(0)).float()

    def logits(self, h):
        return h @ self.table

    def forward(self, x, y):
        return F.cross_entropy(self.logits(self.hidden(x)).reshape(-1, self.table.size(0)), y.reshape(-1))


@pytest.mark.parametrize("stride,batch_seqs", [(16, 4), (4, 3), (5, 7), (1, 64)])
def test_sliding_equals_standard_for_context_free_model(sp, stride, batch_seqs):
    g = torch.Generator().manual_seed(1)
    val = torch.randint(4, 300, (16 * 6 + 1,), generator=g)
    luts = build_byte_luts(sp, vocab_size=300)
    model = Bigram(300)
    std = eval_standard(model, val, luts, seq_len=16, batch_tokens=32, **CPU)
    sw = eval_sliding(model, val, luts, seq_len=16, stride=stride, batch_seqs=batch_seqs, **CPU)
    assert sw[0] == pytest.approx(std[0], rel=1e-6) and sw[1] == pytest.approx(std[1], rel=1e-6)


def test_sliding_at_stride_seq_len_equals_standard_for_a_real_gpt(sp):
    from pgolf.model import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=300, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    val = torch.randint(4, 300, (32 * 5 + 1,), generator=torch.Generator().manual_seed(2))
    luts = build_byte_luts(sp, vocab_size=300)
    std = eval_standard(model, val, luts, seq_len=32, batch_tokens=64, **CPU)
    sw = eval_sliding(model, val, luts, seq_len=32, stride=32, batch_seqs=3, **CPU)
    assert sw[0] == pytest.approx(std[0], abs=1e-6) and sw[1] == pytest.approx(std[1], abs=1e-6)
    # More context can only be scored differently, never with a different token/byte count.
    sw8 = eval_sliding(model, val, luts, seq_len=32, stride=8, batch_seqs=3, **CPU)
    assert sw8[1] / sw8[0] == pytest.approx(std[1] / std[0], rel=1e-9)


@pytest.mark.parametrize("kwargs,msg", [(dict(stride=0), "eval.stride=0"), (dict(stride=2048), "eval.stride=2048"),
                                        (dict(stride=-1), "eval.stride=-1"), (dict(batch_seqs=0), "eval.batch_seqs=0")])
def test_eval_spec_rejects_bad_stride(kwargs, msg):
    with pytest.raises(PgolfError, match=msg.replace("+", r"\+")):
        EvalSpec(**kwargs).resolve(1024)


def test_eval_spec_defaults_resolve_to_train_seq_len():
    assert EvalSpec(stride=None).resolve(1024) == (1024, 1024)
    assert EvalSpec().resolve(2048) == (2048, 64)
    assert EvalSpec(seq_len=512, stride=64).resolve(1024) == (512, 64)


def naive_sliding(model, val, luts, seq_len, stride):
    """One window at a time, full logits, the scored suffix summed: the definition, slowly."""
    n = val.numel() - 1
    seq_len = min(seq_len, n)
    loss = tokens = nbytes = 0.0
    for ws, off in zip(*sliding_windows(n, seq_len, stride)):
        x, y = val[ws:ws + seq_len][None], val[ws + 1:ws + seq_len + 1][None]
        nll = F.cross_entropy(model.logits(model.hidden(x))[0], y[0], reduction="none")
        loss += nll[off:].double().sum().item()
        tokens += seq_len - off
        nbytes += luts.count(x[0, off:], y[0, off:]).double().sum().item()
    return loss / tokens, loss / tokens / math.log(2) * tokens / nbytes


@pytest.mark.parametrize("n,seq_len,stride,batch_seqs", [(200, 32, 8, 4), (201, 32, 8, 5), (203, 32, 5, 64),
                                                         (20, 32, 8, 2), (12, 32, 16, 3), (96, 32, 32, 2)])
def test_sliding_equals_one_window_at_a_time(sp, n, seq_len, stride, batch_seqs):
    from pgolf.model import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=300, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.eval()
    val = torch.randint(4, 300, (n + 1,), generator=torch.Generator().manual_seed(3))
    luts = build_byte_luts(sp, vocab_size=300)
    want = naive_sliding(model, val, luts, seq_len, stride)
    got = eval_sliding(model, val, luts, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs, **CPU)
    assert got == pytest.approx(want, rel=1e-9)


def test_sliding_projects_only_scored_positions_and_shards_by_rank(sp, monkeypatch):
    import pgolf.evaluate as ev

    model = Bigram(300)
    projected = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: projected.append(h.shape[:-1].numel()) or logits(h))
    val = torch.randint(4, 300, (1001,), generator=torch.Generator().manual_seed(4))
    luts = build_byte_luts(sp, vocab_size=300)
    whole = eval_sliding(model, val, luts, seq_len=128, stride=16, batch_seqs=8, **CPU)
    # 1000 targets, each scored once; only the last batch's padding adds rows (<= 7 windows x 16).
    assert 1000 <= sum(projected) <= 1000 + 7 * 16
    sums = []
    monkeypatch.setattr(ev, "_all_reduce", lambda t: sums.append(t.clone()))
    for rank in range(3):
        eval_sliding(model, val, luts, seq_len=128, stride=16, batch_seqs=8, **dict(CPU, rank=rank, world_size=3))
    total = torch.stack(sums).sum(0)
    assert total[1].item() == 1000 and ev.bpb(*total.tolist()) == pytest.approx(whole, rel=1e-12)
