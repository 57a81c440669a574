"""Re-score a finished run's artifact with a TTT variant, without training:
`python -m pgolf.ttt RUN_DIR [overrides]` (the run's own overrides plus e.g. `eval=ttt_lora`).

What competitors do when they tune the eval on a fixed artifact (#1953 tuned its TTT levers on a
#1855 artifact): the model is built from the composed config, the run's quantized artifact is
loaded into it (strict), and it is scored with the quantized sliding eval and then with eval.ttt,
exactly as the trainer's finish step does. One line per figure; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from pgolf.errors import PgolfError


def rescore(run_dir: Path, overrides: list[str]) -> dict:
    import sentencepiece as spm

    from pgolf.build import build, check_config, compose, to_container
    from pgolf.data.byte_counts import load_sidecar
    from pgolf.data.loader import load_validation_tokens
    from pgolf.evaluate import build_byte_luts, eval_sliding
    from pgolf.quant import load_artifact
    from pgolf.trainer import place_model, setup_runtime

    cfg = compose([*overrides, "logger=none"])
    check_config(cfg)
    spec, quant = build(cfg, "eval"), build(cfg, "quant")
    if spec.ttt is None:
        raise PgolfError("eval.ttt is not set; add eval=ttt_lora, eval=ttt_phased or eval=ttt_sgd")
    artifact = run_dir / quant.artifact_name
    if not artifact.is_file():
        raise PgolfError(f"{artifact} not found; pass the run's directory and its own quant/model overrides")
    seq_len, stride = spec.resolve(build(cfg, "schedule").train_seq_len)
    paths = build(cfg, "data").ensure()
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer_path))
    vocab = int(cfg.model.vocab_size)
    val_tokens = load_validation_tokens(paths.val_pattern, seq_len, vocab_size=vocab)
    sidecar = load_sidecar(paths.val_bytes_pattern, val_tokens.numel()) if paths.val_bytes_pattern else None
    top = to_container(cfg)
    rt = setup_runtime(SimpleNamespace(device=top["device"], dtype=top["dtype"], compile=False))
    luts = build_byte_luts(sp, vocab).to(rt.device)
    token_bytes = None if sidecar is None else sidecar.to(rt.device)
    model = place_model(build(cfg, "model"), rt)
    model.load_state_dict(load_artifact(artifact), strict=True)
    model.set_looping(model.num_loops)
    common = dict(rank=0, world_size=1, device=rt.device, dtype=rt.dtype)
    sliding = eval_sliding(model, val_tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=spec.batch_seqs,
                           token_bytes=token_bytes, **common)
    print(f"quant_sliding val_loss:{sliding[0]:.8f} val_bpb:{sliding[1]:.8f}", flush=True)
    tilt = None
    if spec.ngram_tilt_enabled:  # the TTT score is tilted, as in the trainer (pgolf/ttt/ngram.py)
        from pgolf.ttt.ngram import NgramTilt

        tilt = NgramTilt(val_tokens.to(rt.device), token_order=spec.token_order,
                         token_threshold=spec.token_threshold, token_boost=spec.token_boost)
    loss, bpb, figures = spec.ttt.evaluate(model, val_tokens, luts, seq_len=seq_len, stride=stride,
                                           batch_seqs=spec.batch_seqs, token_bytes=token_bytes,
                                           log=lambda s: print(s, flush=True), seed=int(cfg.seed), tilt=tilt,
                                           **common)
    if tilt is not None:
        print(tilt.describe(), flush=True)
    print(f"ttt val_loss:{loss:.8f} val_bpb:{bpb:.8f} gain:{bpb - sliding[1]:+.8f}", flush=True)
    return {"artifact": str(artifact), "overrides": overrides, "final/quant_sliding_bpb": sliding[1],
            "final/ttt_bpb": bpb, "final/ttt_loss_nats": loss, "final/ttt_gain_bpb": bpb - sliding[1], **figures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.ttt", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    try:
        out = rescore(args.run_dir, args.overrides)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
