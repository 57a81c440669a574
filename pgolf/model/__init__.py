"""The model as parts: gpt.py composes attention.py, mlp.py, block.py, residual.py,
recurrence.py, rotary.py and embeddings.py; checks.py validates its options at compose time;
banks.py converts banked record checkpoints and adapters.py attaches LoRA-style adapters from
outside; roles.py holds the parameter roles each part declares (optimizer group, dtype, export
class)."""

from pgolf.model.checks import check_model_args
from pgolf.model.gpt import GPT
from pgolf.model.linear import CastedLinear

__all__ = ["GPT", "check_model_args", "CastedLinear"]
