"""Hydra stops here: compose, check and instantiate a config into plain Python objects.

This module and `run.py` are the only places that see a DictConfig. Each group option
names one callable in `_target_`; that callable's typed keyword-only signature is the
schema. `check_config` compares every key and value against it before anything is
allocated, so a typo or a wrong type costs one clear line, not a half-made run.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pgolf.errors import PgolfError

CONF_DIR = Path(os.environ.get("PGOLF_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))
GROUPS = ("model", "optimizer", "schedule", "eval", "quant", "data", "logger", "distributed", "checkpoint")
TOP_LEVEL = {"seed": int, "run_id": str, "device": str, "dtype": str, "compile": str | bool, "resume": str | None}
CHOICES = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", "bf16", "fp32"), "compile": ("auto", True, False)}


def _run_id() -> str:
    # All torchrun workers of one job share TORCHELASTIC_RUN_ID, so they agree on one run directory.
    if os.environ.get("PGOLF_RUN_ID"):
        return os.environ["PGOLF_RUN_ID"]
    import datetime
    import uuid

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"{stamp}_{(elastic or uuid.uuid4().hex)[:8]}" if not elastic else f"torchrun_{elastic[:12]}"


def _sweep_tag() -> str:
    # Sweeps started in the same second got the same `multirun/<time>` and wrote the same job dirs;
    # a random tag after the time keeps them apart (cached, so every job of one sweep agrees).
    import uuid

    return uuid.uuid4().hex[:6]


if not OmegaConf.has_resolver("pgolf_run_id"):
    OmegaConf.register_new_resolver("pgolf_run_id", _run_id, use_cache=True)
if not OmegaConf.has_resolver("pgolf_sweep_tag"):
    OmegaConf.register_new_resolver("pgolf_sweep_tag", _sweep_tag, use_cache=True)


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span lines (the error, the fix, options); join them into one."""
    skip = ("full_key", "object_type", "reference_type", "Set the environment variable HYDRA_FULL_ERROR")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    text = " ".join(lines).split(" Config search path")[0] if lines else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def compose(overrides: list[str] | tuple[str, ...] = (), *, config_name: str = "config",
            config_dir: str | Path | None = None) -> DictConfig:
    """Compose `conf/` with command-line style overrides and check it (PgolfError on bad input)."""
    config_dir = Path(config_dir or CONF_DIR).resolve()
    _refuse_moved_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise PgolfError(f"bad override: {one_line(exc)}") from None
    finally:
        GlobalHydra.instance().clear()
    check_config(cfg)
    return cfg


def _refuse_moved_overrides(overrides) -> None:
    """An override of an old flat model key (`model.xsa_last_n=4`) gets one line naming its new
    place, before Hydra answers that the key is not in the struct."""
    from pgolf.model.config import moved_key

    for text in overrides:
        match = re.match(r"^[+~]*model\.([a-z_0-9]+)(=|$)", str(text))
        moved = moved_key(match.group(1)) if match else None
        if moved:
            raise PgolfError(f"model.{match.group(1)} moved: set {moved} instead (override {text!r})")


def _dataclass_arm(hint: Any) -> type | None:
    """The dataclass a hint allows (`AttentionConfig | dict | None` -> AttentionConfig), if any."""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((arm for arm in arms if dataclasses.is_dataclass(arm)), None)


def _check_nested(where: str, value: dict, kind: type) -> None:
    """A part family's node (`model.attention`) against its typed config: unknown key, wrong type."""
    hints = typing.get_type_hints(kind)
    known = [f.name for f in dataclasses.fields(kind)]
    for key, item in value.items():
        if key not in hints:
            raise PgolfError(f"{where}.{key} is not an option of {where} ({kind.__name__}); known: {', '.join(known)}")
        if not _matches(item, hints[key]):
            raise PgolfError(f"{where}.{key}={item!r} has the wrong type: expected {_type_name(hints[key])}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple, ListConfig)) and all(
            _matches(v, args[0]) for v in value) if args else isinstance(value, (list, tuple, ListConfig))
    if origin is dict or hint is dict:
        return isinstance(value, (dict, DictConfig))
    return True


def _signature(target: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    fn = get_method(target)
    init = fn.__init__ if inspect.isclass(fn) else fn
    params = {n: p for n, p in inspect.signature(fn).parameters.items() if p.kind != p.VAR_KEYWORD}
    return params, typing.get_type_hints(init)


def check_config(cfg: DictConfig) -> None:
    """Every key of every group must be a typed parameter of the group's `_target_`."""
    for key, kind in TOP_LEVEL.items():
        if key in cfg and not _matches(cfg[key], kind):
            raise PgolfError(f"{key}={cfg[key]!r} has the wrong type: expected {_type_name(kind)}")
    for key, allowed in CHOICES.items():
        if key in cfg and cfg[key] not in allowed:
            raise PgolfError(f"{key}={cfg[key]!r} is not one of {', '.join(map(str, allowed))}")
    for group in GROUPS:
        if group not in cfg:
            continue
        node = cfg[group]
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise PgolfError(f"config group {group!r} has no _target_; pick an option with {group}=NAME")
        params, hints = _signature(node._target_)
        runtime = {n for n, p in params.items() if p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD}
        known = sorted(set(params) - runtime)
        for key in node:
            if key.startswith("_"):
                continue
            if key not in params or key in runtime:
                moved = _moved(group, key)
                if moved:
                    raise PgolfError(f"{group}.{key} moved: set {moved} instead")
                raise PgolfError(f"{group}.{key} is not an option of {group} ({node._target_}); "
                                 f"known: {', '.join(known)}")
            value = OmegaConf.to_container(node, resolve=True)[key] if OmegaConf.is_config(node[key]) else node[key]
            hint = hints.get(key, Any)
            nested = _dataclass_arm(hint)
            if nested is not None and isinstance(value, dict):
                _check_nested(f"{group}.{key}", value, nested)
            elif not _matches(value, hint):
                raise PgolfError(f"{group}.{key}={value!r} has the wrong type: expected {_type_name(hint)}")
        missing = [n for n, p in params.items() if p.default is p.empty and n not in runtime and n not in node]
        if missing:
            raise PgolfError(f"{group} is missing {', '.join(missing)}; set {group}.{missing[0]}=...")
    check_values(cfg)


def _moved(group: str, key: str) -> str | None:
    if group != "model":
        return None
    from pgolf.model.config import moved_key

    return moved_key(key)


def check_values(cfg: DictConfig) -> None:
    """Cross-field checks that need no allocation: model shapes and options, the eval window
    against the train length, quant rules' syntax, data options. Weights come later."""
    from pgolf.model import check_model

    if "model" in cfg:
        check_model(**{k: v for k, v in to_container(cfg.model).items() if not k.startswith("_")})
    if "schedule" in cfg and "eval" in cfg:
        build(cfg, "eval").resolve(build(cfg, "schedule").train_seq_len)
    for group in ("quant", "data", "checkpoint", "distributed", "logger"):  # cheap, side-effect-free constructors
        if group in cfg:
            build(cfg, group)
    from pgolf.config_checks import check_groups

    check_groups(to_container(cfg))  # across groups, and the optimizer's (built later with the model)
    if "quant" in cfg and "schedule" in cfg:  # GPTQ calibration must fit in the training budget
        from pgolf.quant.calibrate import check_calibration_budget

        check_calibration_budget(build(cfg, "quant"), build(cfg, "schedule"))


def build(cfg: DictConfig, group: str, *args: Any) -> Any:
    """Instantiate one group; runtime objects (the model, ...) are passed here, never stored in config."""
    node = cfg[group]
    try:
        obj = instantiate(node, _convert_="all")
    except Exception as exc:  # instantiate wraps the target's own errors
        cause = exc.__cause__ or exc
        if isinstance(cause, PgolfError):
            raise cause from None
        raise
    return obj(*args) if args else obj


def label_job(cfg: DictConfig, *, group: str, name: str, job_type: str) -> None:
    """Fill the logger's group/name/job_type (when not set by the user) for a sweep's job."""
    if "logger" not in cfg:
        return
    with open_dict(cfg.logger):
        for key, value in (("group", group), ("name", name), ("job_type", job_type)):
            if key in cfg.logger and cfg.logger[key] is None:
                cfg.logger[key] = value
        if "tags" in cfg.logger and job_type not in cfg.logger.tags:
            cfg.logger.tags = [*cfg.logger.tags, job_type]


def build_model(cfg: DictConfig):
    """The GPT of a composed config (weights on CPU, fp32, initialized with `cfg.seed`)."""
    import torch

    torch.manual_seed(cfg.seed)
    return build(cfg, "model")


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's parts rebuilt from its config.yaml, as plain objects (for pgolf.audit):
    config (dict), model_fn, eval, schedule, data, quant."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise PgolfError(f"{path} does not exist; pass the directory of a finished run (it holds config.yaml)")
    cfg = OmegaConf.load(path)
    return {"config": to_container(cfg), "model_fn": lambda: build_model(cfg), "eval": build(cfg, "eval"),
            "schedule": build(cfg, "schedule"), "data": build(cfg, "data"), "quant": build(cfg, "quant")}


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def train(cfg: DictConfig, *, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one job of a composed config and return its final metrics (the keys of metrics.json)."""
    from pgolf.submit.bundle import code_bytes
    from pgolf.trainer import Job, run_job

    check_config(cfg)
    config = to_container(cfg)
    job = Job(
        seed=cfg.seed, run_id=cfg.run_id, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
        model_fn=lambda: build(cfg, "model"), optimizers_fn=build(cfg, "optimizer"), schedule=build(cfg, "schedule"),
        eval_spec=build(cfg, "eval"), quant=build(cfg, "quant"), data=build(cfg, "data"), logger=build(cfg, "logger"),
        config=config, config_yaml=to_yaml(cfg),
        # The counted code is the script a submission ships: this run's train_gpt.py, minified and wrapped.
        code_bytes=code_bytes(config),
        checkpoint=build(cfg, "checkpoint") if "checkpoint" in cfg else None, resume=cfg.get("resume"),
    )
    return run_job(job, Path(run_dir) if run_dir is not None else Path("outputs") / str(cfg.run_id))
