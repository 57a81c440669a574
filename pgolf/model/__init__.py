"""The model as parts: gpt.py composes attention.py, mlp.py, block.py, residual.py,
recurrence.py, rotary.py and embeddings.py; config.py groups each part family's typed config
(its options, defaults and checks live beside the part); banks.py converts banked record
checkpoints and adapters.py attaches LoRA-style adapters from outside; roles.py holds the
parameter roles each part declares (optimizer group, dtype, export class)."""

from pgolf.model.config import ModelConfig, check_model, from_flat
from pgolf.model.gpt import GPT
from pgolf.model.linear import CastedLinear

__all__ = ["GPT", "ModelConfig", "check_model", "from_flat", "CastedLinear"]
