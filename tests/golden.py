"""The inputs every golden loss was computed on: seeded weights over sorted keys, seeded tokens.

Golden values in test_model.py and test_records.py come from the reference scripts run on
exactly these tensors; changing this recipe invalidates them.
"""

from __future__ import annotations

import torch


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g) * 0.05 for k in sorted(shapes)}


def seeded_tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1024, (2, 128), generator=g), torch.randint(0, 1024, (2, 128), generator=g)


def gptq_inputs(rows: int, cols: int, seed: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (rows, cols) with a few outlier columns and the input Hessian H = X^T X / n of
    activations with per-channel scales and one dead channel (7): the GPTQ goldens' inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, :4] *= 4.0
    x = torch.randn(n, cols, generator=g) * (0.25 + torch.rand(cols, generator=g))
    x[:, 7] = 0.0
    return w, x.T @ x / n


def gptq_state_dict(seed: int = 11) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state dict, Hessians, activation RMS) of a small model-like set of tensors for the per-class
    goldens (#1855 / #1945): tok_emb, one MLP and one attention matrix over 65,536 elements, a
    sparse attention gate (8, 12) and a vector."""
    shapes = {"tok_emb.weight": (1024, 96), "blocks.0.mlp.fc.weight": (384, 192),
              "blocks.0.attn.c_q.weight": (288, 256)}
    sd, hs, rms = {}, {}, {}
    for i, (name, (r, c)) in enumerate(shapes.items()):
        sd[name], hs[name] = gptq_inputs(r, c, seed + i)
        rms[name] = hs[name].diag().sqrt()
    g = torch.Generator().manual_seed(seed + 100)
    sd["blocks.0.attn.attn_gate_w"] = torch.randn(8, 12, generator=g) * 0.3
    sd["blocks.0.attn_scale"] = torch.rand(96, generator=g)
    return sd, hs, rms

# ---- test-time training goldens (tests/test_ttt_goldens.py; issue 20) ----
def seeded_stream(n_targets: int, seed: int, vocab: int = 1024, doc_lens: list[int] | None = None) -> torch.Tensor:
    """A validation stream of n_targets + 1 tokens: randint(2, vocab) with, when `doc_lens` is given,
    a BOS (id 1) at the start of each document of those lengths (the rest one last document)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(2, vocab, (n_targets + 1,), generator=g)
    if doc_lens is not None:
        at = 0
        for n in [0, *doc_lens]:
            at += n
            if at < s.numel():
                s[at] = 1
    return s


def seeded_luts(vocab: int = 1024, seed: int = 7):
    """Byte tables (base bytes 1..4, leading space with p=.5; ids 0, 1 boundary tokens)."""
    from pgolf.evaluate import ByteLUTs

    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (vocab,), generator=g).to(torch.int16)
    space = torch.rand(vocab, generator=g) < 0.5
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:2] = True
    base[:2] = 0
    return ByteLUTs(base, space, boundary)
