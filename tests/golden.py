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
