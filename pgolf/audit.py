"""`python -m pgolf.audit RUN_DIR`: re-check a finished run without retraining.

The rules a score must follow (README FAQ; issue #1017's C1-C4; the 16,000,000-byte cap;
issue #2127's train/validation overlap) checked from what the run left: its config.yaml,
metrics.json and artifact, and the data its config names. One line per check, `PASS` or
`FAIL`, then exit 1 if any failed (2 for unusable input):

- val_bytes: the byte tables (or the CaseOps sidecar) against every decoded validation document;
- overlap: validation documents that are also training documents (#2127: 80% of val in train);
- causal (C1): the scored distribution of a sample of targets, model plus tilt, is unchanged
  when every later token is redrawn;
- normalised (C2): the scored distribution sums to 1 (1e-6) at every sampled position and the
  scorer's NLL is that distribution's (the tilt's closed form, #886/#1872's failure);
- score_first / single_pass (C3, C4): from the TTT scorer's ledgers of score and update events
  (pgolf.ttt.scorer, one per rank), or, for a sliding eval that updates nothing, the window plan
  covers each target exactly once;
- calibration: metrics.json's `calibration` object (GPTQ): training data only, none after the cap;
- bytes: the artifact's size on disk plus the bundled code against 16,000,000.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.errors import SIZE_CAP_BYTES, PgolfError

LEDGER_GLOB = "ttt_ledger.rank*.jsonl"  # pgolf.ttt.scorer.Scorer.save_ledger, one file per rank


def _line(ok: bool, name: str, detail: str) -> tuple[bool, str]:
    return ok, f"{'PASS' if ok else 'FAIL'} {name}: {detail}"


def doc_spans(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each BOS-led document of a stream (the BOS included); text before the
    first BOS is not a document."""
    starts = np.flatnonzero(tokens == bos_id)
    return starts, np.append(starts[1:], len(tokens))


def doc_fingerprints(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 64-bit polynomial hash per document (wrapping uint64), vectorised: sum (t+1) P^k."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64)
    lens = ends - starts
    pw = np.cumprod(np.full(int(lens.max()), 0x100000001B3, dtype=np.uint64))  # P^1 .. P^L (wraps)
    pos = np.arange(ends[-1] - starts[0]) - np.repeat(starts - starts[0], lens)
    t = tokens[starts[0]:ends[-1]].astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        return np.add.reduceat(t * pw[pos], starts - starts[0]) ^ lens.astype(np.uint64)


def check_overlap(val: np.ndarray, train_shards, bos_id: int, min_tokens: int = 64) -> tuple[bool, str]:
    """Validation documents of >= `min_tokens` tokens that equal a training document (short ones,
    such as empty files or boilerplate, recur in any corpus and are only counted). `train_shards`
    yields token arrays in order; one shard at a time is in memory (a document cut by a shard
    boundary is carried into the next)."""
    vs, ve = doc_spans(val, bos_id)
    vf = doc_fingerprints(val, vs, ve)
    same, n_train, carry = set(), 0, np.zeros(0, dtype=val.dtype)
    for shard in itertools.chain(train_shards, [None]):
        toks = carry if shard is None else np.concatenate([carry, shard])
        ts, te = doc_spans(toks, bos_id)
        if shard is not None and len(ts):  # the last document may go on in the next shard
            carry, ts, te = toks[ts[-1]:], ts[:-1], te[:-1]
        n_train += len(ts)
        tf = doc_fingerprints(toks, ts, te)
        by_fp = {fp: i for i, fp in enumerate(tf.tolist())}
        for k in np.flatnonzero(np.isin(vf, tf)):
            j = by_fp[int(vf[k])]
            if np.array_equal(val[vs[k]:ve[k]], toks[ts[j]:te[j]]):
                same.add(int(k))
    long = [k for k in same if ve[k] - vs[k] >= min_tokens]
    return _line(not long, "overlap", f"{len(long)} of {len(vs)} validation documents (>= {min_tokens} tokens) are "
                 f"training documents; {len(same) - len(long)} shorter ones recur ({n_train} training documents)")


def check_calibration(metrics: dict) -> tuple[bool, str]:
    """h-gptq's contract: {"source": train|generated|none, "batches", "seconds",
    "last_train_token_s", "cap_s", "after_cap"}; no object means no calibration."""
    cal = metrics.get("calibration")
    if not cal or cal.get("source", "none") == "none":
        return _line(True, "calibration", "none")
    source, after = cal.get("source"), bool(cal.get("after_cap"))
    last, cap = cal.get("last_train_token_s"), cal.get("cap_s")
    late = after or (last is not None and cap and float(last) > float(cap))
    ok = source in ("train", "generated") and not late
    why = "" if ok else (" (calibration must read training or generated data)" if source not in ("train", "generated")
                         else " (training data read after the training budget)")
    return _line(ok, "calibration", f"source:{source} batches:{cal.get('batches')} seconds:{cal.get('seconds')} "
                 f"last_train_token_s:{last} cap_s:{cap} after_cap:{after}{why}")


def check_ledger(ranks: list[list[tuple[str, np.ndarray]]], num_targets: int) -> list[tuple[bool, str]]:
    """C3: no update trains on a target its rank had not scored before it (or, across ranks, that no
    rank scored: ledgers carry no cross-rank order); C4: every target scored exactly once overall.
    `ranks`: per rank, its events in order as (kind "score" | "update", target indices)."""
    per_rank = []
    for events in ranks:
        c = np.zeros(num_targets, dtype=np.int64)
        for kind, idx in events:
            if kind == "score":
                np.add.at(c, idx, 1)
        per_rank.append(c)
    counts = sum(per_rank) if per_rank else np.zeros(num_targets, dtype=np.int64)
    early = n_updates = 0
    for events, mine in zip(ranks, per_rank):
        others, own = counts - mine, np.zeros(num_targets, dtype=np.int64)
        for kind, idx in events:
            if kind == "score":
                np.add.at(own, idx, 1)
            else:
                n_updates += 1
                early += int(((own[idx] == 0) & (others[idx] == 0)).sum())
    once, missing, twice = int((counts == 1).sum()), int((counts == 0).sum()), int((counts > 1).sum())
    return [_line(early == 0, "score_first", f"{n_updates} updates over {len(ranks)} rank(s); {early} trained "
                  "targets not scored before"),
            _line(missing == 0 and twice == 0, "single_pass",
                  f"{once} of {num_targets} targets scored once, {missing} never, {twice} more than once")]


def load_ledgers(run_dir: Path) -> list[list[tuple[str, np.ndarray]]] | None:
    """The TTT scorer's ledgers (pgolf.ttt.run: `ttt_ledger.rank{R}.jsonl`), or None for a run without TTT."""
    from pgolf.ttt.scorer import load_ledger

    paths = sorted(run_dir.glob(LEDGER_GLOB))
    return [[(e.kind, e.positions()) for e in load_ledger(p)] for p in paths] if paths else None


def sliding_ledger(num_targets: int, seq_len: int, stride: int) -> list[list[tuple[str, np.ndarray]]]:
    """The sliding eval's plan as one rank's score events (it updates nothing)."""
    from pgolf.evaluate import sliding_windows

    seq_len = min(seq_len, num_targets)
    starts, offsets = sliding_windows(num_targets, seq_len, stride)
    return [[("score", np.arange(s + o, s + seq_len)) for s, o in zip(starts, offsets)]]


def scored(model, tilt, stream: torch.Tensor, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (T, V) fp32, scored log-distribution (T, V) fp64) of targets start..start+T-1, on
    the eval's path: `model.logits(model.hidden(x))`, then the tilt when the run has one."""
    x = stream[start:start + seq_len].to(torch.int64)[None]
    with torch.no_grad():
        logits = model.logits(model.hidden(x))[0].float()
    idx = torch.arange(start, start + seq_len)
    return logits, tilt.log_probs(logits, idx) if tilt is not None else torch.log_softmax(logits.double(), -1)


def check_causal(model, make_tilt, stream: torch.Tensor, seq_len: int, starts: list[int],
                 vocab: int) -> tuple[bool, str]:
    """C1 by perturbation: redraw every token after the middle of each window (the tilt rebuilt
    on the redrawn stream); the distributions of the targets before it must not move."""
    worst, moved = 0.0, 0.0
    for s in starts:
        end = s + seq_len + 1
        _, base = scored(model, make_tilt(stream[:end]), stream, s, seq_len)
        p = s + seq_len // 2
        other = stream[:end].clone()
        other[p + 1:] = torch.randint(0, vocab, (end - p - 1,), generator=torch.Generator().manual_seed(s))
        _, alt = scored(model, make_tilt(other), other, s, seq_len)
        keep = p - s + 1  # targets s..p read tokens <= p only
        worst = max(worst, float((alt[:keep] - base[:keep]).abs().max()))
        moved = max(moved, float((alt[keep:] - base[keep:]).abs().max()))
    return _line(worst <= 1e-6 and moved > 0, "causal", f"max change before the redrawn tokens {worst:.2e} "
                 f"(tolerance 1e-6), after {moved:.2e}, {len(starts)} windows of {seq_len}")


def check_normalised(model, tilt, stream: torch.Tensor, seq_len: int, starts: list[int]) -> tuple[bool, str]:
    """C2: every sampled scored distribution sums to 1 and the scorer's NLL is its -log p(y)."""
    dev = gap = 0.0
    fired = 0
    for s in starts:
        logits, logp = scored(model, tilt, stream, s, seq_len)
        y = stream[s + 1:s + seq_len + 1].to(torch.int64)
        nll = tilt.nll(logits, y, torch.arange(s, s + seq_len)) if tilt is not None else \
            F.cross_entropy(logits.double(), y, reduction="none")
        dev = max(dev, float(torch.logsumexp(logp, -1).abs().max()))
        gap = max(gap, float((nll + logp.gather(1, y[:, None]).squeeze(1)).abs().max()))
        fired += int(tilt.hints.fired[s:s + seq_len].sum()) if tilt is not None else 0
    what = f"tilt fired on {fired} sampled targets" if tilt is not None else "no tilt"
    return _line(dev <= 1e-6 and gap <= 1e-6, "normalised", f"max |log sum p| {dev:.2e}, max |NLL + log p(y)| "
                 f"{gap:.2e} (tolerance 1e-6) over {len(starts) * seq_len} targets; {what}")


def check_val_bytes(sp, luts, val: torch.Tensor, sidecar, pattern: str) -> tuple[bool, str]:
    """The eval's byte counts against every whole decoded validation document."""
    from pgolf.data.byte_counts import check_validation

    try:
        detail = check_validation(sp, luts, val, sidecar, pattern=pattern, max_docs=1 << 40)
    except PgolfError as e:
        return _line(False, "val_bytes", str(e))
    total = int(luts.count(val[:-1].long(), val[1:].long()).sum()) if sidecar is None else int(sidecar[1:].sum())
    return _line(True, "val_bytes", f"{val.numel() - 1} targets charged {total} bytes; {detail}")


def check_bytes(run_dir: Path, artifact_name: str, config: dict, metrics: dict) -> tuple[bool, str]:
    """Artifact on disk + code against the cap: the code the run counted (metrics.json) and the
    bundle of this checkout for the run's config (pgolf.submit.bundle.render) must both fit, and the
    artifact must be the one the run reported."""
    from pgolf.submit.bundle import render

    path = run_dir / artifact_name
    if not path.is_file():
        return _line(False, "bytes", f"{path} is missing")
    model_bytes, code_now = path.stat().st_size, len(render(config).encode("utf-8"))
    code_run, reported = metrics.get("artifact/code_bytes"), metrics.get("artifact/model_bytes")
    total = model_bytes + max(code_now, code_run or 0)
    same = reported in (None, model_bytes)
    run_code = "?" if code_run is None else f"{code_run:,}"
    return _line(total <= SIZE_CAP_BYTES and same, "bytes", f"model {model_bytes:,} + code {run_code} (run) / {code_now:,} "
                 f"(this checkout) -> {total:,} (cap {SIZE_CAP_BYTES:,}); metrics.json model {reported}"
                 + ("" if same else " (the artifact on disk is not the one the run scored)"))


def train_shards(pattern: str):
    """The training shards' tokens, one shard at a time, in order."""
    from pgolf.data.loader import _match
    from pgolf.data.shards import read_shard

    for path in _match(pattern, "training shards"):
        yield read_shard(path).numpy()


def audit(run_dir: str | Path, *, num_windows: int = 2) -> list[tuple[bool, str]]:
    """Every check of a finished run, as (ok, line) pairs (see the module docstring)."""
    import sentencepiece as spm

    from pgolf.build import load_run
    from pgolf.data import load_validation_tokens
    from pgolf.data.byte_counts import load_sidecar
    from pgolf.evaluate import build_byte_luts
    from pgolf.quant import load_artifact
    from pgolf.ttt.ngram import NgramTilt

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise PgolfError(f"{metrics_path} does not exist; the run did not finish (audit a finished run)")
    metrics, config, spec = json.loads(metrics_path.read_text()), run["config"], run["eval"]
    paths = run["data"].ensure()
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer_path))
    vocab = int(config["model"]["vocab_size"])
    seq_len, stride = spec.resolve(run["schedule"].train_seq_len)
    val = load_validation_tokens(paths.val_pattern, seq_len, vocab_size=vocab)
    luts = build_byte_luts(sp, vocab)
    sidecar = load_sidecar(paths.val_bytes_pattern, val.numel()) if paths.val_bytes_pattern else None
    lines = [check_val_bytes(sp, luts, val, sidecar, paths.val_pattern),
             check_overlap(val.numpy(), train_shards(paths.train_pattern), sp.bos_id())]

    model = run["model_fn"]()
    model.load_state_dict(load_artifact(run_dir / run["quant"].artifact_name), strict=True)
    model.set_looping(model.num_loops)  # the schedule a loaded artifact is scored with
    model.eval()
    make_tilt = (lambda s: NgramTilt(s, token_order=spec.token_order, token_threshold=spec.token_threshold,
                                     token_boost=spec.token_boost)) if spec.ngram_tilt_enabled else (lambda s: None)
    n = val.numel() - 1
    window = min(seq_len, n - 1)
    spread = lambda hi: sorted({int(k * hi / max(num_windows - 1, 1)) for k in range(num_windows)})  # noqa: E731
    # C1 rebuilds the tilt on each window's prefix: windows in the first 65,536 targets keep that cheap
    lines.append(check_causal(model, make_tilt, val, window, spread(min(n - window, 1 << 16)), vocab))
    lines.append(check_normalised(model, make_tilt(val), val, window, spread(n - window)))
    lines += check_ledger(load_ledgers(run_dir) or sliding_ledger(n, seq_len, stride), n)
    lines.append(check_calibration(metrics))
    lines.append(check_bytes(run_dir, run["quant"].artifact_name, config, metrics))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.audit", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished run's directory (config.yaml, metrics.json, artifact)")
    p.add_argument("--windows", type=int, default=2, help="sampled eval windows for C1/C2 (default 2)")
    args = p.parse_args(argv)
    try:
        lines = audit(args.run_dir, num_windows=args.windows)
    except PgolfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for _, line in lines:
        print(line)
    failed = sum(not ok for ok, _ in lines)
    print(f"audit: {len(lines) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
