"""The MLP: relu^2 (modded-nanogpt, the baseline) or leaky_relu(slope)^2 (2026-03-23 #549,
slope 0.5; all later records). MLP(x) = W_down act(W_up x)^2, hidden = mlp_mult * dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.linear import CastedLinear

MLP_ACTIVATIONS = ("relu2", "leaky_relu2")


class MLP(nn.Module):
    """(..., dim) -> (..., dim) through `hidden` units; `fc` and `proj` as in every record."""

    def __init__(self, dim: int, hidden: int, qat: dict, *, activation: str = "relu2", negative_slope: float = 0.5):
        super().__init__()
        self.fc = CastedLinear(dim, hidden, **qat)
        self.proj = CastedLinear(hidden, dim, **qat)
        self.proj._zero_init = True
        self.negative_slope = negative_slope if activation == "leaky_relu2" else 0.0

    def describe(self) -> str | None:
        """One line for the record README (None for the baseline's relu^2)."""
        if not self.negative_slope:
            return None
        return f"LeakyReLU({self.negative_slope:g})^2 MLP, hidden {self.fc.out_features} (2026-03-23 #549)"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, negative_slope=self.negative_slope) if self.negative_slope else torch.relu(h)
        return self.proj(h.square())
