"""The model as parts: gpt.py composes attention.py, mlp.py, block.py, residual.py,
recurrence.py, rotary.py and embeddings.py; checks.py validates its options at compose time;
banks.py converts banked record checkpoints and adapters.py attaches LoRA-style adapters from
outside."""

from pgolf.model.checks import check_model_args
from pgolf.model.gpt import CONTROL_TENSOR_NAME_PATTERNS, GPT
from pgolf.model.linear import CastedLinear

__all__ = ["GPT", "CONTROL_TENSOR_NAME_PATTERNS", "check_model_args", "CastedLinear"]
