"""`python -m pgolf.ttt.rescore RUN_DIR`: score one finished run's artifact again, with the
n-gram tilt off and on and the AsymLogit caps as stored or reset, without retraining.

Each line is the sliding-window score of the same dequantized artifact on the run's own eval
settings (the path `finish` scores with), so the differences are the options' alone:

    artifact                    the run's own eval (its tilt setting)
    tilt off / tilt on          eval.ngram_tilt_enabled false / true (the run's token_* knobs)
    caps at logit_softcap       softcap_pos = softcap_neg = logit_softcap: AsymLogit off (models with it)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pgolf.errors import PgolfError


def rescore(run_dir: str | Path) -> list[tuple[str, float, float, str]]:
    """[(variant, val_loss nats, val_bpb, note)] for the artifact of `run_dir` (see the module docstring)."""
    import sentencepiece as spm

    from pgolf.build import load_run
    from pgolf.data import load_validation_tokens
    from pgolf.data.byte_counts import load_sidecar
    from pgolf.evaluate import build_byte_luts, eval_sliding
    from pgolf.quant import load_artifact
    from pgolf.ttt.ngram import NgramTilt

    run = load_run(run_dir)
    spec, vocab = run["eval"], int(run["config"]["model"]["vocab_size"])
    paths = run["data"].ensure()
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer_path))
    seq_len, stride = spec.resolve(run["schedule"].train_seq_len)
    val = load_validation_tokens(paths.val_pattern, seq_len, vocab_size=vocab)
    sidecar = load_sidecar(paths.val_bytes_pattern, val.numel()) if paths.val_bytes_pattern else None
    luts = build_byte_luts(sp, vocab)
    model = run["model_fn"]()
    model.load_state_dict(load_artifact(Path(run_dir) / run["quant"].artifact_name), strict=True)
    model.set_looping(model.num_loops)
    out = []

    def score(name: str, tilt_on: bool) -> None:
        s = replace(spec, ngram_tilt_enabled=tilt_on)
        t0 = time.perf_counter()
        tilt = NgramTilt(val, token_order=s.token_order, token_threshold=s.token_threshold,
                         token_boost=s.token_boost) if tilt_on else None
        loss, bpb = eval_sliding(model, val, luts, seq_len=seq_len, stride=stride, batch_seqs=spec.batch_seqs, rank=0,
                                 world_size=1, device=torch.device("cpu"), dtype=torch.float32, token_bytes=sidecar,
                                 tilt=tilt)
        out.append((name, loss, bpb, f"{time.perf_counter() - t0:.1f}s" + (f" {tilt.describe()}" if tilt else "")))

    score("artifact", spec.ngram_tilt_enabled)
    score("tilt off", False)
    score("tilt on", True)
    if getattr(model, "asym_logit_rescale", False):
        caps = (float(model.softcap_pos), float(model.softcap_neg))
        out.append(("caps stored", float("nan"), float("nan"), f"softcap_pos {caps[0]:.6f} softcap_neg {caps[1]:.6f}"))
        with torch.no_grad():
            model.softcap_pos.fill_(model.logit_softcap), model.softcap_neg.fill_(model.logit_softcap)
        score(f"caps at {model.logit_softcap:g}, tilt off", False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.ttt.rescore", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        rows = rescore(args.run_dir)
    except PgolfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, loss, bpb, note in rows:
        print(f"{name:<28} val_loss:{loss:.8f} val_bpb:{bpb:.8f} {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
