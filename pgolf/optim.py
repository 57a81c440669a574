"""Muon for the block matrices, Adam for everything else, as in the records.

Muon (Keller Jordan, via modded-nanogpt) orthogonalizes each matrix update with a
Newton-Schulz iteration. Decoupled weight decay (records #65, 2026-03-20) shrinks p by
(1 - wd*lr) before the update. Options from the later records:
- `row_normalize` (MuonEq-R, 2026-04-03 #1285; arXiv:2603.28254): each row of the Nesterov
  update is divided by its L2 norm (clamped at 1e-7) before Newton-Schulz.
- `ns_coefficients`: "quintic" (3.4445, -4.7750, 2.0315) every iteration, or "polar_express",
  one minimax tuple per iteration (2026-04-23 #1787, from PR #1344).
- `numerics`: "baseline" (2026-03-17 .. 03-22: fp32 momentum, the rows/cols scale multiplied
  into the low-precision update) or "banked" (2026-03-23 #549 onward: gradients cast to bf16,
  bf16 momentum, the scale folded into the learning rate).
- `parallel` (Parallel Muon, 2026-03-23 #549): matrices of one shape form a bank (B, rows, cols)
  at the optimizer level; their gradients are reduce-scattered so each rank runs momentum and
  a batched Newton-Schulz on B/world matrices, then the updates are all-gathered, each bank's
  gather overlapping the next bank's Newton-Schulz. The same math as the plain path: the
  model keeps its per-layer parameters, DDP skips them (`ddp_ignored`), and Muon's reduce-
  scatter averages their gradients instead.
Without `parallel`, updates are computed round-robin by rank and all-reduced, so every rank
ends each step with identical weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.errors import PgolfError

# Newton-Schulz (a, b, c) per iteration. "quintic" repeats its one tuple; "polar_express" has
# one tuple per iteration and at most 5 iterations (2026-04-23 #1787 `_PE_COEFFS`).
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "quintic": ((3.4445, -4.7750, 2.0315),),
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NUMERICS = ("baseline", "banked")


def ns_schedule(coefficients: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) tuple of each of `steps` iterations (PgolfError on an unknown set or too many steps)."""
    if coefficients not in NS_COEFFICIENTS:
        raise PgolfError(f"optimizer.ns_coefficients={coefficients!r} is unknown; "
                         f"use one of {', '.join(NS_COEFFICIENTS)}")
    table = NS_COEFFICIENTS[coefficients]
    if len(table) == 1:
        return table * steps
    if steps > len(table):
        raise PgolfError(f"optimizer.muon_backend_steps={steps} but ns_coefficients={coefficients} has {len(table)} "
                         f"per-iteration tuples; use muon_backend_steps<={len(table)}")
    return table[:steps]


def newton_schulz(G: Tensor, coeffs: tuple[tuple[float, float, float], ...], eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16, banked: bool = False) -> Tensor:
    """Approximately orthogonalize G, (rows, cols) or a batch (B, rows, cols), in `dtype`.

    X <- G / (||G||_F + eps), transposed if tall; per iteration A = X X^T, X <- a X + (b A + c A^2) X.
    The two record lineages round differently in bf16 and each is reproduced bit for bit:
    the baseline normalizes before transposing and computes (c A) A; the banked records
    (`banked`, #549 onward) transpose first, normalize per matrix and compute c (A A).
    """
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if banked:
        X = X.mT if transposed else X
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    else:
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
        X = X.mT if transposed else X
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A) if banked else b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


def zeropower_via_newtonschulz5(G: Tensor, steps: int, eps: float = 1e-7,
                                dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The baseline's quintic iteration (kept for callers of the old name)."""
    return newton_schulz(G, ns_schedule("quintic", steps), eps, dtype)


def row_normalize(update: Tensor) -> Tensor:
    """MuonEq-R: divide each row (last dim) by its fp32 L2 norm, clamped at 1e-7, in update's dtype."""
    rn = update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
    return update / rn.to(update.dtype)


def world() -> tuple[bool, int, int]:
    distributed = dist.is_available() and dist.is_initialized()
    return distributed, (dist.get_world_size() if distributed else 1), (dist.get_rank() if distributed else 0)


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters; see the module docstring for the options."""

    def __init__(self, params, *, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_dtype: torch.dtype = torch.bfloat16, compile_ns: bool = False,
                 row_normalize: bool = False, ns_coefficients: str = "quintic", numerics: str = "baseline",
                 parallel: bool = False):
        if numerics not in NUMERICS:
            raise PgolfError(f"optimizer.muon_numerics={numerics!r} is unknown; use one of {', '.join(NUMERICS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, nesterov=nesterov, row_normalize=row_normalize))
        self.coeffs, self.coeffs_name = ns_schedule(ns_coefficients, backend_steps), ns_coefficients
        self.ns_dtype, self.numerics, self.parallel = ns_dtype, numerics, parallel
        self.ns = torch.compile(newton_schulz) if compile_ns else newton_schulz
        self.banks: list[list[nn.Parameter]] | None = None
        self.pending: list | None = None

    def _momentum_update(self, g: Tensor, buf: Tensor, group: dict) -> Tensor:
        """Nesterov momentum (buf updated in place), then MuonEq-R, then Newton-Schulz."""
        momentum = group["momentum"]
        buf.mul_(momentum).add_(g)
        update = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        if group["row_normalize"]:
            update = row_normalize(update)
        return self.ns(update, self.coeffs, dtype=self.ns_dtype, banked=self.numerics == "banked")

    def _apply(self, p: Tensor, update: Tensor, group: dict, scale: float) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd > 0:
            p.mul_(1.0 - wd * lr)
        if self.numerics == "banked":  # the scale rides on the learning rate (#549 onward)
            p.add_(update.to(dtype=p.dtype), alpha=-lr * scale)
        else:  # the scale is multiplied into the update in its dtype (baseline)
            p.add_((update * scale).to(dtype=p.dtype), alpha=-lr)

    @staticmethod
    def scale(p: Tensor) -> float:
        return max(1, p.size(-2) / p.size(-1)) ** 0.5  # shape scale correction

    @torch.no_grad()
    def step(self, closure=None):
        if self.parallel:
            return self._step_parallel()
        distributed, world_size, rank = world()
        grad_dtype = torch.bfloat16 if self.numerics == "banked" else None
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            # One flat buffer of all updates (in the NS dtype, as the baseline): each rank fills its share.
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad if grad_dtype is None else p.grad.to(grad_dtype)
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    u = self._momentum_update(g, state["momentum_buffer"], group)
                    if self.numerics == "baseline":
                        u = u * self.scale(p)
                    updates[offset:offset + p.numel()] = u.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                u = updates[offset:offset + p.numel()].view_as(p)
                self._apply(p, u, group, self.scale(p) if self.numerics == "banked" else 1.0)
                offset += p.numel()

    # ---------------------------------------------------------------- Parallel Muon (#549)
    def _build_banks(self) -> list[list[nn.Parameter]]:
        """Matrices grouped by (group, shape), biggest banks first (their reduce-scatters launch first)."""
        banks: dict[tuple, list[nn.Parameter]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                banks.setdefault((gi, tuple(p.shape)), []).append(p)
        return sorted(banks.values(), key=lambda b: -len(b) * b[0].numel())

    def _group_of(self, p: Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @torch.no_grad()
    def launch_reduce_scatters(self) -> None:
        """Phase 1, right after backward: stack each bank's gradients (B, rows, cols), pad B to a
        multiple of the world size and start an async reduce-scatter (AVG) of it, in the
        momentum dtype. Adam steps run while these are in flight."""
        if self.banks is None:
            self.banks = self._build_banks()
        distributed, world_size, _ = world()
        comm = torch.bfloat16 if self.numerics == "banked" else torch.float32
        self.pending = []
        for bank in self.banks:
            shard_b = -(-len(bank) // world_size)
            full = torch.zeros(shard_b * world_size, *bank[0].shape, device=bank[0].device, dtype=comm)
            for i, p in enumerate(bank):
                if p.grad is not None:
                    full[i].copy_(p.grad)
            if not distributed:
                self.pending.append((full, None))
                continue
            shard = torch.empty(shard_b, *bank[0].shape, device=full.device, dtype=comm)
            self.pending.append((shard, dist.reduce_scatter_tensor(shard, full, op=dist.ReduceOp.AVG, async_op=True)))

    def _step_parallel(self) -> None:
        """Phases 2-3: per bank, wait for its shard, momentum + batched NS on it, start the async
        all-gather; apply each bank's update when its gather is done (after the next bank's NS)."""
        if self.pending is None:
            self.launch_reduce_scatters()
        distributed, world_size, rank = world()
        previous = None
        for bank, (shard, work) in zip(self.banks, self.pending, strict=True):
            if work is not None:
                work.wait()
            group = self._group_of(bank[0])
            state = self.state[bank[0]]  # the bank's momentum shard lives with its first matrix
            if "bank_momentum" not in state:
                state["bank_momentum"] = torch.zeros_like(shard)
            update = self._momentum_update(shard, state["bank_momentum"], group)
            if self.numerics == "baseline":
                update = update * self.scale(bank[0])
            update = update.to(self.ns_dtype).contiguous()
            gathered = torch.empty(update.shape[0] * world_size, *update.shape[1:], device=update.device,
                                   dtype=update.dtype)
            handle = dist.all_gather_into_tensor(gathered, update, async_op=True) if distributed else None
            if not distributed:
                gathered = update
            if previous is not None:
                self._finish_bank(*previous)
            previous = (bank, gathered, handle, group)
        if previous is not None:
            self._finish_bank(*previous)
        self.pending = None

    def _finish_bank(self, bank, gathered: Tensor, handle, group: dict) -> None:
        if handle is not None:
            handle.wait()
        for i, p in enumerate(bank):
            self._apply(p, gathered[i], group, self.scale(p) if self.numerics == "banked" else 1.0)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype; banked momentum is bf16 by design.
        super().load_state_dict(state_dict)
        if self.numerics == "banked":
            for state in self.state.values():
                for key in ("momentum_buffer", "bank_momentum"):
                    if key in state:
                        state[key] = state[key].to(torch.bfloat16)


class Optimizers:
    """The records' optimizer split, built from a model's `optimizer_groups()`: each parameter's
    group is the role its part declared (pgolf.model.roles), never a guess from its name.

    token embedding (+ bigram table) -> Adam at tied_embed_lr (or embed_lr untied), decay
    `embed_weight_decay` (records' EMBED_WD; None = adam_weight_decay); untied head -> Adam at
    head_lr; block matrices -> Muon at matrix_lr, decay `muon_weight_decay` (MUON_WD) times the
    schedule's WD taper; vectors and control tensors -> Adam at scalar_lr, decay
    `adam_weight_decay` (ADAM_WD). Any group with decay uses AdamW (the records' choice).
    `embed_betas` / `scalar_betas` / `head_betas` override (beta1, beta2) per group. SmearGate goes
    with the scalars at scalar_lr * smear_lr_mult, or, with `smear_beta2` set, into its own Adam
    (PR #192: lr mult 0.01, betas (0.9, 0.99)); `smear_lr_mult=0` leaves it untrained, as 2026-04-16
    #1667 did (its SmearGate is in no optimizer). The embedding path's small projections
    (`bigram.proj`, `ve_shared.proj`) go to Muon, or with `embed_proj_optimizer=adam` to the scalar
    Adam (2026-03-23 #549 and 03-31 #1204: "not worth banking"). `step(step, lr_scale, wd_mul)` applies the Muon
    momentum warmup, the LR multiplier, the Muon WD multiplier and optional grad clipping, then
    steps all optimizers. `ns_dtype` is the Newton-Schulz dtype on every device ("bf16" as the
    records; "fp32" is an explicit choice, never one made by the hardware).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        matrix_lr: float = 0.04,
        scalar_lr: float = 0.04,
        tied_embed_lr: float = 0.05,
        embed_lr: float = 0.6,
        head_lr: float = 0.008,
        muon_momentum: float = 0.95,
        muon_backend_steps: int = 5,
        muon_momentum_warmup_start: float = 0.85,
        muon_momentum_warmup_steps: int = 500,
        muon_weight_decay: float = 0.0,
        muon_row_normalize: bool = False,
        ns_coefficients: str = "quintic",
        muon_numerics: str = "baseline",
        muon_parallel: bool = False,
        adam_weight_decay: float = 0.0,
        embed_weight_decay: float | None = None,
        smear_lr_mult: float = 1.0,
        smear_beta2: float | None = None,
        embed_proj_optimizer: str = "muon",
        beta1: float = 0.9,
        beta2: float = 0.95,
        embed_betas: list[float] | None = None,
        scalar_betas: list[float] | None = None,
        head_betas: list[float] | None = None,
        adam_eps: float = 1e-8,
        grad_clip_norm: float = 0.0,
        ns_dtype: str = "bf16",
        compile_ns: bool | None = None,
    ):
        check_optimizer_args(**{k: v for k, v in locals().items() if k not in ("self", "model")})
        self.model = model
        self.muon_momentum = muon_momentum
        self.muon_momentum_warmup_start = muon_momentum_warmup_start
        self.muon_momentum_warmup_steps = muon_momentum_warmup_steps
        self.grad_clip_norm = grad_clip_norm
        groups = model.optimizer_groups()
        proj_to = "matrix" if embed_proj_optimizer == "muon" else "scalar"
        order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}

        def params(group: str) -> list[nn.Parameter]:  # in named_parameters order, with the projections joined
            found = [p for _, p in groups[group]] + ([p for _, p in groups["embed_proj"]] if group == proj_to else [])
            return sorted(found, key=lambda p: order[id(p)])
        device = next(model.parameters()).device
        # Fused Adam as the baseline (fused=True). On CPU too: there it is the baseline's exact update and
        # about 2x faster than the default foreach path.
        fused = device.type in ("cuda", "cpu")

        def adam(param_groups: list[dict], wd: float, betas: list[float] | None) -> torch.optim.Optimizer:
            # AdamW with weight_decay=0 is exactly Adam; the records from 2026-03-20 decay with AdamW.
            kw = dict(betas=tuple(betas) if betas is not None else (beta1, beta2), eps=adam_eps, fused=fused)
            if wd > 0:
                return torch.optim.AdamW(param_groups, weight_decay=wd, **kw)
            return torch.optim.Adam(param_groups, **kw)

        embed_wd = adam_weight_decay if embed_weight_decay is None else embed_weight_decay
        token_lr = tied_embed_lr if model.tie_embeddings else embed_lr
        tok_groups = [{"params": params("embed"), "lr": token_lr, "base_lr": token_lr}]
        if groups["bigram"]:
            tok_groups.append({"params": params("bigram"), "lr": token_lr, "base_lr": token_lr})
        self.token = adam(tok_groups, embed_wd, embed_betas)
        # The baseline compiles Newton-Schulz on CUDA; None follows the device.
        compile_ns = device.type == "cuda" if compile_ns is None else compile_ns
        self.muon = Muon(params("matrix"), lr=matrix_lr, momentum=muon_momentum, backend_steps=muon_backend_steps,
                         weight_decay=muon_weight_decay, compile_ns=compile_ns, ns_dtype=DTYPES[ns_dtype],
                         row_normalize=muon_row_normalize, ns_coefficients=ns_coefficients, numerics=muon_numerics,
                         parallel=muon_parallel)
        for g in self.muon.param_groups:
            g["base_lr"], g["base_wd"] = matrix_lr, muon_weight_decay
        scalar_groups = [{"params": params("scalar"), "lr": scalar_lr, "base_lr": scalar_lr}]
        smear_group = {"params": params("smear"), "lr": scalar_lr * smear_lr_mult, "base_lr": scalar_lr * smear_lr_mult}
        if groups["smear"] and smear_beta2 is None:
            scalar_groups.append(smear_group)
        self.scalar = adam(scalar_groups, adam_weight_decay, scalar_betas)
        self.all: list[torch.optim.Optimizer] = [self.token, self.muon, self.scalar]
        if groups["smear"] and smear_beta2 is not None:
            self.all.append(torch.optim.Adam([smear_group], betas=(beta1, smear_beta2), eps=adam_eps, fused=fused))
        if groups["head"]:
            self.head = adam([{"params": params("head"), "lr": head_lr, "base_lr": head_lr}], adam_weight_decay,
                             head_betas)
            self.all.insert(1, self.head)
        # Parallel Muon averages the matrices' gradients itself: DDP must leave them alone.
        self.ddp_ignored = set(params("matrix")) if muon_parallel else set()

    def describe(self) -> str:
        """One log line naming the Muon options in effect."""
        m = self.muon
        return (f"muon: row_normalize:{m.defaults['row_normalize']} ns_coefficients:{m.coeffs_name}x{len(m.coeffs)} "
                f"ns_dtype:{m.ns_dtype} numerics:{m.numerics} parallel:{m.parallel} "
                f"weight_decay:{m.defaults['weight_decay']} "
                f"adam_wd(embed,scalar):{self.token.defaults.get('weight_decay', 0.0)},"
                f"{self.scalar.defaults.get('weight_decay', 0.0)} "
                f"betas(embed,scalar):{self.token.defaults['betas']},{self.scalar.defaults['betas']}")

    def momentum_at(self, step: int) -> float:
        if self.muon_momentum_warmup_steps <= 0:
            return self.muon_momentum
        frac = min(step / self.muon_momentum_warmup_steps, 1.0)
        return (1 - frac) * self.muon_momentum_warmup_start + frac * self.muon_momentum

    def step(self, step: int, lr_scale: float, wd_mul: float = 1.0) -> None:
        for g in self.muon.param_groups:
            g["momentum"] = self.momentum_at(step)
            g["weight_decay"] = g["base_wd"] * wd_mul  # WD taper (#1729): Muon only
        for opt in self.all:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale
        if self.grad_clip_norm > 0 and self.muon.parallel and dist.is_available() and dist.is_initialized():
            clip_across_ranks(list(self.model.parameters()), self.grad_clip_norm)
        elif self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        if self.muon.parallel:  # reduce-scatters in flight while Adam steps (#549)
            self.muon.launch_reduce_scatters()
        for opt in self.all:
            if opt is not self.muon:
                opt.step()
        self.muon.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.all, states, strict=True):
            opt.load_state_dict(state)


def check_optimizer_args(**kw) -> None:
    """The optimizer group's checks that need only its config (run at compose time by
    pgolf.build.check_values, before a run directory exists; issue 21): PgolfError on a bad value."""
    for name in ("matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr"):
        if kw.get(name, 0) < 0:
            raise PgolfError(f"optimizer.{name}={kw[name]} must be >= 0")
    if not 0 <= kw.get("muon_momentum", 0.95) < 1 or not 0 <= kw.get("muon_momentum_warmup_start", 0.85) < 1:
        raise PgolfError("optimizer.muon_momentum and muon_momentum_warmup_start must be in [0, 1)")
    if kw.get("ns_dtype", "bf16") not in DTYPES:
        raise PgolfError(f"optimizer.ns_dtype={kw['ns_dtype']!r} is unknown; use bf16 (the records) or fp32")
    for name in ("embed_betas", "scalar_betas", "head_betas"):
        betas = kw.get(name)
        if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise PgolfError(f"optimizer.{name}={betas} must be two numbers in [0, 1), e.g. [0.9, 0.99]")
    if kw.get("muon_numerics", "baseline") not in NUMERICS:
        raise PgolfError(f"optimizer.muon_numerics={kw['muon_numerics']!r} is unknown; use one of {', '.join(NUMERICS)}")
    if kw.get("muon_backend_steps", 5) < 1:
        raise PgolfError(f"optimizer.muon_backend_steps={kw['muon_backend_steps']} must be >= 1")
    ns_schedule(kw.get("ns_coefficients", "quintic"), kw.get("muon_backend_steps", 5))
    if kw.get("grad_clip_norm", 0.0) < 0:
        raise PgolfError(f"optimizer.grad_clip_norm={kw['grad_clip_norm']} must be >= 0 (0 = no clipping)")
    if kw.get("embed_proj_optimizer", "muon") not in ("muon", "adam"):
        raise PgolfError(f"optimizer.embed_proj_optimizer={kw['embed_proj_optimizer']!r} is unknown; use muon (the "
                         "records up to 03-22 and from 04-01) or adam (03-23 #549, 03-31 #1204)")


def clip_across_ranks(params: list[nn.Parameter], max_norm: float) -> None:
    """Gradient clipping under Parallel Muon, where the matrices' gradients are still this rank's
    own when the optimizer steps (#549 reduces them inside Muon): one coefficient for every rank,
    from the rank-mean of the squared total norms, so replicated parameters stay bit-identical
    across ranks (a per-rank norm would scale each rank's copy differently; issue 21 item 6)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads).float()
    sq = total * total
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, (sq / dist.get_world_size()).sqrt())
