"""pgolf: Hydra-composed experiments for OpenAI's Parameter Golf challenge.

The small API for notebooks and tests:
    cfg = pgolf.compose(["experiment=smoke", "seed=42"])
    model = pgolf.build_model(cfg)
    metrics = pgolf.train(cfg)      # dict of final metrics, as in metrics.json
"""

from pgolf.build import build_model, compose, train
from pgolf.errors import PgolfError

__all__ = ["PgolfError", "build_model", "compose", "train"]
