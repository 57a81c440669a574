"""Legal score-first test-time training (issue 20): the scorer, the TTT variants
and the token-only n-gram tilt (`ngram.py`).

`scorer.py` is the one place that scores validation targets; the variants (`chunked.py`,
`lora.py`, `phased.py`) attach optimizers and adapters to the model's own modules from outside
and run the model's one forward path.
"""

from pgolf.ttt.scorer import Context, Event, Scorer, ScoringError, check_ledger, load_ledger

__all__ = ["Context", "Event", "Scorer", "ScoringError", "check_ledger", "load_ledger"]
