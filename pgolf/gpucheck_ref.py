"""The frontier records' own training step on this GPU, for `python -m pgolf.gpucheck --reference CHECKOUT`.

The 1.0611 (#1855) and 1.0565 (#2135) records' `train_gpt.py` import FlashAttention 3
(`flash_attn_interface`) and Triton at module level, so their step is timed only where both import
(a CUDA machine set up as the records'); elsewhere the check is skipped with one line saying so.
The script is imported with its README command's model and training environment, its GPT is built
as its `train_model` builds it (`GPT(h).to(device).bfloat16()`, `torch.compile(dynamic=False,
fullgraph=True)`) and one forward + backward is timed at the per-GPU batch of an 8-GPU run
(`TRAIN_BATCH_TOKENS / 8` tokens as one packed row, `cu_seqlens` every `TRAIN_SEQ_LEN` tokens, bf16
autocast), in its initial state (looping off), against the same measurement of pgolf's preset.
Optimizer steps are left out on both sides.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import lzma
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from pgolf.errors import PgolfError

R = "records/track_10min_16mb/"
# preset -> (record script in a checkout, how to get it, the README command's env that shapes the model and step)
_SHARED = dict(CASEOPS_ENABLED="1", VOCAB_SIZE="8192", SPARSE_ATTN_GATE_ENABLED="1", SPARSE_ATTN_GATE_SCALE="0.5",
               GATE_WINDOW="12", SMEAR_GATE_ENABLED="1", FUSED_CE_ENABLED="1", MIN_LR="0.1", BETA2="0.99",
               LQER_ENABLED="1", LQER_ASYM_ENABLED="1", EMBED_BITS="7")
RECORD_SCRIPTS = {
    "record_0427_pr1855_lqer": (R + "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py",
                                "on main", dict(_SHARED, MATRIX_LR="0.026", GATED_ATTN_QUANT_GATE="1")),
    "record_0501_pr2135_ngram_calib32": (R + "2026-05-01_SP8192_PR2130Base_Calib32/train_gpt.py",
                                         "git fetch origin pull/2135/head and check it out",
                                         dict(_SHARED, MATRIX_LR="0.028", ASYM_LOGIT_RESCALE="1",
                                              SMEAR_GATE_BOS_FIX="0", EVAL_SEQ_LEN="2560", TTT_EVAL_SEQ_LEN="2560")),
}
NEEDS = ("flash_attn_interface", "triton")
_WRAPPED = re.compile(r"""b85decode\(\s*(?:b)?["']([^"']+)["']""")


class Skip(Exception):
    """The record's step cannot be timed here; the message is the one line the check prints."""


def decode_wrapper(src: str) -> str:
    """The source inside an `exec(lzma.decompress(base64.b85decode(...)))` wrapper (either LZMA
    container or a raw LZMA2 stream); `src` unchanged when it is not wrapped."""
    m = _WRAPPED.search(src) if "lzma" in src and len(src) < 200_000 else None
    if m is None or "class GPT" in src:
        return src
    blob = base64.b85decode(m.group(1))
    try:
        return lzma.decompress(blob).decode()
    except lzma.LZMAError:
        return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """os.environ with `values` set for the block, then restored (the scripts read env at import)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def load_record(checkout: Path, preset: str) -> tuple[ModuleType, dict[str, str]]:
    """Import preset's record script from `checkout` (decoded when wrapped) under its run's env.
    Raises Skip when it has no record script here or its GPU-only imports are missing."""
    if preset not in RECORD_SCRIPTS:
        raise Skip(f"no record script is mapped for {preset}")
    rel, how, env = RECORD_SCRIPTS[preset]
    path = Path(checkout) / rel
    if not path.is_file():
        raise Skip(f"{path} not found ({how})")
    missing = [m for m in NEEDS if m not in sys.modules and importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"the record script imports {' and '.join(missing)} (GPU-only), not importable here")
    src = decode_wrapper(path.read_text())
    with tempfile.TemporaryDirectory() as d, environ(env):
        file = Path(d, f"record_{preset}.py")
        file.write_text(src)
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look their module up
        spec.loader.exec_module(module)
    if getattr(module, "BOS_ID", 0) is None:  # set by the script's loader before any forward
        module.BOS_ID = 1
    return module, env


def time_fwd_bwd(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, rounds: int) -> float:
    """Median seconds of `step().backward()` after `warmup` untimed calls (compilation)."""
    times = []
    for i in range(warmup + rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def record_step_s(module: ModuleType, env: dict[str, str], device: torch.device, *, compile: bool,
                  warmup: int = 3, rounds: int = 5, max_tokens: int | None = None) -> tuple[float, int]:
    """(median forward + backward seconds, tokens) of the record's GPT at its per-GPU batch of 8 GPUs
    (at most `max_tokens`, a whole number of sequences)."""
    with environ(env):
        h = module.Hyperparameters()
    model = module.GPT(h).to(device).bfloat16()
    run = torch.compile(model, dynamic=False, fullgraph=True) if compile else model
    seq = int(h.train_seq_len)
    tokens = min(int(h.train_batch_tokens) // 8, max_tokens or 1 << 62) // seq * seq
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, int(h.vocab_size), (1, tokens), generator=g).to(device)
    y = torch.randint(0, int(h.vocab_size), (1, tokens), generator=g).to(device)
    bounds = list(range(0, tokens + 1, seq))
    padded = -(-len(bounds) // 64) * 64  # the records' cu_seqlens bucket of 64
    cu = torch.full((padded,), tokens, dtype=torch.int32)
    cu[:len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
    cu = cu.to(device)
    return time_fwd_bwd(lambda: run(x, y, cu_seqlens=cu, max_seqlen=seq), device, warmup, rounds), tokens


def pgolf_fwd_bwd_s(bench, warmup: int = 1, rounds: int = 5) -> float:
    """The same measurement on pgolf's compiled model of a `pgolf.bench.Bench` (already warmed up)."""
    return time_fwd_bwd(lambda: bench.step_model(bench.x, bench.y), bench.rt.device, warmup, rounds)


def check_args(checkout: str | None) -> None:
    if checkout is not None and not Path(checkout).is_dir():
        raise PgolfError(f"--reference {checkout}: not a directory; pass a checkout of openai/parameter-golf")
