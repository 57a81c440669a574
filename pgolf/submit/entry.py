"""The `main()` of a bundled `train_gpt.py`.

The bundler (pgolf.submit.bundle) replaces `CONFIG` with a run's resolved config and
`TARGETS` with the callables its `_target_`s name. As in the records' scripts, every value
can be overridden by an environment variable: `SEED`, `ITERATIONS`, `DATA_PATH`,
`MAX_WALLCLOCK_SECONDS`, ... (not the options in `FIXED`, whose other values need code the
bundler left out: `SMEAR_GATE=token` on a script bundled without it is refused). A group key
is set by `GROUP_KEY` (`EVAL_STRIDE`, `MODEL_NUM_LAYERS`) or, when its name has an underscore
or is one of the records' one-word names, by its bare upper-cased name (`NUM_LAYERS`,
`VOCAB_SIZE` sets every group's `vocab_size`); a nested option's key the same way
(`TTT_LORA_RANK` or `EVAL_TTT_TTT_LORA_RANK` sets `eval.ttt.ttt_lora_rank`); one-word keys
such as `name` or `level` need the group prefix so that unrelated environment variables
cannot change a run. A part family's key (`model.attention.xsa_last_n`) is set by its leaf name
as the records spell it (`XSA_LAST_N`; `GATE_WINDOW` sets both places it lives) or by
`MODEL_ATTENTION_XSA_LAST_N`; the records' gate booleans (`SPARSE_ATTN_GATE_ENABLED=1`, ...) select
their choice of `model.attention.gate`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.model.config import gate_flags
from pgolf.runlog import NullLogger
from pgolf.trainer import Job, run_job

CONFIG: dict = {}
TARGETS: dict = {}
FIXED: tuple = ()  # dotted keys whose values decided which parts the bundler left out (pgolf.submit.reach)
FLAGS: dict = {}  # the records' gate booleans -> their model.attention.gate choice, frozen by the bundler
ONE_WORD_NAMES = ("iterations", "beta1", "beta2")  # upstream's env vars without an underscore


def parse_env(name: str, text: str, like: Any) -> Any:
    """An environment variable's text as the type of the value it replaces."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return text.lower() in ("1", "true")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, (list, dict)):
            return json.loads(text)
    except ValueError:
        raise PgolfError(f"{name}={text!r} is not a {type(like).__name__}; e.g. {name}={json.dumps(like)}") from None
    if like is None and text.lower() in ("", "none", "null"):
        return None
    if like is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
    return text


def apply_env(config: dict, environ: dict) -> list[str]:
    """Override `config` in place from `environ`; returns the `NAME=value` pairs applied."""
    applied = []
    for key, value in config.items():
        if not isinstance(value, dict) and key.upper() in environ:
            config[key] = parse_env(key.upper(), environ[key.upper()], value)
            applied.append(f"{key.upper()}={environ[key.upper()]}")
    for group, node in config.items():
        if isinstance(node, dict):
            applied += _apply_node(group, node, environ)
    return list(dict.fromkeys(applied + apply_flags(config, environ)))  # GATE_WINDOW sets two places


def _apply_node(prefix: str, node: dict, environ: dict) -> list[str]:
    """One group's keys and its nested nodes' (a part family such as model.attention, or a nested
    option such as eval.ttt), by their leaves' own names or PREFIX_NODE_KEY: `eval.ttt.ttt_lora_rank`
    from `EVAL_TTT_TTT_LORA_RANK` or the records' `TTT_LORA_RANK` (#1530/#1626's TTT_*, PHASED_TTT_*,
    GLOBAL_TTT_* are eval.ttt's keys upper-cased)."""
    applied = []
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            applied += _apply_node(f"{prefix}_{key}", value, environ)
            continue
        bare = "_" in key or key in ONE_WORD_NAMES
        for name in (f"{prefix}_{key}".upper(), *([key.upper()] if bare else [])):
            if name in environ:
                node[key] = parse_env(name, environ[name], value)
                applied.append(f"{name}={environ[name]}")
                break
    return applied


def apply_flags(config: dict, environ: dict) -> list[str]:
    """The records' mutually exclusive gate booleans onto `model.attention.gate`: a true one
    selects its gate, a false one turns its own gate off (pgolf.model.config.gate_flags)."""
    attention = config.get("model", {}).get("attention")
    flags = FLAGS or gate_flags()
    if not isinstance(attention, dict):
        return []
    named = [f for f in flags if f.upper() in environ]
    on = [f.upper() for f in named if parse_env(f.upper(), environ[f.upper()], False)]
    if len(on) > 1:
        raise PgolfError(f"{on[0]}=1 and {on[1]}=1 are mutually exclusive attention output gates; "
                         "set one (or MODEL_ATTENTION_GATE=<choice>)")
    for flag in named:
        if parse_env(flag.upper(), environ[flag.upper()], False):
            attention["gate"] = flags[flag]
        elif attention.get("gate") == flags[flag]:
            attention["gate"] = "none"
    return [f"{f.upper()}={environ[f.upper()]}" for f in named]


def check_fixed(config: dict) -> None:
    """Refuse an override of an option whose other values need code this script left out."""

    def value(node: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    for dotted in FIXED:
        now, was = value(config, dotted), value(CONFIG, dotted)
        if now != was:
            raise PgolfError(f"{dotted}={now!r}: this script was bundled for {dotted}={was!r} and left out the code "
                             "other values use; bundle a run with that setting (python -m pgolf.submit bundle RUN_DIR)")


def make(node: dict) -> Any:
    """Instantiate a group as Hydra would: `_target_(**keys)`, or a partial with `_partial_`."""
    kwargs = {k: make(v) if isinstance(v, dict) and "_target_" in v else v  # nested, as eval.ttt
              for k, v in node.items() if not k.startswith("_")}
    target = TARGETS.get(node["_target_"])
    if target is None:  # inside the package (not bundled): import it
        module, name = node["_target_"].rsplit(".", 1)
        target = getattr(importlib.import_module(module), name)
    return functools.partial(target, **kwargs) if node.get("_partial_") else target(**kwargs)


def main() -> dict:
    config = copy.deepcopy(CONFIG)
    applied = apply_env(config, dict(os.environ))
    check_fixed(config)
    # All torchrun workers of one job share TORCHELASTIC_RUN_ID, hence one run directory.
    config["run_id"] = os.environ.get("RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or str(uuid.uuid4())
    run_dir = Path(os.environ.get("RUN_DIR") or Path("logs") / config["run_id"])
    if applied and int(os.environ.get("RANK", 0)) == 0:
        print("env overrides: " + " ".join(applied), flush=True)
    job = Job(
        seed=config["seed"], run_id=config["run_id"], device=config["device"], dtype=config["dtype"],
        compile=config["compile"], model_fn=lambda: make(config["model"]), optimizers_fn=make(config["optimizer"]),
        schedule=make(config["schedule"]), eval_spec=make(config["eval"]), quant=make(config["quant"]),
        data=make(config["data"]), logger=NullLogger(), config=config, config_yaml=json.dumps(config, indent=1),
        code_bytes=Path(__file__).stat().st_size, checkpoint=make(config["checkpoint"]), resume=config.get("resume"),
    )
    return run_job(job, run_dir)


def cli() -> None:
    try:
        main()
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
