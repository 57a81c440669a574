"""pgolf's TTT variants against the records' own TTT evals at a small shape on one rank (issue 20
item 8). tests/goldens/ttt.json comes from the records' code (see tests/goldens/README.md); the
models are test_records_frontier's translations of the records on golden.py's seeded weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from golden import seeded_luts, seeded_stream
from test_records_frontier import record_model
from pgolf.ttt.chunked import ChunkedSGD
from pgolf.ttt.common import TTTRuntime
from pgolf.ttt.scorer import Scorer, check_ledger

GOLDEN = json.loads((Path(__file__).parent / "goldens" / "ttt.json").read_text())
REL = 2e-6


def quiet() -> TTTRuntime:
    return TTTRuntime(log=lambda s: None)


@pytest.mark.parametrize("stride", [64, 16])
def test_chunked_sgd_equals_0323_eval_val_sliding_ttt(stride):
    g = GOLDEN[f"chunked_sgd_stride{stride}"]
    a = g["args"]
    model = record_model(g["record"])
    stream, luts = seeded_stream(g["stream"]["n_targets"], g["stream"]["seed"]), seeded_luts()
    scorer = Scorer(stream, luts)
    spec = ChunkedSGD(ttt_lr=a["ttt_lr"], ttt_epochs=a["ttt_epochs"], ttt_chunk_tokens=a["ttt_chunk_tokens"],
                      ttt_freeze_blocks=a["ttt_freeze_blocks"], ttt_momentum=a["ttt_momentum"],
                      ttt_batch_seqs=a["ttt_batch_seqs"], ttt_grad_clip=a["ttt_grad_clip"])
    seq_len = a["train_seq_len"]
    spec.run(model, scorer, quiet(), seq_len=seq_len, stride=stride, batch_seqs=g["batch_seqs"])
    assert check_ledger(scorer.ledger, scorer.num_targets) is None
    loss_sum, tokens, nbytes = scorer.totals()
    assert tokens == scorer.num_targets
    # 03-23's window filter scores the last `stride` targets again from every later, shorter window
    # (the tail bug #1218 fixed); pgolf scores them once. Add those duplicates, computed with the
    # final weights (the last chunk is never trained on), to compare with the record's sums.
    n = scorer.num_targets
    with torch.no_grad():
        for ws in range(n - seq_len + stride, n, stride):
            x, y = stream[ws:n][None], stream[ws + 1:n + 1][None]
            nll = F.cross_entropy(model.logits(model.hidden(x))[0, -stride:].float(), y[0, -stride:], reduction="none")
            loss_sum += float(nll.double().sum())
            tokens += stride
            nbytes += float(luts.count(x[0, -stride:], y[0, -stride:]).double().sum())
    loss = loss_sum / tokens
    assert loss == pytest.approx(g["val_loss"], rel=REL)
    assert loss / math.log(2) * tokens / nbytes == pytest.approx(g["val_bpb"], rel=REL)


def test_chunked_sgd_training_takes_effect():
    """The same eval without updates scores differently (the TTT switch is live)."""
    g = GOLDEN["chunked_sgd_stride64"]
    model = record_model(g["record"])
    scorer = Scorer(seeded_stream(g["stream"]["n_targets"], g["stream"]["seed"]), seeded_luts())
    ChunkedSGD(ttt_epochs=0, ttt_chunk_tokens=256).run(model, scorer, quiet(), seq_len=64, stride=64)
    assert abs(scorer.result()[0] - g["val_loss"]) > 1e-4
    assert not any(e.kind == "update" for e in scorer.ledger)


def lora_spec(h: dict, cls=None, **extra):
    from pgolf.ttt.lora import LoRATTT

    cls = cls or LoRATTT
    return cls(ttt_lora_rank=h["ttt_lora_rank"], ttt_lora_lr=h["ttt_lora_lr"], ttt_chunk_size=h["ttt_chunk_size"],
               ttt_eval_seq_len=h["ttt_eval_seq_len"], ttt_batch_size=h["ttt_batch_size"],
               ttt_grad_steps=h["ttt_grad_steps"], ttt_beta1=h["ttt_beta1"], ttt_beta2=h["ttt_beta2"],
               ttt_weight_decay=h["ttt_weight_decay"], ttt_k_lora=h["ttt_k_lora"], ttt_mlp_lora=h["ttt_mlp_lora"],
               ttt_o_lora=h["ttt_o_lora"], **extra)


def run_lora_golden(key: str, model_name: str = "pr1530_varlen", cls=None, **extra) -> Scorer:
    g = GOLDEN[key]
    model = record_model(model_name)
    st = g["stream"]
    scorer = Scorer(seeded_stream(st["n_targets"], st["seed"], doc_lens=st["doc_lens"]), seeded_luts())
    spec = lora_spec(g["h"], cls, **extra)
    torch.manual_seed(g["rng_seed"])  # A's draws, in the record's order
    spec.run(model, scorer, quiet(), seq_len=g["h"].get("eval_seq_len", 48))
    assert check_ledger(scorer.ledger, scorer.num_targets) is None
    loss, bpb = scorer.result()
    assert loss == pytest.approx(g["val_loss"], rel=REL)
    assert bpb == pytest.approx(g["val_bpb"], rel=REL)
    return scorer


@pytest.mark.parametrize("key", ["lora", "lora_no_k_mlp"])
def test_lora_equals_1530_eval_val_ttt_lora(key):
    scorer = run_lora_golden(key)
    assert any(e.kind == "update" for e in scorer.ledger)


def test_phased_equals_1626_eval_val_ttt_phased(monkeypatch):
    """Two global phases (boundaries 3 and 6 documents), each training the base model on the
    documents scored so far, then fresh adapters (#1626, on #1530's architecture and weights).
    The global SGD's packed rows (4 x 32 tokens) run the CPU doc attention block by block (query
    blocks of 32, keys within the 32-token segment bound), as a 32,768-token row does at the
    default block of 2,048: the blocked path equals #1626's own varlen attention too."""
    from pgolf.model import docs as docs_mod
    from pgolf.ttt.phased import PhasedTTT

    blocked, sdpa = [], docs_mod.sdpa_doc_attention

    def spy(q, k, v, segment_ids, max_seqlen, block=None):
        blocked.append(q.size(2) > docs_mod.SDPA_QUERY_BLOCK and max_seqlen < q.size(2))
        return sdpa(q, k, v, segment_ids, max_seqlen, block)

    monkeypatch.setattr(docs_mod, "SDPA_QUERY_BLOCK", 32)
    monkeypatch.setattr(docs_mod, "sdpa_doc_attention", spy)
    h = GOLDEN["phased"]["h"]
    scorer = run_lora_golden("phased", cls=PhasedTTT, phased_ttt_prefix_docs=h["phased_ttt_prefix_docs"],
                             phased_ttt_num_phases=h["phased_ttt_num_phases"], global_ttt_lr=h["global_ttt_lr"],
                             global_ttt_momentum=h["global_ttt_momentum"], global_ttt_epochs=h["global_ttt_epochs"],
                             global_ttt_chunk_tokens=h["global_ttt_chunk_tokens"],
                             global_ttt_batch_seqs=h["global_ttt_batch_seqs"],
                             global_ttt_grad_clip=h["global_ttt_grad_clip"])
    assert scorer.result()[0] != pytest.approx(GOLDEN["lora"]["val_loss"], rel=1e-4)  # the phases took effect
    assert any(blocked)  # the global phases ran the blocked doc attention
