"""The casted linear layer every block matrix uses (and the late-QAT switch it carries)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.roles import MATRIX, set_role
from pgolf.quant import fake_quantize



@dataclass
class QATConfig:
    """`model.qat`: fake-quantize every block linear's weight to `qat_bits` (0 = off; int6 STE of
    records #65/#192) with the exporter's `qat_clip` rule; the schedule decides when it is on."""

    qat_bits: int = 0
    qat_clip: str = "percentile"

    def linear_kwargs(self) -> dict:
        return asdict(self)

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        from pgolf.errors import PgolfError
        from pgolf.quant.treatments import CLIPS

        if self.qat_clip not in CLIPS:
            raise PgolfError(f"model.qat.qat_clip={self.qat_clip!r} is not one of {', '.join(CLIPS)}")
        if self.qat_bits and not 4 <= self.qat_bits <= 8:
            raise PgolfError(f"model.qat.qat_bits={self.qat_bits} must be 0 (off) or in 4..8 (the exporter's range)")


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose fp32 weight is cast to the activation dtype at matmul.

    With `qat_bits` set, the weight is fake-quantized on the way in (straight-through
    estimator, int6 QAT of records #65/#192). `qat_enabled` is a buffer, not a Python
    attribute: a late-QAT switch held as an attribute was constant-folded by
    `torch.compile` in one record and never turned on. Its weight's role is MATRIX (Muon, fp32,
    quantized) unless the part that creates it declares another (roles.py).
    """

    def __init__(self, in_features: int, out_features: int, *, qat_bits: int = 0, qat_clip: str = "percentile"):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits = qat_bits
        self.qat_clip = qat_clip
        set_role(self, "weight", MATRIX)
        self.register_buffer("qat_enabled", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits and self.training:
            # Switch on a tensor so the compiled graph keeps both paths; where() keeps q(w) exact.
            w = torch.where(self.qat_enabled > 0, fake_quantize(w, bits=self.qat_bits, clip=self.qat_clip), w)
        return F.linear(x, w.to(x.dtype))
