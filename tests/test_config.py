"""Composition and checking: every bad value fails at compose time with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import pgolf
from pgolf.build import build, check_config
from pgolf.errors import PgolfError

ROOT = Path(__file__).resolve().parent.parent


def test_default_composition_is_the_naive_baseline():
    cfg = pgolf.compose()
    m, o, s, q = cfg.model, cfg.optimizer, cfg.schedule, cfg.quant
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp.mlp_mult, m.vocab_size) == (
        9, 512, 8, 4, 2.0, 1024)
    assert (m.tie_embeddings, m.init.tied_embed_init_std, m.attention.rope_base, m.head.logit_softcap,
            m.attention.qk_gain_init) == (True, 0.005, 10000.0, 30.0, 1.5)

    assert (s.train_batch_tokens, s.train_seq_len, s.iterations, s.max_wallclock_seconds) == (524288, 1024, 20000, 600.0)
    assert (s.warmup_steps, s.warmdown_iters) == (20, 1200)
    assert (o.matrix_lr, o.muon_momentum, o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps) == (
        0.04, 0.95, 0.85, 500)
    assert (o.muon_backend_steps, o.beta1, o.beta2, o.adam_eps, o.tied_embed_lr, o.scalar_lr) == (
        5, 0.9, 0.95, 1e-8, 0.05, 0.04)
    assert (q.preset, q.compressor, q.level) == ("int8", "zlib", 9)
    assert cfg.seed == 1337 and cfg.data.name == "fineweb10B_sp1024"


def test_the_baseline_model_yaml_lists_every_part_option_at_its_default():
    """conf/model/baseline.yaml is the options' catalogue: every field of every part family's typed
    config, at the dataclass default (where the default lives); nothing else."""
    import dataclasses

    from pgolf.model.config import FAMILIES, ModelConfig

    m = OmegaConf.to_container(pgolf.compose(["model=baseline"]).model, resolve=True)
    defaults = dataclasses.asdict(ModelConfig(vocab_size=m["vocab_size"]))
    assert {k: v for k, v in m.items() if k != "_target_"} == defaults
    assert set(FAMILIES) <= set(m)


def test_baseline_param_count_matches_the_challenge_log():
    model = pgolf.build_model(pgolf.compose())
    assert sum(p.numel() for p in model.parameters()) == 17_059_912  # naive baseline log: model_params:17059912


@pytest.mark.parametrize("overrides,message", [
    (["+model.foo=1"], "model.foo is not an option of model"),
    (["model.foo=1"], "bad override: Could not override 'model.foo'"),
    (["model.num_layers=abc"], "model.num_layers='abc' has the wrong type: expected int"),
    (["schedule.iterations=1.5"], "schedule.iterations=1.5 has the wrong type"),
    (["model.tie_embeddings=3"], "model.tie_embeddings=3 has the wrong type: expected bool"),
    (["model.model_dim=500"], "model.model_dim=500 is not divisible by model.num_heads=8"),
    (["model.num_kv_heads=3"], "model.num_heads=8 is not divisible by model.num_kv_heads=3"),
    (["model.model_dim=24"], "head_dim"),
    (["model.embeddings.smear_gate=foo"], "model.embeddings.smear_gate='foo' is not one of"),
    (["eval.stride=0"], "eval.stride=0 must be in 1..1024"),
    (["eval.stride=2048"], "eval.stride=2048 must be in 1..1024"),
    (["model=nope"], "Could not find 'model/nope'"),
    (["device=tpu"], "device='tpu' is not one of auto, cpu, cuda"),
    (["quant.compressor=lz4"], "compressor 'lz4' is unknown"),
    (["schedule.train_seq_len=0"], "schedule.train_seq_len=0 must be positive"),
])
def test_bad_config_values_raise_one_line(overrides, message):
    with pytest.raises(PgolfError) as e:
        pgolf.compose(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_group_key_is_a_parameter_of_its_target():
    cfg = pgolf.compose(["experiment=smoke"])
    check_config(cfg)
    for group in ("optimizer", "schedule", "eval", "quant", "data", "logger"):
        assert build(cfg, group) is not None


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("sweep,params", [("seeds", {"seed"}), ("weight_decay", {"optimizer.muon_weight_decay", "seed"}),
                                          ("significance", {"experiment", "seed"})])
def test_sweep_files_compose(tmp_path, sweep, params):
    job = run_cli("--config-dir", str(ROOT / "sweeps"), "--config-name", sweep, "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "model:" in job.stdout and "seed:" in job.stdout
    hydra_cfg = run_cli("--config-dir", str(ROOT / "sweeps"), "--config-name", sweep, "--cfg", "hydra", cwd=tmp_path)
    assert hydra_cfg.returncode == 0 and "mode: MULTIRUN" in hydra_cfg.stdout
    for key in params:
        assert f"{key}:" in hydra_cfg.stdout


def test_api_names_survive_importing_every_module():
    # A submodule named like an API function would replace it on import (pgolf.train once did).
    import importlib
    import pkgutil

    for mod in pkgutil.walk_packages(pgolf.__path__, "pgolf."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    assert callable(pgolf.train) and callable(pgolf.compose) and callable(pgolf.build_model)
