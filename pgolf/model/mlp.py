"""The MLP: relu^2 (modded-nanogpt, the baseline) or leaky_relu(slope)^2 (2026-03-23 #549,
slope 0.5; all later records). MLP(x) = W_down act(W_up x)^2, hidden = mlp_mult * dim."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.linear import CastedLinear

MLP_ACTIVATIONS = ("relu2", "leaky_relu2")



@dataclass
class MLPConfig:
    """`model.mlp`: hidden = mlp_hidden, else int(mlp_mult * model_dim); the activation
    relu2 (baseline) or leaky_relu2 with `negative_slope` (2026-03-23 #549)."""

    mlp_mult: float = 2.0
    mlp_hidden: int | None = None
    mlp_activation: str = "relu2"
    negative_slope: float = 0.5

    def hidden(self, model_dim: int) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(self.mlp_mult * model_dim)

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        from pgolf.errors import PgolfError

        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise PgolfError(f"model.mlp.mlp_activation={self.mlp_activation!r} is not one of "
                             f"{', '.join(MLP_ACTIVATIONS)}")
        if self.negative_slope < 0:
            raise PgolfError(f"model.mlp.negative_slope={self.negative_slope} must be >= 0 (0.5 in the records)")
        if self.hidden(model.model_dim) <= 0:
            raise PgolfError(f"model.mlp hidden width {self.hidden(model.model_dim)} must be positive; "
                             "raise model.mlp.mlp_mult or set model.mlp.mlp_hidden")


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
