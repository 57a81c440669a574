"""Parameters that get no gradient in some phase of a run, so DDP must be told to expect them.

DDP (find_unused_parameters=False, the fast default) requires every parameter to receive a
gradient in every backward, else the next step fails ("Expected to have finished reduction in
the prior iteration"). Some parts idle by design: #1204's untied repeat MLPs until looping
switches on, the value residual's lambda at layer 0, a disabled layer-0 attention. `idle_params`
finds them by a probe: one tiny forward and backward per loop-pass count the run will use, on
the real model, whose weights, gradients and loop state are restored afterwards (issue 21 item 6).
"""

from __future__ import annotations

import torch
from torch import nn

def idle_params(model: nn.Module, vocab_size: int, device: torch.device, pass_counts: list[int]) -> list[str]:
    """Names of parameters without a gradient after a probe step at any of `pass_counts` (the loop-pass
    counts the run switches through, `compile_limits.loop_pass_counts`)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = getattr(model, "loop_passes", 0)
    idle: set[str] = set()
    x = torch.arange(16, device=device).remainder(vocab_size).view(1, 16)
    for passes in pass_counts if hasattr(model, "set_looping") else [start]:
        if hasattr(model, "set_looping"):
            model.set_looping(passes)
        model.zero_grad(set_to_none=True)
        model(x, x).backward()
        idle |= {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    model.zero_grad(set_to_none=True)
    if hasattr(model, "set_looping"):
        model.loop_passes = start  # (set_looping would copy MLPs again; the state is restored below)
    model.load_state_dict(saved, strict=True)
    return sorted(idle)
