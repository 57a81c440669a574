"""Document-aware attention (`model.attention.doc_attention`): nothing crosses a BOS boundary.

For every technique that could carry information between positions, in a packed batch, changing
every token of document A leaves every per-token loss of the document B after it unchanged; the
same test without doc attention finds the leak (so it has teeth). The packed forward equals each
document's own forward, the sliding eval over packed documents equals scoring each alone, and
the doc path traces with fullgraph=True. Neighbour mixers per technique:
- attention: the mask (docs.py); XSA and the output gates act on a token's own value/input;
  RoPE scores depend only on the q-k offset, so they need nothing;
- SmearGate (all variants) drops the previous-token term at a BOS, BigramHash hashes a BOS as a
  first position (embeddings.py); the one exception is the window SmearGate with smear_bos_mask=false,
  which keeps it as #1667 and #2135 do (tested on its own below);
- value embeddings are a per-token table lookup (the VE case below shows no leak); a value
  residual (layer-0 v reused per token) is not in the model yet and would mix nothing either;
- parallel residuals, skips and depth recurrence only route per-token states between layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.evaluate import ByteLUTs, eval_sliding
from pgolf.model import GPT, from_flat
from pgolf.model import docs as docs_mod
from pgolf.model.docs import build_doc_mask, doc_ids, segment_cu_seqlens
from pgolf.model.embeddings import BigramHash, SigmoidSmear, token_smear, window_smear

BOS, V = 1, 64
SHAPE = dict(vocab_size=V, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
TECHNIQUES = {
    "plain": {},
    "xsa": dict(xsa_last_n=4),
    "partial_rope": dict(rope_dims=4),
    "ln_scale_skip_gates": dict(ln_scale=True, skip_gates_enabled=True),
    "attn_out_gate": dict(attn_out_gate_enabled=True, gate_window=4),
    "gated_attn": dict(gated_attn_enabled=True),
    "sparse_attn_gate": dict(sparse_attn_gate_enabled=True, gate_window=4),
    "smear_pre_norm": dict(smear_gate="pre_norm"),
    "smear_post_norm": dict(smear_gate="post_norm"),
    "smear_token": dict(smear_gate="token"),
    "smear_window": dict(smear_gate="window", gate_window=4),  # unmasked: test_unmasked_window_smear_...
    "bigram_mul": dict(bigram_buckets=37, bigram_dim=8, bigram_hash="mul"),
    "bigram_xor": dict(bigram_buckets=37, bigram_dim=8, bigram_hash="xor", bigram_scale_init=0.05),
    "value_embeddings": dict(ve_enabled=True, ve_dim=8, ve_layers=[2, 3]),
    "value_residual_lambda": dict(value_residual="lambda"),
    "value_residual_sigmoid_recurrence": dict(value_residual="sigmoid", num_loops=1, loop_start=0, loop_end=1),
    "parallel_routed_2x2": dict(parallel_start_layer=2, parallel_residual="routed_2x2"),
    "parallel_gptj": dict(parallel_start_layer=2, parallel_residual="gptj"),
    "parallel_lane_merge": dict(parallel_start_layer=2, parallel_residual="lane_merge"),
    "parallel_learned_2lane": dict(parallel_start_layer=2, parallel_residual="learned_2lane"),
    "recurrence_virtual_untied_layer0_off": dict(num_loops=1, loop_start=1, loop_end=2, layer_index="virtual",
                                                 loop_untie_mlp=True, disable_layer0_attn=True, ve_enabled=True,
                                                 ve_dim=8, ve_layers=[5]),
    "recurrence": dict(num_loops=1, loop_start=1, loop_end=2),
    "all": dict(xsa_last_n=4, rope_dims=4, ln_scale=True, skip_gates_enabled=True, sparse_attn_gate_enabled=True,
                gate_window=4, smear_gate="window", bigram_buckets=37, bigram_dim=8, bigram_hash="xor",
                bigram_scale_init=0.05, ve_enabled=True, ve_dim=8, ve_layers=[2, 3], parallel_start_layer=3,
                num_loops=1, loop_start=1, loop_end=2, value_residual="sigmoid"),
}


def model(doc_attention: bool, **options) -> GPT:
    """Random weights everywhere (zero-init gates and lambdas too, so every mixer is live)."""
    torch.manual_seed(0)
    m = GPT(**from_flat(dict(**SHAPE, doc_attention=doc_attention, **options)))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def doc(n: int, g: torch.Generator) -> torch.Tensor:
    """BOS then n-1 ordinary tokens (never BOS)."""
    return torch.cat([torch.tensor([BOS]), torch.randint(2, V, (n - 1,), generator=g)])


def packed(seed: int = 0):
    """Two rows of T=24 inputs (+1 target): row 0 = X(5) A(8) B(11+1); row 1 starts mid-document,
    then A(7) and B. Returns the stream (2, 25) and, per row, A's span and B's first position."""
    g = torch.Generator().manual_seed(seed)
    row0 = torch.cat([doc(5, g), doc(8, g), doc(12, g)])
    row1 = torch.cat([torch.randint(2, V, (6,), generator=g), doc(7, g), doc(12, g)])
    return torch.stack([row0, row1]), [((5, 13), 13), ((6, 13), 13)]


def per_token_loss(m: GPT, stream: torch.Tensor) -> torch.Tensor:
    x, y = stream[:, :-1], stream[:, 1:]
    with torch.no_grad():
        logits = m.forward_logits(x)
    return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)


def change_a(stream: torch.Tensor, spans, seed: int = 1) -> torch.Tensor:
    """Every token of each row's document A replaced (its BOS kept: A is still a document)."""
    g = torch.Generator().manual_seed(seed)
    out = stream.clone()
    for r, ((a0, a1), _) in enumerate(spans):
        new = torch.randint(2, V, (a1 - a0 - 1,), generator=g)
        new = torch.where(new == out[r, a0 + 1:a1], (new - 2 + 1) % (V - 2) + 2, new)  # a different token
        out[r, a0 + 1:a1] = new
    return out


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_changing_document_a_leaves_document_b_losses_unchanged(name):
    stream, spans = packed()
    other = change_a(stream, spans)
    for r, ((a0, a1), _) in enumerate(spans):
        assert (other[r, a0 + 1:a1] != stream[r, a0 + 1:a1]).all()
    on = model(True, **TECHNIQUES[name])
    before, after = per_token_loss(on, stream), per_token_loss(on, other)
    for r, (_, b0) in enumerate(spans):
        assert torch.equal(before[r, b0:], after[r, b0:]), name
        assert not torch.equal(before[r, spans[r][0][0]:b0], after[r, spans[r][0][0]:b0])  # A itself did change
    # Without doc attention the same edit reaches document B: the test can see a leak.
    off = model(False, **TECHNIQUES[name])
    before, after = per_token_loss(off, stream), per_token_loss(off, other)
    for r, (_, b0) in enumerate(spans):
        assert (before[r, b0:] - after[r, b0:]).abs().max() > 1e-4, name


def test_unmasked_window_smear_keeps_the_cross_document_term_as_1667():
    """smear_bos_mask=false (#1667; #2135 with SMEAR_GATE_BOS_FIX=0): the records' SmearGate never reads
    cu_seqlens, so under doc attention document B's BOS still takes A's last token. Changing A moves B's
    losses; changing all of A but its last token moves nothing in B (only that one term crosses)."""
    stream, spans = packed()
    other = change_a(stream, spans)
    m = model(True, smear_gate="window", gate_window=4, smear_bos_mask=False)
    before, after = per_token_loss(m, stream), per_token_loss(m, other)
    for r, (_, b0) in enumerate(spans):
        assert (before[r, b0:] - after[r, b0:]).abs().max() > 1e-4
    last_kept = other.clone()
    for r, ((_, a1), _) in enumerate(spans):
        last_kept[r, a1 - 1] = stream[r, a1 - 1]
    after = per_token_loss(m, last_kept)
    for r, (_, b0) in enumerate(spans):
        assert torch.equal(before[r, b0:], after[r, b0:])


@pytest.mark.parametrize("name", ["plain", "all"])
def test_packed_forward_equals_each_document_alone(name):
    """The CPU mask path: each document's logits in the packed row equal its own forward. Not
    bitwise: alone, a document sits at position 0 of a shorter row, so its RoPE angles and the
    kernel's blocking differ (measured max 4.6e-6 on logits up to the softcap of 30, a few fp32
    ulps); at the same positions the test above is bitwise."""
    g = torch.Generator().manual_seed(3)
    docs = [doc(n, g) for n in (5, 9, 10)]
    m = model(True, **TECHNIQUES[name])
    with torch.no_grad():
        packed_logits = m.forward_logits(torch.cat(docs)[None])[0]
        start = 0
        for d in docs:
            alone = m.forward_logits(d[None])[0]
            torch.testing.assert_close(packed_logits[start:start + len(d)], alone, rtol=0, atol=1e-5)
            start += len(d)


def test_embedding_parts_restart_at_a_bos():
    """Each neighbour-mixing embedding part treats a BOS like position 0 when given `starts`,
    and mixes the previous document in without it (the #1667 leak #1855 fixed)."""
    torch.manual_seed(0)
    ids = torch.tensor([[BOS, 5, 9, BOS, 7, 3]])
    starts = ids == BOS
    x = torch.randn(1, 6, 8)
    gate, lam = torch.nn.Linear(8, 1, bias=False), torch.tensor([0.7])
    parts = {
        "pre_norm": lambda x, s: SigmoidSmear(8, pre_norm=True)(x, s),
        "post_norm": lambda x, s: SigmoidSmear(8, pre_norm=False)(x, s),
        "token": lambda x, s: token_smear(x, gate, lam, s),
        "window": lambda x, s: window_smear(x, gate, lam, 8, None if s is None else (~s[:, 1:]).float()[..., None]),
    }
    for name, part in parts.items():
        alone = part(x[:, 3:], None)  # the second document on its own
        torch.testing.assert_close(part(x, starts)[:, 3:], alone, rtol=0, atol=0, msg=name)
        assert not torch.allclose(part(x, None)[:, 3], alone[:, 0]), name
    for hash in ("mul", "xor"):
        bigram = BigramHash(8, buckets=37, dim=4, hash=hash, init="normal", scale_init=None)
        assert torch.equal(bigram.indices(ids, starts)[:, 3:], bigram.indices(ids[:, 3:]))
        assert not torch.equal(bigram.indices(ids)[:, 3], bigram.indices(ids[:, 3:])[:, 0])


def test_doc_ids_and_cu_seqlens_follow_1530():
    ids = torch.tensor([[BOS, 4, 4, BOS, 5, 6, 7, 8], [9, 9, BOS, 3, 3, 3, BOS, 2]])
    assert doc_ids(ids, BOS).tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 2, 2]]
    cu = segment_cu_seqlens(ids == BOS)
    # Segment starts (BOS positions, row starts) over the flattened batch, the total, then the
    # total repeated up to the static length B*T + 1 (#1530 pads the same way).
    assert cu.dtype == torch.int32 and cu.shape == (17,)
    assert cu.tolist() == [0, 3, 8, 10, 14, 16] + [16] * 11


def _reference_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """FlashAttention's varlen semantics written out: causal attention inside each segment."""
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e > s:
            assert e - s <= max_seqlen_q
            seg = lambda t: t[s:e].transpose(0, 1)[None]  # noqa: E731  (1, heads, L, D)
            out[s:e] = F.scaled_dot_product_attention(seg(q), seg(k), seg(v), is_causal=True,
                                                      enable_gqa=True)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_cuda_backends_agree_with_the_cpu_mask(backend, monkeypatch):
    """The CUDA kernels' inputs, checked on CPU: varlen through a reference of FlashAttention's
    varlen function (cu_seqlens and the flattening), flex through torch's own flex_attention."""
    if backend == "varlen":
        monkeypatch.setattr(docs_mod, "flash_attn_varlen_func", _reference_varlen)
    stream, _ = packed()
    ids = stream[:, :-1]
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if backend == "varlen" else torch.float32
    q = torch.randn(2, 4, 24, 8, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 24, 8, generator=g).to(dtype) for _ in range(2))
    ref = docs_mod.causal_attention(q, k, v, build_doc_mask(ids, BOS, "sdpa"))
    try:
        got = docs_mod.causal_attention(q, k, v, build_doc_mask(ids, BOS, backend))
    except Exception as exc:  # pragma: no cover - torch builds without CPU flex support
        if backend == "flex":
            pytest.skip(f"flex_attention unavailable on this CPU build: {exc}")
        raise
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_long_rows_attend_block_by_block_as_one_mask():
    """A row longer than SDPA_QUERY_BLOCK (#1626's global SGD packs 32 rows of 2,048 tokens into
    one) is attended per block of queries over keys within the segment bound: it equals the one
    (B, 1, T, T) mask of shorter rows and per-segment attention (FlashAttention's varlen semantics),
    forward and backward, and the mask keeps (B, T) segment ids, not a T x T tensor."""
    from pgolf.ttt.common import segment_docs

    g = torch.Generator().manual_seed(3)
    T, M = 70, 9
    x = torch.randint(2, V, (1, T), generator=g)
    x[0, [0, 4, 5, 31, 33, 60]] = BOS  # documents of 4, 1, 26, 2, 27 and 10 tokens, cut every 9
    docs = segment_docs(x, BOS, M)
    assert docs.segment_ids.shape == (1, T) and docs.max_seqlen == M
    q = torch.randn(1, 4, T, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, T, 8, generator=g, requires_grad=True) for _ in range(2))
    outs, grads = [], []
    for block in (T, 16, 7):  # one mask, then query blocks with a key window of M - 1 + block
        out = docs_mod.sdpa_doc_attention(q, k, v, docs.segment_ids, M, block=block)
        outs.append(out)
        grads.append(torch.autograd.grad((out * out).sum(), (q, k, v)))
    flat = lambda t: t.detach()[0].transpose(0, 1)  # noqa: E731  (T, heads, D)
    cu = segment_cu_seqlens(docs.starts)
    ref = _reference_varlen(flat(q), flat(k), flat(v), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=M,
                            max_seqlen_k=M, causal=True)
    torch.testing.assert_close(outs[0].detach()[0], ref, rtol=0, atol=1e-6)
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-6)
        for a, b in zip(grad, grads[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_rows_of_one_document_take_the_causal_kernel_with_the_same_numbers():
    """Rows whose only segment starts at position 0 (the per-document TTT windows) carry no segment
    ids, so causal_attention takes the plain causal SDPA kernel (2-3x faster than a mask on CPU); its
    output and gradients equal the masked path's. A BOS inside a row keeps the mask."""
    g = torch.Generator().manual_seed(5)
    T = 24
    x = torch.randint(2, V, (3, T), generator=g)
    x[:, 0] = BOS
    docs = build_doc_mask(x, BOS, "sdpa")
    assert docs.segment_ids is None
    x[1, 10] = BOS
    assert build_doc_mask(x, BOS, "sdpa").segment_ids is not None
    q = torch.randn(3, 4, T, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 2, T, 8, generator=g, requires_grad=True) for _ in range(2))
    fast = docs_mod.causal_attention(q, k, v, docs)
    masked = docs_mod.sdpa_doc_attention(q, k, v, torch.ones(3, T, dtype=torch.int32), T)
    torch.testing.assert_close(fast, masked, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad((fast * fast).sum(), (q, k, v)),
                    torch.autograd.grad((masked * masked).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sliding_eval_over_packed_documents_equals_scoring_each_alone():
    """Documents no longer than seq_len - stride + 1 see their whole prefix in either case. A
    document's span ends with the next document's BOS as its last target (#1530's doc split)."""
    g = torch.Generator().manual_seed(7)
    docs = [doc(n, g) for n in (5, 9, 13, 7, 3, 10)]
    stream = torch.cat(docs)
    luts = ByteLUTs(torch.randint(1, 5, (V,), generator=g).to(torch.int16),
                    torch.rand(V, generator=g) < 0.5, torch.arange(V) == BOS)
    m = model(True, **TECHNIQUES["all"])
    common = dict(stride=4, batch_seqs=3, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    loss, bpb = eval_sliding(m, stream, luts, seq_len=16, **common)
    nll = tokens = nbytes = 0.0
    for i, d in enumerate(docs):
        span = torch.cat([d, docs[i + 1][:1]]) if i + 1 < len(docs) else d
        l_d, b_d = eval_sliding(m, span, luts, seq_len=16, **common)
        n = len(span) - 1
        nll, tokens, nbytes = nll + l_d * n, tokens + n, nbytes + l_d * n / (math.log(2) * b_d)
    assert tokens == len(stream) - 1
    assert loss == pytest.approx(nll / tokens, rel=1e-6)
    assert bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_doc_attention_traces_fullgraph_without_breaks(backend, monkeypatch):
    """dynamo with fullgraph=True (a graph break raises) through the mask build and every layer;
    the flex path (CUDA without FlashAttention) is traced on CPU too and agrees with sdpa."""
    import torch._dynamo

    m = model(True, **TECHNIQUES["all"])
    stream, _ = packed()
    with torch.no_grad():
        reference = m.forward_logits(stream[:, :-1])  # sdpa, eager
    monkeypatch.setattr(docs_mod, "doc_backend", lambda device: backend)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager = m.forward_logits(stream[:, :-1])
        traced = torch.compile(m.forward_logits, fullgraph=True, backend="eager")(stream[:, :-1])
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager, reference, rtol=0, atol=1e-5)
    if backend == "sdpa":  # CPU flex_attention has no backward; on CUDA it has
        loss = compiled(stream[:, :-1], stream[:, 1:])  # the training entry, with grad
        loss.backward()
    torch._dynamo.reset()


def test_doc_attention_is_a_config_key_checked_at_compose():
    import pgolf
    from pgolf.errors import PgolfError
    from pgolf.model import check_model

    assert pgolf.compose(["model=tiny"]).model.attention.doc_attention is False
    assert pgolf.compose(["model=tiny", "model.attention.doc_attention=true"]).model.attention.doc_attention is True
    with pytest.raises(PgolfError, match="model.attention.doc_attention"):
        check_model(attention=dict(doc_attention="yes"))


@pytest.mark.slow
def test_run_with_doc_attention_logs_it_and_finishes(fast_cache, tmp_path):
    """`python run.py experiment=smoke model.attention.doc_attention=true` end to end on CPU (short)."""
    from runs import FAST, metrics, run_py

    r = run_py([*FAST, fast_cache, "logger=none", "hydra.run.dir=run", "model.attention.doc_attention=true"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "doc_attention:on bos_id:1 kernel:sdpa" in log
    assert "train_rows:packed" in log  # one packed row per micro-batch (#1530), tests/test_packed_docs.py
    m = metrics(tmp_path / "run")
    assert m["status"] == "finished" and math.isfinite(m["final/quant_sliding_bpb"])
