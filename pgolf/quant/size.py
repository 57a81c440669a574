"""How many bytes a model shape takes under an export plan, before training it:
`python -m pgolf.quant.size [--std 0.02] [--seed 0] [--out DIR] OVERRIDES...`.

Builds the composed config's model, fills every float tensor with N(0, std) (the weights a
trained model's size is usually first guessed from), exports it with the config's `quant`
plan and prints the export table, then the model bytes, the counted code bytes (this
config's bundled train_gpt.py, as a run counts them) and the total against the 16,000,000-byte
cap. A plan that reads Hessians (GPTQ) gets identity Hessians here: with H = I, GPTQ's error
feedback vanishes and its codes are round-to-nearest with the plan's own scales (#1855's
`gptq_quantize_weight` does the same on H = I), so the bytes are those of that plan's codes.
Exit status 0 when the total fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from pgolf.errors import SIZE_CAP_BYTES, PgolfError



def measure(overrides: list[str], *, std: float = 0.02, seed: int = 0, out_dir: str | None = None) -> dict:
    """{model_bytes, code_bytes, total_bytes, cap_bytes, params, report} for the composed config."""
    from pgolf.build import build, compose, to_container
    from pgolf.submit.bundle import code_bytes as counted_code_bytes

    cfg = compose(overrides)
    model, quant = build(cfg, "model"), build(cfg, "quant")
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * std if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    calibration = None
    if quant.hessian_needed:
        names = quant.hessian_names({k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()})
        calibration = SimpleNamespace(hessians={n: torch.eye(state[n].shape[1]) for n in names}, act_rms={})
    code_bytes = counted_code_bytes(to_container(cfg))  # the minified, lzma-wrapped train_gpt.py the records count
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir or tmp) / quant.artifact_name
        report = quant.export(state, path, calibration, code_bytes=code_bytes)
    total = report.total_bytes + code_bytes
    return {"params": sum(v.numel() for v in state.values()), "model_bytes": report.total_bytes,
            "code_bytes": code_bytes, "total_bytes": total, "cap_bytes": SIZE_CAP_BYTES, "report": report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.quant.size", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke quant=pr1855")
    p.add_argument("--std", type=float, default=0.02, help="weights ~ N(0, std)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the artifact in this directory")
    args = p.parse_args(argv)
    try:
        if not args.std > 0:
            raise PgolfError(f"--std {args.std} must be > 0")
        out = measure(args.overrides, std=args.std, seed=args.seed, out_dir=args.out)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out["report"].format_table())
    fits = out["total_bytes"] <= out["cap_bytes"]
    print(f"params:{out['params']} model_bytes:{out['model_bytes']} code_bytes:{out['code_bytes']} "
          f"total_bytes:{out['total_bytes']} cap:{out['cap_bytes']} "
          f"{'fits, ' + format(out['cap_bytes'] - out['total_bytes'], ',') + ' B to spare' if fits else 'OVER by ' + format(out['total_bytes'] - out['cap_bytes'], ',') + ' B'}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
