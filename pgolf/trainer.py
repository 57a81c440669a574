"""One Parameter Golf job: data -> model -> optimizer -> train -> quantize -> roundtrip eval -> log.

`run_job` reads top to bottom like the challenge's `main()`: setup, warmup that primes
the compiled paths and then restores the initial state, the training loop with its
wall-clock stop agreed across ranks, then export and the one scoring path: the
headline number comes from the dequantized artifact, evaluated the same way every time.
Eval time does not count as train time.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pgolf.checkpoint import (CHECKPOINT_DIR, FINAL_STATE, Checkpointing, Preemption, can_resume, fault_point,
                              final_state, final_state_bytes, restore_checkpoint, resume_source, rng_state,
                              save_checkpoint)
from pgolf.data import load_validation_tokens
from pgolf.compile_limits import allow_graphs, eval_batch_sizes, graphs_needed, loop_pass_counts
from pgolf.config_checks import check_bos
from pgolf.idle_params import idle_params
from pgolf.data.byte_counts import check_validation, load_sidecar
from pgolf.data.packing import PackedRows, pack_documents
from pgolf.errors import SIZE_CAP_BYTES, PgolfError
from pgolf.evaluate import build_byte_luts, eval_sliding, eval_standard
from pgolf.model.docs import doc_backend
from pgolf.quant import load_artifact
from pgolf.quant.calibrate import NO_CALIBRATION, keep_calibration
from pgolf.progressive import SeqGrowth, train_shapes
from pgolf.runlog import RunLog, describe_environment
from pgolf.schedule import EMA, SWA, loop_passes



@dataclass
class Job:
    """Everything a job needs, as plain objects (built by pgolf.build from a config)."""

    seed: int
    run_id: str
    device: str
    dtype: str
    compile: str | bool
    model_fn: Callable[[], nn.Module]
    optimizers_fn: Callable[[nn.Module], Any]
    schedule: Any
    eval_spec: Any
    quant: Any
    data: Any
    logger: Any
    config: dict
    config_yaml: str
    code_bytes: int
    checkpoint: Any = None
    resume: str | None = None


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    compile: bool
    rank: int
    world_size: int
    local_rank: int
    distributed: bool
    owns_group: bool = False  # this run opened the process group, so it closes it

    @property
    def master(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Close the process group this run opened, as the baseline does at its end: left open,
        gloo's threads race interpreter exit and can abort a worker that finished
        ("terminate called without an active exception")."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(job: Job) -> Runtime:
    """Device, dtype and process group. CUDA: bf16 autocast + compile + NCCL; CPU: fp32, gloo."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if 8 % world_size:
        raise PgolfError(f"WORLD_SIZE={world_size} must divide 8 (grad accumulation is 8 // world_size)")
    kind = job.device if job.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PgolfError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    owns_group = distributed and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                **({"device_id": device} if kind == "cuda" else {}))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(job.dtype, torch.bfloat16 if kind == "cuda" else torch.float32)
    compiled = (kind == "cuda") if job.compile == "auto" else bool(job.compile)
    return Runtime(device, dtype, compiled, rank, world_size, local_rank, distributed, owns_group)


def place_model(model: nn.Module, rt: Runtime) -> nn.Module:
    """Move to the device; in bf16 runs each parameter takes its role's dtype (roles.py: fp32 for
    matrices and control tensors, bf16 for embedding tables, as the baseline places them)."""
    from pgolf.model.linear import CastedLinear
    from pgolf.model.roles import roles_of

    model = model.to(rt.device)
    if rt.dtype == torch.bfloat16:
        roles = roles_of(model)
        model = model.bfloat16()
        for m in model.modules():
            if isinstance(m, CastedLinear):
                m.float()  # its QAT switch buffer stays fp32
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if roles[name].fp32 else torch.bfloat16)
    return model


def write_atomic(path: Path, data: bytes) -> None:
    """Write then rename, so no reader ever sees half a file; a full disk names the path."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PgolfError(f"could not write {path}: {e.strerror or e}; free disk space or pick another run "
                         "directory") from None


def check_disk(run_dir: Path, n_params: int) -> None:
    """Fail before training, not after it, when the run's files cannot fit: final_model.pt, the
    artifact and a checkpoint with its swap copy, each at most 4 bytes per parameter."""
    need, free = 4 * 4 * n_params, shutil.disk_usage(run_dir).free
    if free < need:
        raise PgolfError(f"{run_dir} has {free / 1e6:.1f} MB free but this run writes up to {need / 1e6:.1f} MB "
                         "(final_model.pt, artifact, checkpoints); free space or pick another hydra.run.dir")


def hardware(rt: Runtime) -> str:
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"CPU {platform.machine()}"
    return f"{rt.world_size}x{name}"


def any_rank(flags: list[bool], rt: Runtime) -> list[bool]:
    """Each flag is true if it is true on any rank: one all-reduce for all stop decisions."""
    if not rt.distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def unigram_bpb(train_pattern: str, val_tokens: torch.Tensor, luts, vocab_size: int,
                sidecar: torch.Tensor | None = None) -> float:
    """bpb of a unigram model fit on the first 10M train tokens (add-one smoothing): the floor to beat.
    The bytes are the sidecar's when there is one (CaseOps), else the tables'."""
    from pgolf.data import TokenStream

    first = TokenStream(train_pattern, vocab_size=vocab_size).tokens[:10_000_000].to(torch.int64)  # checks the shards
    counts = torch.bincount(first, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    y, x = val_tokens[1:].to(torch.int64), val_tokens[:-1].to(torch.int64)
    nll = -logp[y].sum().item()
    num_bytes = luts.count(x, y).double().sum().item() if sidecar is None else sidecar[1:].double().sum().item()
    if num_bytes == 0:  # bpb divides by it
        raise PgolfError(f"the validation split's {y.numel()} targets decode to no bytes (only control tokens such as "
                         "BOS); bpb is undefined: check that the shards were made with this tokenizer")
    return nll / math.log(2.0) / num_bytes


def run_job(job: Job, run_dir: Path) -> dict[str, Any]:
    # SIGTERM/SIGUSR1 from here to metrics.json leave a state `resume=` finishes (see stop_preempted)
    with Preemption() as preemption:
        metrics, rt = _run_job(job, run_dir, preemption)
    # Closed once _run_job's frame (the model, and DDP's reducer holding the process group) is gone:
    # a group destroyed while DDP still held it was freed at interpreter exit, where gloo's threads
    # aborted a finished worker about one run in two ("terminate called without an active exception").
    gc.collect()
    rt.close()
    return metrics


@dataclass
class RunData:
    """What the data step hands on: the token files, validation tokens and their byte tables."""

    paths: Any
    vocab: int
    grad_accum: int
    eval_seq_len: int
    stride: int
    val_tokens: torch.Tensor
    luts: Any
    token_bytes: torch.Tensor | None
    unigram_bpb: float


@dataclass
class Model:
    """The model as each consumer needs it: `base` (weights, export, sliding eval), `compiled`,
    `train` (DDP-wrapped when distributed) and its optimizers."""

    base: nn.Module
    compiled: nn.Module
    train: nn.Module
    opt: Any
    has_qat: bool
    n_params: int
    pass_counts: list[int]  # the loop-pass counts the run switches through (compile_limits.loop_pass_counts)
    shapes: list[tuple[int, int]]  # the (train length, pass count) pairs it trains at (progressive.train_shapes)


def start_run(job: Job, run_dir: Path) -> tuple[Runtime, RunLog, Path]:
    """Runtime, run directory and log (the resolved config and environment first), then the seeds."""
    rt = setup_runtime(job)
    run_dir = run_dir.resolve()
    if rt.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PgolfError(f"run directory {run_dir} is not writable; pick another hydra.run.dir")
    log = RunLog(run_dir, master=rt.master)
    if rt.master:
        write_atomic(run_dir / "config.yaml", job.config_yaml.encode())
    log(job.config_yaml, console=False)
    log(describe_environment(rt.device), console=False)
    log(f"run_dir:{run_dir}")
    random.seed(job.seed)
    np.random.seed(job.seed)
    torch.manual_seed(job.seed)
    return rt, log, run_dir


def load_data(job: Job, rt: Runtime, log: RunLog) -> RunData:
    """Build or find the dataset (rank 0 first), check the tokenizer against the model's vocab and
    the batch against the world size, load the validation tokens and their byte counts."""
    import sentencepiece as spm

    paths = job.data.ensure() if rt.master else None
    if rt.distributed:  # rank 0 may have built the dataset; the others wait, then resolve
        dist.barrier()
        paths = job.data.ensure() if paths is None else paths
    sched = job.schedule
    eval_seq_len, stride = job.eval_spec.resolve(sched.train_seq_len)
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer_path))
    vocab = int(job.config["model"]["vocab_size"])
    check_bos(sp.bos_id(), model_bos=job.config["model"].get("bos_id"), data_bos=job.config["data"].get("bos_id"),
              tokenizer_path=paths.tokenizer_path)  # every part that looks for a BOS uses the tokenizer's
    if int(sp.vocab_size()) != vocab:
        raise PgolfError(f"model.vocab_size={vocab} does not match the tokenizer {paths.tokenizer_path} "
                         f"(vocab {sp.vocab_size()}); set model.vocab_size={sp.vocab_size()}")
    grad_accum = 8 // rt.world_size
    local_tokens = sched.train_batch_tokens // (rt.world_size * grad_accum)
    if local_tokens % sched.train_seq_len or local_tokens == 0:
        raise PgolfError(f"schedule.train_batch_tokens={sched.train_batch_tokens} must split into whole sequences of "
                         f"{sched.train_seq_len} over {rt.world_size * grad_accum} micro-batches; use a multiple of "
                         f"{rt.world_size * grad_accum * sched.train_seq_len}")
    val_tokens = load_validation_tokens(paths.val_pattern, eval_seq_len, vocab_size=vocab)
    cpu_luts = build_byte_luts(sp, vocab)
    # CaseOps data charges each target its original-text bytes from the sidecar (PR #1729);
    # otherwise the byte tables, checked against the decoded validation documents first.
    sidecar = load_sidecar(paths.val_bytes_pattern, val_tokens.numel()) if paths.val_bytes_pattern else None
    log(check_validation(sp, cpu_luts, val_tokens, sidecar, pattern=paths.val_pattern))
    floor = unigram_bpb(paths.train_pattern, val_tokens, cpu_luts, vocab, sidecar)
    log(f"val_tokens:{val_tokens.numel() - 1} eval_seq_len:{eval_seq_len} stride:{stride} unigram_bpb:{floor:.4f}")
    return RunData(paths, vocab, grad_accum, eval_seq_len, stride, val_tokens, cpu_luts.to(rt.device),
                   None if sidecar is None else sidecar.to(rt.device), floor)


def build_model(job: Job, rt: Runtime, run_dir: Path, log: RunLog, data: RunData) -> Model:
    """The model transforms, in this order (torchtitan's): build the weights (seeded), check the
    export's name rules against them, place them (device, bf16 with fp32 linears/controls), QAT is
    part of the built linears and switched by the schedule (`set_qat`), compile the placed model,
    make the optimizers on the placed parameters (Parallel Muon reduces its own gradients, so DDP
    ignores those), then wrap in DDP. Hooks and adapters attach to `base` from outside, later."""
    model = job.model_fn()
    job.quant.check_names({k: tuple(v.shape) for k, v in model.state_dict().items()})
    base = place_model(model, rt)
    has_qat = any(getattr(m, "qat_bits", 0) for m in base.modules())
    compiled = torch.compile(base, dynamic=False, fullgraph=True) if rt.compile else base
    opt = job.optimizers_fn(base)
    if rt.distributed and getattr(opt, "ddp_ignored", None):  # Parallel Muon reduces the matrices' gradients itself
        DDP._set_params_and_buffers_to_ignore_for_model(
            compiled, [n for n, p in compiled.named_parameters() if p in opt.ddp_ignored])
    pass_counts = loop_pass_counts(job.schedule, getattr(base, "num_loops", 0))  # every layer sequence the run uses
    shapes = train_shapes(job.schedule, getattr(base, "num_loops", 0))  # x every training length (#2014)
    idle = idle_params(base, data.vocab, rt.device, pass_counts) if rt.distributed else []  # DDP must expect them
    if idle:
        log(f"ddp_find_unused_parameters:True idle_in_some_phase:{len(idle)} first:{idle[0]}")
    train = DDP(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=bool(idle)) if rt.distributed else compiled
    n_params = sum(p.numel() for p in base.parameters())
    if rt.master:
        check_disk(run_dir, n_params)
    log(f"model_params:{n_params} world_size:{rt.world_size} grad_accum_steps:{8 // rt.world_size} "
        f"device:{rt.device} dtype:{rt.dtype} compile:{rt.compile}")
    if rt.compile:  # every graph the run needs fits under dynamo's recompile limit (compile_limits.py)
        log(allow_graphs(graphs_needed(pass_counts, eval_batch_sizes(
            data.val_tokens.numel(), data.eval_seq_len,
            job.eval_spec.val_batch_size // (rt.world_size * data.grad_accum), rt.rank, rt.world_size), len(shapes))))
    log(job.schedule.describe())
    log(opt.describe())
    if getattr(base, "doc_attention", False):  # the switch shows in the log with its kernel (docs.py)
        log(f"doc_attention:on bos_id:{base.bos_id} kernel:{doc_backend(rt.device)}")
    return Model(base, compiled, train, opt, has_qat, n_params, pass_counts, shapes)


def warm_up(model: Model, sched: Any, train_step: Callable, log: RunLog) -> None:
    """Prime the compiled paths outside the timed loop, then restore the initial weights and
    optimizer state. Every layer sequence the run will switch to is compiled here (the records warm
    up 20 plain then 20 looped steps): the steps are split over the (training length, loop-pass
    count) shapes in the order the run reaches them, at least one step each (#2014 primes every
    length x loop mode, `COMPILE_SHAPE_WARMUP=1`)."""
    base = model.base
    init_model = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    init_opt = copy.deepcopy(model.opt.state_dict())
    base.set_qat(model.has_qat)
    shapes, steps = model.shapes, max(sched.warmup_steps, len(model.shapes))
    if len(shapes) > len(model.pass_counts):  # progressive context: say which graphs were primed
        log("warmup_shapes:" + ",".join(f"{length}x{passes}" for length, passes in shapes))
    for i in range(steps):
        seq_len, passes = shapes[i * len(shapes) // steps]
        base.set_looping(passes)
        train_step(0, 1.0, 1.0, seq_len)
        fault_point("warmup")
        if steps <= 20 or (i + 1) % 10 == 0:
            log(f"warmup_step:{i + 1}/{steps}")
    base.set_looping(loop_passes(sched.loop_phase(0.0, 0), base.num_loops))
    base.load_state_dict(init_model, strict=True)
    model.opt.load_state_dict(init_opt)
    model.opt.zero_grad()


def start_averages_or_resume(job: Job, rt: Runtime, run_dir: Path, model: Model, loader: Any,
                             log: RunLog, growth: SeqGrowth | None = None) -> tuple[SWA, EMA, int, float]:
    """The weight averages (EMA starts at the restored initial weights, as the records'), then the
    checkpoint to continue from, if any: returns (swa, ema, step, train_ms)."""
    swa, ema = SWA(), EMA(job.schedule.ema_decay)
    if job.schedule.ema_decay > 0 and job.schedule.ema_start_frac == 0:
        ema.start(model.base)
    step, train_ms = 0, 0.0
    source = resume_source(job.resume, run_dir)
    if source is not None:
        step, train_ms = restore_checkpoint(source, rank=rt.rank, world_size=rt.world_size, config=job.config,
                                            model=model.base, optimizers=model.opt, swa=swa, loader=loader, ema=ema,
                                            growth=growth)
        log(f"resumed:{source} step:{step} train_time:{train_ms:.0f}ms")
    return swa, ema, step, train_ms


def apply_average(base: nn.Module, swa: SWA, ema: EMA, evaluate: Callable, pre_bpb: float,
                  log: RunLog) -> tuple[float, float] | None:
    """Load the EMA shadow (or the SWA average of 2+ snapshots) into the model: the averaged weights
    are what gets exported and scored. Returns their (loss, bpb), or None when nothing was averaged."""
    averaged = ("ema", ema) if ema.count > 0 else ("swa", swa) if swa.count > 1 else None
    if averaged is None:
        return None
    kind, avg = averaged
    log(f"{kind}:applying {'EMA shadow' if kind == 'ema' else 'average'} of {avg.count} "
        f"{'updates' if kind == 'ema' else 'snapshots'}")
    base.load_state_dict(avg.average(base.state_dict()), strict=True)
    loss, bpb = evaluate("standard")
    log(f"{kind} val_loss:{loss:.4f} val_bpb:{bpb:.4f} pre_averaging_val_bpb:{pre_bpb:.4f}")
    return loss, bpb


def make_evaluate(job: Job, rt: Runtime, data: RunData, model: Model, log: RunLog,
                  run_dir: Path) -> Callable[[str], tuple]:
    """The run's one eval entry, `evaluate(kind)` -> (loss nats, bpb[, extras]): "standard" (the
    compiled/DDP model, every periodic eval), "sliding" (the artifact's headline without TTT) and
    "ttt" (legal score-first TTT, pgolf/ttt, which trains the base model in place). The n-gram tilt
    goes to the headline scorer only: TTT's when it is on, else the sliding eval."""
    spec, grad_accum = job.eval_spec, data.grad_accum

    @functools.cache
    def tilt():  # built at its first use, inside the eval timer (#2135 counts it there)
        from pgolf.ttt.ngram import NgramTilt

        return NgramTilt(data.val_tokens.to(rt.device), token_order=spec.token_order,
                         token_threshold=spec.token_threshold, token_boost=spec.token_boost) \
            if spec.ngram_tilt_enabled else None

    def evaluate(kind: str) -> tuple:
        common = dict(rank=rt.rank, world_size=rt.world_size, device=rt.device, dtype=rt.dtype)
        if kind == "standard":
            return eval_standard(model.train, data.val_tokens, data.luts, seq_len=data.eval_seq_len,
                                 batch_tokens=spec.val_batch_size // (rt.world_size * grad_accum),
                                 token_bytes=data.token_bytes, **common)
        if kind == "ttt":
            out = spec.ttt.evaluate(model.base, data.val_tokens, data.luts, seq_len=data.eval_seq_len,
                                    stride=data.stride, batch_seqs=spec.batch_seqs, token_bytes=data.token_bytes,
                                    log=log, seed=job.seed, run_dir=run_dir, tilt=tilt(), **common)
        else:
            out = eval_sliding(model.base, data.val_tokens, data.luts, seq_len=data.eval_seq_len, stride=data.stride,
                               batch_seqs=spec.batch_seqs, token_bytes=data.token_bytes,
                               tilt=tilt() if spec.ttt is None else None, **common)
        if (kind == "ttt" or spec.ttt is None) and tilt() is not None:  # the switch shows how often it fired
            log(tilt().describe())
        return out

    return evaluate


def _run_job(job: Job, run_dir: Path, preemption: Preemption) -> tuple[dict[str, Any], Runtime]:
    # -------------------------------- setup: runtime, data, model --------------------------------
    rt, log, run_dir = start_run(job, run_dir)
    sched, spec = job.schedule, job.eval_spec
    data = load_data(job, rt, log)
    model = build_model(job, rt, run_dir, log, data)
    base_model, opt, grad_accum = model.base, model.opt, data.grad_accum
    if not rt.master:  # only rank 0 talks to W&B
        from pgolf.runlog import NullLogger

        job.logger = NullLogger()
    job.logger.start(config=job.config, run_dir=run_dir, log=log, resuming=can_resume(job.resume, run_dir))
    new_loader = lambda: pack_documents(job.data.make_loader(  # noqa: E731  (doc attention: one packed row, #1530)
        data.paths.train_pattern, rank=rt.rank, world_size=rt.world_size, device=rt.device,
        seq_len=sched.train_seq_len, vocab_size=data.vocab), base_model, job.data.loader, sched.train_seq_len)
    loader = new_loader()
    log(f"data_loader:{job.data.loader} train_rows:{'packed' if isinstance(loader, PackedRows) else 'rows'}")
    autocast = lambda: torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype != torch.float32)  # noqa: E731
    # the training length now and the LR re-warm after a change (progressive context, #2014)
    growth = SeqGrowth(sched, drop=lambda seq_len: loader.next_batch(sched.train_batch_tokens, seq_len, grad_accum))

    def train_step(step: int, scale: float, wd_mul: float = 1.0, seq_len: int | None = None) -> torch.Tensor:
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(grad_accum):
            if rt.distributed:  # DDP syncs gradients on the last micro-step only
                model.train.require_backward_grad_sync = micro == grad_accum - 1
            x, y = loader.next_batch(sched.train_batch_tokens, seq_len or growth.seq_len, grad_accum)
            docs = (loader.doc_mask(doc_backend(rt.device)),) if isinstance(loader, PackedRows) else ()
            with autocast():
                loss = model.train(x, y, *docs)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        opt.step(step, scale, wd_mul)
        return loss_sum / grad_accum

    evaluate = make_evaluate(job, rt, data, model, log, run_dir)

    figures = final_state(job.resume, run_dir, job.config)
    if figures is not None:  # training finished in an earlier attempt: export and evaluate final_model.pt again
        done_dir = Path(job.resume).resolve() if job.resume else run_dir
        base_model.load_state_dict(torch.load(done_dir / "final_model.pt", map_location=rt.device, weights_only=True))
        log(f"resumed:{done_dir / FINAL_STATE} step:{figures['steps']} training done; exporting and evaluating again")
        return finish(job, rt, run_dir, log, base_model, evaluate, figures, preemption), rt

    # -------------------------------- warm-up (prime compile, then restore), resume --------------------------------
    if sched.warmup_steps > 0:
        warm_up(model, sched, train_step, log)
        loader = new_loader()
    swa, ema, step, train_ms = start_averages_or_resume(job, rt, run_dir, model, loader, log, growth)
    stop_after, saving, saved_at = None, job.checkpoint or Checkpointing(), (step, train_ms)
    barrier = dist.barrier if rt.distributed else (lambda: None)

    def checkpoint_now() -> Path:
        rank_state = {"optimizer": opt.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                      "growth": growth.state_dict()}
        model_state = {k: v.detach().cpu() for k, v in base_model.state_dict().items()} if rt.master else None
        return save_checkpoint(run_dir, rank=rt.rank, world_size=rt.world_size, barrier=barrier, write=write_atomic,
                               step=step, train_ms=train_ms, config=job.config, model_state=model_state,
                               swa_state=swa.state_dict() if rt.master else None, rank_state=rank_state,
                               ema_state=ema.state_dict() if rt.master else None)

    if any_rank([preemption.signum is not None], rt)[0]:  # signalled before the first step (setup, warm-up)
        log(f"checkpoint:{checkpoint_now()} step:{step} train_time:{train_ms:.0f}ms")
        stop_preempted(job, rt, log, preemption, f"stopping at step {step}; resume will train from step {step}",
                       run_dir)

    # -------------------------------- training loop --------------------------------
    pre_loss = pre_bpb = float("nan")
    qat_on = None
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with preemption:  # SIGTERM/SIGUSR1 -> checkpoint at the next step boundary, then exit
        while True:
            last = step == sched.iterations or (stop_after is not None and step >= stop_after)
            if last or (spec.val_loss_every > 0 and step % spec.val_loss_every == 0):
                sync()
                train_ms += 1000.0 * (time.perf_counter() - t0)
                fault_point(f"val:{step}")
                pre_loss, pre_bpb = evaluate("standard")
                log(f"step:{step}/{sched.iterations} val_loss:{pre_loss:.4f} val_bpb:{pre_bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
                job.logger.log({"val/loss": pre_loss, "val/bpb": pre_bpb}, step=step)
                sync()
                t0 = time.perf_counter()
            if last:
                if stop_after is not None and step < sched.iterations:
                    log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{sched.iterations}")
                break

            point = sched.at(step, train_ms + 1000.0 * (time.perf_counter() - t0))  # every switch reads this
            scale = point.lr_mul * growth.advance(step, point, log)  # x the re-warm after a length change
            if model.has_qat and point.qat != qat_on:
                qat_on = point.qat
                base_model.set_qat(qat_on)
                log(f"qat:{'on' if qat_on else 'off'} step:{step} lr_scale:{scale:.4f}")
            if loop_passes(point.loop_phase, base_model.num_loops) != base_model.loop_passes:  # one recompile
                base_model.set_looping(loop_passes(point.loop_phase, base_model.num_loops))
                log(f"looping:{base_model.loop_passes} extra pass(es) step:{step} frac:{point.frac:.3f}")
            train_loss = train_step(step, scale, point.wd_mul)
            step += 1
            approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
            if point.ema:
                ema.update(base_model)
            if sched.swa_due(step, scale):
                swa.add(base_model)
            capped = sched.budget_ms > 0 and approx_ms >= sched.budget_ms
            if sched.train_log_every > 0 and (step <= 10 or step % sched.train_log_every == 0 or stop_after is not None):
                log_train_step(job, log, step, train_loss, approx_ms, scale, point.wd_mul, growth)
            fault_point(f"step:{step}")
            capped, save_now, preempted = any_rank(
                [capped, saving.due(step, approx_ms, *saved_at), preemption.signum is not None], rt)
            # After the last step the run goes on to write final_model.pt and stops there (see finish).
            preempted = preempted and not capped and step < sched.iterations and stop_after is None
            if save_now or preempted:  # saving time, like eval time, is not train time
                check_finite(train_loss.item(), step, base_model)
                sync()
                train_ms += 1000.0 * (time.perf_counter() - t0)
                where = checkpoint_now()
                saved_at = (step, train_ms)
                log(f"checkpoint:{where} step:{step} train_time:{train_ms:.0f}ms")
                if preempted:
                    stop_preempted(job, rt, log, preemption, f"stopping at step {step}; resume will train from "
                                   f"step {step}", run_dir)
                t0 = time.perf_counter()
            if stop_after is None and capped:
                stop_after = step

    # -------------------------------- finish: average, export, score --------------------------------
    base_model.set_looping(base_model.num_loops)  # evals run the full schedule, as a loaded artifact does
    peak_mib = torch.cuda.max_memory_allocated() // 2**20 if rt.device.type == "cuda" else 0
    log(f"peak memory allocated: {peak_mib} MiB")
    raw_bpb = pre_bpb  # before weight averaging
    averaged = apply_average(base_model, swa, ema, evaluate, raw_bpb, log)
    pre_loss, pre_bpb = averaged if averaged is not None else (pre_loss, pre_bpb)
    calibration = calibrate_for_export(job, rt, log, base_model, loader, data, train_ms, autocast)
    metrics = finish(job, rt, run_dir, log, base_model, evaluate, dict(
        pre_loss=pre_loss, pre_bpb=pre_bpb, n_params=model.n_params, steps=step, train_ms=train_ms,
        peak_mib=peak_mib, unigram_bpb=data.unigram_bpb, swa_count=swa.count, ema_count=ema.count, raw_bpb=raw_bpb,
        seq_switches=growth.switches),
        preemption, calibration)
    return metrics, rt


def log_train_step(job: Job, log: RunLog, step: int, train_loss: torch.Tensor, approx_ms: float, scale: float,
                   wd_mul: float, growth: SeqGrowth) -> None:
    """The train log line and W&B row of `step` (a non-finite loss stops the run here)."""
    loss_value = train_loss.item()
    check_finite(loss_value, step)
    log(f"step:{step}/{job.schedule.iterations} train_loss:{loss_value:.4f} train_time:{approx_ms:.0f}ms "
        f"step_avg:{approx_ms / step:.2f}ms lr_scale:{scale:.4f} wd_mul:{wd_mul:.4f}"
        + (f" seq_len:{growth.seq_len}" if growth.active else ""))
    job.logger.log({"train/loss": loss_value, "train/lr_scale": scale, "train/wd_mul": wd_mul,
                    "train/step_ms": approx_ms / step, "train/seq_len": growth.seq_len}, step=step)


def calibrate_for_export(job: Job, rt: Runtime, log: RunLog, base_model: nn.Module, loader: Any, data: RunData,
                         train_ms: float, autocast: Callable) -> Any:
    """GPTQ calibration (pgolf/quant/calibrate.py): training batches right after the loop, inside the
    budget the GPTQ reserve kept free (eval time excluded, as from train_ms), or the model's own
    samples; None when the quant preset calibrates nothing."""
    sched = job.schedule
    return job.quant.calibrate(
        base_model, next_batch=lambda: loader.next_batch(sched.train_batch_tokens, sched.train_seq_len,
                                                         data.grad_accum)[0],
        train_s=train_ms / 1000.0, cap_s=sched.max_wallclock_seconds or None, log=log, vocab_size=data.vocab,
        device=rt.device, autocast=autocast)


def stop_preempted(job: Job, rt: Runtime, log: RunLog, preemption: Preemption, what: str, run_dir: Path) -> None:
    """Exit for a SIGTERM/SIGUSR1 once the run's state is on disk; the line says what resume will do."""
    log(f"preempted: {what}; continue with resume={run_dir} (or rerun in the same hydra.run.dir)")
    job.logger.finish(exit_code=1)
    rt.close()
    preemption.chain()


def check_finite(loss: float, step: int, model: nn.Module | None = None) -> None:
    """Stop on a non-finite loss (and, before a checkpoint, non-finite weights): a checkpoint is only
    ever written from a good state, so the last one stays usable."""
    if not math.isfinite(loss):
        raise PgolfError(f"train loss is {loss} at step {step}; lower the learning rates or check the data "
                         "(the last checkpoint, if any, is kept)")
    if model is not None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise PgolfError(f"weights are not finite after step {step}; lower the learning rates "
                         "(the last checkpoint, if any, is kept)")


def ranks_identical(model: nn.Module, rt: Runtime, log: Callable[[str], None] | None = None) -> bool:
    """Whether every rank holds bit-identical weights and buffers: a SHA-256 of each tensor's raw
    bytes, gathered from all ranks; the first tensor that differs is logged."""
    if not rt.distributed:
        return True
    import hashlib

    state = model.state_dict()
    mine = torch.tensor([int.from_bytes(hashlib.sha256(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                                                       .numpy().tobytes()).digest()[:7], "little")
                         for v in state.values()], dtype=torch.int64, device=rt.device)
    everyone = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(everyone, mine)
    differ = [k for i, k in enumerate(state) if any(int(o[i]) != int(everyone[0][i]) for o in everyone[1:])]
    if differ and log is not None:
        log(f"ranks_differ: {len(differ)} tensors, first {differ[0]}")
    return not differ


def finish(job: Job, rt: Runtime, run_dir: Path, log: RunLog, base_model: nn.Module, evaluate, t: dict,
           preemption: Preemption, calibration: Any = None) -> dict:
    """Export, reload the artifact into the model, score it, and write metrics.json (rank 0).

    final_model.pt and final_state.json come first: a signal from then on stops the run at the
    next phase boundary, and a resume exports and evaluates again without training (the
    calibration is saved beside them, since training data cannot be read again after the cap)."""
    calibration = keep_calibration(run_dir, calibration, master=rt.master)
    identical = ranks_identical(base_model, rt, log)
    log(f"ranks_identical:{identical} world_size:{rt.world_size}")
    state = {k: v.detach().cpu() for k, v in base_model.state_dict().items()}
    artifact = run_dir / job.quant.artifact_name
    ncode = job.code_bytes
    if rt.master and not (run_dir / FINAL_STATE).is_file():
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(run_dir / "final_model.pt", buf.getvalue())
        write_atomic(run_dir / FINAL_STATE, final_state_bytes(job.config, t))

    def stop_if_preempted() -> None:
        if any_rank([preemption.signum is not None], rt)[0]:
            stop_preempted(job, rt, log, preemption, f"training is done ({t['steps']} steps, final_model.pt); "
                           "resume will export and evaluate it again without training", run_dir)

    stop_if_preempted()
    if rt.master:
        fault_point("export")
        report = job.quant.export(state, artifact, calibration, code_bytes=ncode)
        log(report.format_table())
    if rt.distributed:
        dist.barrier()
    stop_if_preempted()
    nmodel = artifact.stat().st_size
    log(f"artifact:{artifact.name} model_bytes:{nmodel} code_bytes:{ncode} total_bytes:{nmodel + ncode} "
        f"cap:{SIZE_CAP_BYTES} over_cap:{nmodel + ncode > SIZE_CAP_BYTES}")
    if nmodel + ncode > SIZE_CAP_BYTES and rt.master:  # the score is still worth having; a record is not
        print(f"warning: artifact {artifact} + code = {nmodel + ncode:,} bytes exceeds the {SIZE_CAP_BYTES:,}-byte cap "
              f"by {nmodel + ncode - SIZE_CAP_BYTES:,}; this run cannot be submitted (use a smaller quant preset or "
              "fewer parameters)", file=sys.stderr, flush=True)
    t_eval = time.perf_counter()
    pre_sliding = evaluate("sliding") if job.eval_spec.prequant_sliding else None
    stop_if_preempted()
    base_model.load_state_dict(load_artifact(artifact), strict=True)
    quant_loss, quant_bpb = evaluate("standard")
    stop_if_preempted()
    fault_point("sliding")
    quant_sliding = evaluate("sliding")  # a signal from here on: the run completes (metrics.json), exit 0
    ttt = evaluate("ttt") if job.eval_spec.ttt is not None else None  # last: it trains the model
    eval_s = time.perf_counter() - t_eval
    metrics = final_metrics(t, rt, log, quant=(quant_loss, quant_bpb), quant_sliding=quant_sliding,
                            pre_sliding=pre_sliding, ttt=ttt, calibration=calibration, identical=identical,
                            sizes=(nmodel, ncode), eval_s=eval_s)
    if rt.master:
        write_atomic(run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        job.logger.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=t["steps"])
        job.logger.summary(metrics)
        for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):  # the run is complete
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / FINAL_STATE).unlink(missing_ok=True)
    if preemption.signum is not None:
        log("preempted after the final eval: the run is complete (metrics.json)")
    job.logger.finish()
    return metrics


def final_metrics(t: dict, rt: Runtime, log: RunLog, *, quant: tuple, quant_sliding: tuple, pre_sliding: tuple | None,
                  ttt: tuple | None, calibration: Any, identical: bool, sizes: tuple[int, int], eval_s: float) -> dict:
    """metrics.json's figures (bpb, nats, bytes, counts; the headline keys in pgolf.cli) from the
    training figures `t` and the final evals ((loss, bpb) pairs; TTT's carries its extra figures),
    and their final log lines."""
    quant_loss, quant_bpb = quant
    nmodel, ncode = sizes
    metrics = {
        "final/quant_sliding_bpb": quant_sliding[1],
        "final/quant_sliding_loss_nats": quant_sliding[0],
        "final/quant_bpb": quant_bpb,
        "final/quant_loss_nats": quant_loss,
        "final/prequant_bpb": t["pre_bpb"],
        "final/prequant_loss_nats": t["pre_loss"],
        "final/quant_gap_bpb": quant_bpb - t["pre_bpb"],
        "quant/gap_bpb": {"standard": quant_bpb - t["pre_bpb"]},
        "calibration": calibration.record() if calibration is not None else dict(NO_CALIBRATION),
        "data/unigram_bpb": t["unigram_bpb"],
        "artifact/model_bytes": nmodel,
        "artifact/code_bytes": ncode,
        "artifact/total_bytes": nmodel + ncode,
        "artifact/over_cap": nmodel + ncode > SIZE_CAP_BYTES,
        "model/params": t["n_params"],
        "train/steps": t["steps"],
        "train/time_s": t["train_ms"] / 1000.0,
        "train/ms_per_step": t["train_ms"] / max(t["steps"], 1),
        "train/swa_snapshots": t["swa_count"],
        "train/ema_updates": t["ema_count"],
        "train/seq_len_switches": t.get("seq_switches", []),  # [step, new length] per change (#2014)
        "final/pre_averaging_bpb": t["raw_bpb"],
        "eval/time_s": eval_s,
        "memory/peak_mib": t["peak_mib"],
        "world_size": rt.world_size,
        "train/ranks_identical": identical,
        "hardware": hardware(rt),
        "status": "finished",
    }
    if ttt is not None:  # the headline when TTT is on (pgolf.cli), beside the quantized sliding score
        metrics.update({"final/ttt_bpb": ttt[1], "final/ttt_loss_nats": ttt[0],
                        "final/ttt_gain_bpb": ttt[1] - quant_sliding[1], **ttt[2]})
    if pre_sliding is not None:
        metrics.update({"final/prequant_sliding_bpb": pre_sliding[1], "final/prequant_sliding_loss_nats": pre_sliding[0],
                        "final/quant_sliding_gap_bpb": quant_sliding[1] - pre_sliding[1]})
        metrics["quant/gap_bpb"]["sliding"] = quant_sliding[1] - pre_sliding[1]
    log(f"final_prequant val_loss:{t['pre_loss']:.8f} val_bpb:{t['pre_bpb']:.8f}"
        + (f" sliding_bpb:{pre_sliding[1]:.8f}" if pre_sliding is not None else ""))
    log(f"final_roundtrip val_loss:{quant_loss:.8f} val_bpb:{quant_bpb:.8f}")
    log(f"final_quant_sliding val_loss:{quant_sliding[0]:.8f} val_bpb:{quant_sliding[1]:.8f} "
        f"(unigram baseline {t['unigram_bpb']:.4f})")
    if ttt is not None:
        log(f"final_ttt val_loss:{ttt[0]:.8f} val_bpb:{ttt[1]:.8f} (quantized sliding {quant_sliding[1]:.8f}, "
            f"gain {ttt[1] - quant_sliding[1]:+.8f})")
    return metrics
