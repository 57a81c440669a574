"""The quantization gap of several export plans on one finished run's weights.

`python -m pgolf.quant.gap RUN_DIR PRESET [PRESET ...]` loads the run's final_model.pt (the
weights its own export saw) and its calibration.pt (the Hessians collected inside its budget),
exports each preset with the run's compressor and small-tensor threshold, reloads the artifact and
scores it with the run's standard eval: one line per preset with its bytes, its bpb and its gap
to the unquantized model, and RUN_DIR/gap.json. This is how docs/quantization.md measures GPTQ
against round to nearest at the same bits (issue 19 item 6).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from pgolf.errors import PgolfError
from pgolf.quant.artifact import load_artifact
from pgolf.quant.calibrate import keep_calibration


def _scorer(config: dict):
    # The run's own data, tokenizer and standard eval, on CPU in fp32 (what the smoke runs use).
    import sentencepiece as spm

    from pgolf.data import load_validation_tokens
    from pgolf.data.byte_counts import load_sidecar
    from pgolf.evaluate import build_byte_luts, eval_standard
    from pgolf.submit.entry import make

    paths = make(config["data"]).ensure()
    vocab = int(config["model"]["vocab_size"])
    seq_len, _ = make(config["eval"]).resolve(config["schedule"]["train_seq_len"])
    val = load_validation_tokens(paths.val_pattern, seq_len, vocab_size=vocab)
    luts = build_byte_luts(spm.SentencePieceProcessor(model_file=str(paths.tokenizer_path)), vocab)
    sidecar = load_sidecar(paths.val_bytes_pattern, val.numel()) if paths.val_bytes_pattern else None
    batch = int(config["eval"]["val_batch_size"]) // 8

    def score(model) -> float:
        return eval_standard(model.eval(), val, luts, seq_len=seq_len, batch_tokens=batch, rank=0, world_size=1,
                             device=torch.device("cpu"), dtype=torch.float32, token_bytes=sidecar)[1]

    return score


def measure(run_dir: Path, presets: list[str]) -> dict:
    """{"prequant_bpb", "presets": {name: {"bytes", "bpb", "gap_bpb"}}, "calibration"} for one run."""
    from pgolf.submit.entry import make

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=True)
    calibration = keep_calibration(run_dir, None)
    model = make(config["model"])
    model.load_state_dict(state, strict=True)
    score = _scorer(config)
    metrics = run_dir / "metrics.json"  # the run scored these very weights with the same eval
    pre = json.loads(metrics.read_text())["final/prequant_bpb"] if metrics.is_file() else score(model)
    out = {"run_dir": str(run_dir), "prequant_bpb": pre, "presets": {},
           "calibration": calibration.record() if calibration else None}
    base = make(config["quant"])
    for name in presets:
        spec = replace(base, preset=name, rules=None, default=None, calibration="train" if calibration else "none")
        if spec.hessian_needed and calibration is None:
            raise PgolfError(f"{name} needs Hessians but {run_dir} has no calibration.pt; train it with a GPTQ preset")
        with tempfile.TemporaryDirectory() as d:
            report = spec.export(state, Path(d) / "a.ptz", calibration if spec.hessian_needed else None)
            model.load_state_dict(load_artifact(Path(d) / "a.ptz"), strict=True)
        bpb = score(model)
        out["presets"][name] = {"bytes": report.total_bytes, "bpb": bpb, "gap_bpb": bpb - out["prequant_bpb"]}
        print(f"{name:<16} bytes:{report.total_bytes} bpb:{bpb:.6f} gap:{bpb - out['prequant_bpb']:+.6f}", flush=True)
    (run_dir / "gap.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("presets", nargs="+")
    args = p.parse_args(argv)
    measure(args.run_dir.resolve(), args.presets)


if __name__ == "__main__":
    main()
