"""The output head's softcap: the baseline's scalar tanh cap, or AsymLogit's two learned caps.

AsymLogit (2026-04-29 #1923, from modded-nanogpt #181; in #1945 ... #2135): positive and negative
logits get their own cap, softcap(z) = s+ tanh(z / s+) for z >= 0, s- tanh(z / s-) below, with
s+ = s- = logit_softcap at init (an identity there). In the records nothing updates s+ and s-
(training's fused CE uses the scalar cap, no optimizer holds them, TTT steps only LoRA), so the
option is an identity in every record run; `asym_logit_trainable` lets the optimizer train them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf.errors import PgolfError



@dataclass
class HeadConfig:
    """`model.head`: the logit softcap, and AsymLogit's two caps (`asym_logit_rescale`; trained
    only with `asym_logit_trainable`, which no record did)."""

    logit_softcap: float = 30.0
    asym_logit_rescale: bool = False
    asym_logit_trainable: bool = False

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        if self.logit_softcap <= 0:
            raise PgolfError(f"model.head.logit_softcap={self.logit_softcap} must be positive")
        if self.asym_logit_trainable and not self.asym_logit_rescale:
            raise PgolfError("model.head.asym_logit_trainable=true needs model.head.asym_logit_rescale=true "
                             "(the caps it trains)")


def asym_softcap(z: Tensor, softcap_pos: Tensor, softcap_neg: Tensor) -> Tensor:
    """AsymLogit of logits z (..., V); the caps are 0-d tensors, cast to z's dtype as in #2135's
    `GPT._apply_asym_softcap`."""
    sp, sn = softcap_pos.to(z.dtype), softcap_neg.to(z.dtype)
    return torch.where(z >= 0, sp * torch.tanh(z / sp), sn * torch.tanh(z / sn))
