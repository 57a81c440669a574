"""Calibration: the input Hessians H = X^T X / N of every quantized weight, from hooks on the
model's own modules, and where the tokens come from.

Hooks attach from outside to any `nn.Module`: every `nn.Linear` sees its input (q, k and v share
theirs, the attention output projection sees the gated attention output, the MLP down projection
its activation), and a tied embedding sees the output of the model's `final_norm` module, its
input as the LM head (04-05 #1394's `make_output_hook`). A module called more than once per
forward (looped layers) accumulates every call; H is divided by the number of batches, as the
records' `collect_hessians` does. The same hooks also sum x^2 per input channel for AWQ-lite's
activation RMS (#1908).

Sources (legality, issue 19): `train` reads training batches right after the loop, inside the
budget that `schedule.gptq_reserve_seconds` kept free (03-29 #1060 on); the run records when the
last one was read against the cap. `generated` samples sequences from the model itself, touching
no data (03-25 #1019: 64 x 2048 tokens at temperature 0.8 from a random first token, seeded).
Validation data is never calibration data (refused at compose time, pgolf/build.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError

SOURCES = ("none", "train", "generated")


@dataclass
class Calibration:
    """Hessians {weight name: (in, in) fp32 CPU}, activation RMS {weight name: (in,)}, and the
    record the audit reads (`metrics.json["calibration"]`, see `record`)."""

    hessians: dict[str, Tensor]
    act_rms: dict[str, Tensor]
    source: str = "none"
    batches: int = 0
    seconds: float = 0.0
    last_train_token_s: float | None = None
    cap_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def after_cap(self) -> bool:
        return bool(self.cap_s and self.last_train_token_s is not None and self.last_train_token_s > self.cap_s)

    def record(self) -> dict:
        """{"source", "batches", "seconds", "last_train_token_s", "cap_s", "after_cap"}: the contract
        of metrics.json's `calibration` object (read by the audit command)."""
        return {"source": self.source, "batches": self.batches, "seconds": round(self.seconds, 3),
                "last_train_token_s": self.last_train_token_s, "cap_s": self.cap_s, "after_cap": self.after_cap}


NO_CALIBRATION = {"source": "none", "batches": 0, "seconds": 0.0, "last_train_token_s": None, "cap_s": None,
                  "after_cap": False}


class HessianHooks:
    """Forward hooks that accumulate X^T X (and sum x^2, row counts) per weight name.

    `names` limits the taps to those weight names (None: every linear and the tied head). Use as a
    context manager; the hooks are removed on exit, whatever happens."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        self.model, self.names = model, None if names is None else set(names)
        self.sums: dict[str, Tensor] = {}
        self.sumsq: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list = []
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (input, X^T X, sum x^2) of the previous call

    def taps(self) -> dict[str, tuple[nn.Module, str]]:
        """{weight name: (module, "input" | "output")} for this model."""
        out: dict[str, tuple[nn.Module, str]] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                out[f"{name}.weight" if name else "weight"] = (module, "input")
        head_in = getattr(self.model, "final_norm", None)
        if getattr(self.model, "tie_embeddings", False) and isinstance(head_in, nn.Module):
            out["tok_emb.weight"] = (head_in, "output")
        return {k: v for k, v in out.items() if self.names is None or k in self.names}

    def _hook(self, name: str, side: str) -> Callable:
        def fn(module: nn.Module, inp: tuple, out: Tensor) -> None:
            x = out if side == "output" else inp[0]
            if self._last is not None and self._last[0] is x:  # q, k, v: one input, one product
                xtx, sq = self._last[1], self._last[2]
            else:
                xf = x.detach().float().reshape(-1, x.shape[-1])  # (N, in)
                xtx, sq = xf.T @ xf, xf.square().sum(dim=0)
                self._last = (x, xtx, sq)
            if name not in self.sums:
                self.sums[name], self.sumsq[name], self.rows[name] = torch.zeros_like(xtx), torch.zeros_like(sq), 0
            self.sums[name] += xtx
            self.sumsq[name] += sq
            self.rows[name] += x.numel() // x.shape[-1]
        return fn

    def __enter__(self) -> "HessianHooks":
        for name, (module, side) in self.taps().items():
            self._handles.append(module.register_forward_hook(self._hook(name, side)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def result(self, num_batches: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(H = sum X^T X / num_batches, act_rms = sqrt(sum x^2 / rows)), both on CPU."""
        hessians = {k: v.cpu() / num_batches for k, v in self.sums.items()}
        act_rms = {k: (v / max(self.rows[k], 1)).sqrt().cpu() for k, v in self.sumsq.items()}
        return hessians, act_rms


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[Tensor], *, names: Iterable[str] | None = None,
                     autocast: Callable = nullcontext) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """Run `model.forward_logits(x)` for each token batch x (B, T) in eval mode with the hooks on;
    return (hessians, act_rms, number of batches). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        with HessianHooks(model, names) as hooks:
            for x in batches:
                with autocast():
                    model.forward_logits(x)
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise PgolfError("calibration saw no batches; set quant.gptq_calibration_batches >= 1")
    return (*hooks.result(n), n)


@torch.no_grad()
def generate_tokens(model: nn.Module, *, num_seqs: int, seq_len: int, vocab_size: int, temperature: float,
                    seed: int, batch_size: int, device: torch.device | str = "cpu",
                    autocast: Callable = nullcontext) -> list[Tensor]:
    """Sequences the model samples itself (03-25 #1019 `generate_autoregressive_calib`): each batch
    starts from uniform random first tokens and extends by multinomial sampling of
    softmax(logits / temperature), one generator seeded with `seed`. Returns (1, seq_len) tensors."""
    was_training = model.training
    model.eval()
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    seqs: list[Tensor] = []
    try:
        for start in range(0, num_seqs, batch_size):
            bs = min(batch_size, num_seqs - start)
            tokens = torch.randint(0, vocab_size, (bs, 1), device=device, generator=rng)
            for _ in range(seq_len - 1):
                with autocast():
                    logits = model.forward_logits(tokens)[:, -1, :]
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=rng)], dim=1)
            seqs += [tokens[i:i + 1] for i in range(bs)]
    finally:
        model.train(was_training)
    return seqs


def calibrate(*, source: str, model: nn.Module, names: Iterable[str], num_batches: int,
              next_batch: Callable[[], Tensor], train_s: float, cap_s: float | None, log: Callable[[str], None],
              generate: dict, vocab_size: int, device: torch.device | str = "cpu",
              autocast: Callable = nullcontext, damp: float = 0.0) -> Calibration | None:
    """The one call at the end of training: collect the Hessians of `names` from `source`.

    `train`: `num_batches` batches from `next_batch()` (the training loader, continued), timed from
    `train_s` (training seconds used, eval excluded) so the run records when it read its last
    training token against `cap_s`; past the cap is logged as an error (the audit flags it).
    `generated`: `generate` holds generate_tokens' count, length, temperature, seed and batch size.
    `damp` > 0 adds damp * mean(diag H) I (floor 1e-6) to each H at collection, as 03-25 / 03-29 did
    before their GPTQ damped it again (`_finalize_hessians`, `collect_hessians_from_tokens`)."""
    names = sorted(names)
    if source == "none" or not names:
        return None
    t0 = time.perf_counter()
    last_read = None
    if source == "train":
        def batches():
            nonlocal last_read
            for _ in range(num_batches):
                x = next_batch()
                last_read = time.perf_counter()
                yield x
        hessians, act_rms, n = collect_hessians(model, batches(), names=names, autocast=autocast)
        last_token_s = train_s + (last_read - t0)
    elif source == "generated":
        seqs = generate_tokens(model, vocab_size=vocab_size, device=device, autocast=autocast, **generate)
        hessians, act_rms, n = collect_hessians(model, (s[:, :-1] for s in seqs), names=names, autocast=autocast)
        last_token_s = None
    else:
        raise PgolfError(f"quant.calibration={source!r} is not a calibration source; use one of {', '.join(SOURCES)}")
    if damp > 0:
        hessians = {k: H + damp * torch.diag(H).mean().clamp_min(1e-6) * torch.eye(H.shape[0]) for k, H in hessians.items()}
    cal = Calibration(hessians, act_rms, source=source, batches=n, seconds=time.perf_counter() - t0,
                      last_train_token_s=None if last_token_s is None else round(last_token_s, 3), cap_s=cap_s)
    missing = [k for k in names if k not in hessians]
    if missing:
        raise PgolfError(f"calibration found no input for {missing[0]} (no nn.Linear owns it and it is not a tied "
                         "embedding behind final_norm); give that tensor a treatment without GPTQ")
    log(f"calibration: source:{source} batches:{n} hessians:{len(hessians)} seconds:{cal.seconds:.2f}"
        + (f" last_train_token_s:{cal.last_train_token_s:.3f} cap_s:{cap_s}" if source == "train" else ""))
    if source == "train":
        if cal.after_cap:
            log(f"calibration: ERROR read training data {cal.last_train_token_s - cap_s:.3f}s after the "
                f"{cap_s:.0f}s cap; raise schedule.gptq_reserve_seconds (this run is not a legal record)")
        elif cap_s:
            log(f"calibration: last training token read {cap_s - cal.last_train_token_s:.3f}s before the cap")
    return cal


CALIBRATION_FILE = "calibration.pt"


def keep_calibration(run_dir, calibration: Calibration | None, *, master: bool = True) -> Calibration | None:
    """Save a fresh calibration beside final_model.pt (rank 0), or load the saved one when a resumed
    run exports again: training data cannot be read a second time once the budget is spent."""
    path = Path(run_dir) / CALIBRATION_FILE
    if calibration is not None:
        if master:
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save({"hessians": calibration.hessians, "act_rms": calibration.act_rms,
                        "record": calibration.record()}, tmp)
            tmp.replace(path)
        return calibration
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    rec = saved["record"]
    return Calibration(saved["hessians"], saved["act_rms"], source=rec["source"], batches=rec["batches"],
                       seconds=rec["seconds"], last_train_token_s=rec["last_train_token_s"], cap_s=rec["cap_s"])


def check_calibration_budget(spec, schedule) -> None:
    """Refuse before training a train-data calibration that would read after a wall-clock cap:
    with a cap, the loop must stop `gptq_reserve_seconds` early (03-29 #1060; #1868 reran #1851
    with 8 s to prove compliance)."""
    if getattr(spec, "calibration", "none") != "train" or not spec.hessian_needed:
        return
    if schedule.max_wallclock_seconds > 0 and schedule.gptq_reserve_seconds <= 0:
        raise PgolfError(f"quant.calibration=train with schedule.max_wallclock_seconds={schedule.max_wallclock_seconds:g} "
                         "and no schedule.gptq_reserve_seconds would read training data after the cap; set "
                         "schedule.gptq_reserve_seconds (records: 4-14 s) or quant.calibration=generated")
