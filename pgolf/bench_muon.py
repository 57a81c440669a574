"""Parallel Muon against the plain path, on N ranks (CPU gloo or CUDA NCCL).

    torchrun --standalone --nproc_per_node=2 -m pgolf.bench_muon [--layers 4 --dim 256 --steps 5]

Both paths start from the same weights and see the same gradients (identical on every rank,
as after DDP's all-reduce). Plain: all-reduce of the matrix gradients (what DDP does) then
round-robin Muon and an all-reduce of the updates; parallel (#549): reduce-scatter of each
shape bank, batched Newton-Schulz on this rank's shard, all-gather. Prints the median
optimizer-step time of each (the two alternate call by call) and the largest weight
difference after `--steps` steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist

from pgolf.model import GPT
from pgolf.optim import Optimizers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ns-dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--numerics", default="banked", choices=("baseline", "banked"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    base = GPT(vocab_size=1024, num_layers=args.layers, model_dim=args.dim, num_heads=max(args.dim // 64, 1),
               num_kv_heads=max(args.dim // 128, 1)).to(device)
    models = {name: copy.deepcopy(base) for name in ("plain", "parallel")}
    opts = {name: Optimizers(m, ns_dtype=args.ns_dtype, muon_numerics=args.numerics, muon_parallel=name == "parallel",
                             muon_momentum_warmup_steps=0, compile_ns=False) for name, m in models.items()}
    matrices = {name: {id(p) for g in o.muon.param_groups for p in g["params"]} for name, o in opts.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {"plain": [], "parallel": []}
    for step in range(args.steps + 1):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g).to(device) for p in base.parameters()]
        for name in ("plain", "parallel"):
            for p, grad in zip(models[name].parameters(), grads):
                p.grad = grad.clone()
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            if name == "plain":  # DDP's all-reduce of the matrices' gradients, which parallel replaces
                for p in models[name].parameters():
                    if id(p) in matrices[name]:
                        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            opts[name].step(step, 1.0)
            sync()
            if step > 0:  # step 0 warms up (lazy state, bank layout)
                times[name].append(1000.0 * (time.perf_counter() - t0))
    diff = max((a - b).abs().max().item() for a, b in zip(models["plain"].parameters(),
                                                             models["parallel"].parameters()))
    if rank == 0:
        n = sum(p.numel() for p in base.parameters() if p.ndim == 2 and p is not base.tok_emb.weight)
        what = f"{world} ranks {'NCCL' if cuda else 'gloo'}, {args.layers}x{args.dim}, {n:,} matrix params"
        print(f"muon step, {what}, ns {args.ns_dtype}, numerics {args.numerics}:")
        for name, ts in times.items():
            print(f"  {name:8s} median {statistics.median(ts):8.2f} ms over {len(ts)} steps")
        print(f"  ratio parallel/plain {statistics.median(times['parallel']) / statistics.median(times['plain']):.3f}; "
              f"max |weight difference| after {args.steps + 1} steps: {diff:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
