"""Muon for the block matrices, Adam for everything else, as in the baseline.

Muon (Keller Jordan, via modded-nanogpt) orthogonalizes each matrix update with a
Newton-Schulz iteration. Updates are computed round-robin by rank and all-reduced, so
every rank ends each step with identical weights. Decoupled weight decay (records #65,
2026-03-20) shrinks p by (1 - wd*lr) before the update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.errors import PgolfError


def zeropower_via_newtonschulz5(G: Tensor, steps: int, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalize a 2-D matrix (the quintic iteration of modded-nanogpt).

    `dtype` is bf16 as in the records; fp32 is offered for CPU, where bf16 matmuls are slow
    (a CPU-only numerical difference).
    """
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, *, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_dtype: torch.dtype = torch.bfloat16, compile_ns: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, nesterov=nesterov))
        self.ns_dtype = ns_dtype
        self.ns = torch.compile(zeropower_via_newtonschulz5) if compile_ns else zeropower_via_newtonschulz5

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            # One flat buffer of all updates (in the NS dtype, as the baseline): each rank fills its share.
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=momentum)
                    g = self.ns(g, steps=group["backend_steps"], dtype=self.ns_dtype)
                    g = g * max(1, g.size(0) / g.size(1)) ** 0.5  # shape scale correction
                    updates[offset:offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if wd > 0:
                    p.mul_(1.0 - wd * lr)
                p.add_(updates[offset:offset + p.numel()].view_as(p).to(dtype=p.dtype), alpha=-lr)
                offset += p.numel()


class Optimizers:
    """The baseline's optimizer split, built from a model's `optimizer_groups()`.

    token embedding (+ bigram table) -> Adam at tied_embed_lr (or embed_lr untied);
    untied head -> Adam at head_lr; block matrices -> Muon at matrix_lr; vectors and
    control tensors -> Adam at scalar_lr. SmearGate goes with the scalars at
    scalar_lr * smear_lr_mult, or, with `smear_beta2` set, into its own Adam (PR #192: lr
    mult 0.01, betas (0.9, 0.99)). `step(step, lr_scale)` applies the Muon momentum warmup, the LR schedule
    multiplier and optional grad clipping, then steps all optimizers.
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
        adam_weight_decay: float = 0.0,
        smear_lr_mult: float = 1.0,
        smear_beta2: float | None = None,
        beta1: float = 0.9,
        beta2: float = 0.95,
        adam_eps: float = 1e-8,
        grad_clip_norm: float = 0.0,
        ns_fp32_on_cpu: bool = True,
        compile_ns: bool | None = None,
    ):
        for name, value in (("matrix_lr", matrix_lr), ("scalar_lr", scalar_lr), ("tied_embed_lr", tied_embed_lr),
                            ("embed_lr", embed_lr), ("head_lr", head_lr)):
            if value < 0:
                raise PgolfError(f"optimizer.{name}={value} must be >= 0")
        if not 0 <= muon_momentum < 1 or not 0 <= muon_momentum_warmup_start < 1:
            raise PgolfError("optimizer.muon_momentum and muon_momentum_warmup_start must be in [0, 1)")
        self.model = model
        self.muon_momentum = muon_momentum
        self.muon_momentum_warmup_start = muon_momentum_warmup_start
        self.muon_momentum_warmup_steps = muon_momentum_warmup_steps
        self.grad_clip_norm = grad_clip_norm
        groups = model.optimizer_groups()
        params = lambda role: [p for _, p in groups[role]]  # noqa: E731
        device = next(model.parameters()).device
        # Fused Adam as the baseline (fused=True). On CPU too: there it is the baseline's exact update and
        # about 2x faster than the default foreach path.
        fused = device.type in ("cuda", "cpu")
        adam = dict(betas=(beta1, beta2), eps=adam_eps, fused=fused)
        # AdamW with weight_decay=0 is exactly Adam; the 2026-03-20 records decay with AdamW.
        adam_cls = torch.optim.AdamW if adam_weight_decay > 0 else torch.optim.Adam
        if adam_weight_decay > 0:
            adam["weight_decay"] = adam_weight_decay
        token_lr = tied_embed_lr if model.tie_embeddings else embed_lr
        tok_groups = [{"params": params("embed"), "lr": token_lr, "base_lr": token_lr}]
        if groups["bigram"]:
            tok_groups.append({"params": params("bigram"), "lr": token_lr, "base_lr": token_lr})
        self.token = adam_cls(tok_groups, **adam)
        # The baseline compiles Newton-Schulz on CUDA; None follows the device.
        compile_ns = device.type == "cuda" if compile_ns is None else compile_ns
        self.muon = Muon(params("matrix"), lr=matrix_lr, momentum=muon_momentum, backend_steps=muon_backend_steps,
                         weight_decay=muon_weight_decay, compile_ns=compile_ns,
                         ns_dtype=torch.float32 if (device.type == "cpu" and ns_fp32_on_cpu) else torch.bfloat16)
        for g in self.muon.param_groups:
            g["base_lr"] = matrix_lr
        scalar_groups = [{"params": params("scalar"), "lr": scalar_lr, "base_lr": scalar_lr}]
        smear_group = {"params": params("smear"), "lr": scalar_lr * smear_lr_mult, "base_lr": scalar_lr * smear_lr_mult}
        if groups["smear"] and smear_beta2 is None:
            scalar_groups.append(smear_group)
        self.scalar = adam_cls(scalar_groups, **adam)
        self.all: list[torch.optim.Optimizer] = [self.token, self.muon, self.scalar]
        if groups["smear"] and smear_beta2 is not None:
            self.all.append(torch.optim.Adam([smear_group], betas=(beta1, smear_beta2), eps=adam_eps, fused=fused))
        if groups["head"]:
            self.head = torch.optim.Adam([{"params": params("head"), "lr": head_lr, "base_lr": head_lr}], **adam)
            self.all.insert(1, self.head)

    def momentum_at(self, step: int) -> float:
        if self.muon_momentum_warmup_steps <= 0:
            return self.muon_momentum
        frac = min(step / self.muon_momentum_warmup_steps, 1.0)
        return (1 - frac) * self.muon_momentum_warmup_start + frac * self.muon_momentum

    def step(self, step: int, lr_scale: float) -> None:
        for g in self.muon.param_groups:
            g["momentum"] = self.momentum_at(step)
        for opt in self.all:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_scale
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        for opt in self.all:
            opt.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.all, states, strict=True):
            opt.load_state_dict(state)
