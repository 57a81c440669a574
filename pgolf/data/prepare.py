"""Build a tokenizer and challenge-format shards from a local document source.

This is how pgolf runs with no download: the `stdlib` source is every `.py` file of the
running Python's standard library (about 12 MB of text), which is always on disk. The
pipeline copies the challenge's export (`data/download_hf_docs_and_tokenize.py`): the same
SentencePiece BPE trainer settings, the first `num_val_docs` documents held out as
validation (50,000 for FineWeb), and each document stored as BOS + its tokens with no EOS,
packed into shards that may split a document across a boundary. Output is built in a
temporary directory beside `out` and renamed into place last, so an interrupted prepare
leaves nothing behind.

Beyond the challenge's export: `normalization="identity"` keeps the text byte for byte (the
stdlib is code, and nmt_nfkc folds its indentation and newlines); `caseops=True` applies the
CaseOps transform (`pgolf.data.caseops`, PR #1729) and writes the validation byte sidecar;
`▁` is always a piece (`required_chars`); every validation document's byte count is checked
against the tokenizer's tables (`pgolf.data.byte_counts`); and an output whose training
documents repeat a validation document, or that would train on documents the source's own
manifest marks as validation, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from pgolf.data import caseops as caseops_mod
from pgolf.data.byte_counts import SIDECAR_PREFIX, check_document, literal_space_counts, lut_charges
from pgolf.data.shards import write_shard
from pgolf.errors import PgolfError

SOURCES = ("stdlib", "jsonl")
NORMALIZATIONS = ("nmt_nfkc", "identity")
# The challenge's SentencePiece trainer settings (data/download_hf_docs_and_tokenize.py).
TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# `identity` keeps every byte: no NFKC, no whitespace folding (whitespace is still written `▁`).
NORMALIZATION_SETTINGS = {
    "nmt_nfkc": {"normalization_rule_name": "nmt_nfkc"},
    "identity": {"normalization_rule_name": "identity", "remove_extra_whitespaces": False},
}
# A tokenizer with no standalone `▁` spells each space as 3 byte-fallback pieces charged 1 byte
# each (pgolf.data.byte_counts); requiring the character makes it a piece whatever the corpus.
REQUIRED_CHARS = "▁"
# SentencePiece silently drops training sentences longer than max_sentence_length (4192
# bytes by default), which would discard nearly every source file, so documents are fed to
# the trainer as chunks of whole lines below this size.
SENTENCE_BYTES = 4096
# Tokenizer training reads at most this many chunks (a prefix of the corpus, about 400 MB),
# which keeps memory and time bounded on a large jsonl; the stdlib is ~5k chunks.
MAX_TRAIN_SENTENCES = 100_000
ENCODE_BATCH_DOCS = 64
STDLIB_SHUFFLE_SEED = 1337


def stdlib_files() -> list[Path]:
    """Every `.py` file of this Python's standard library, sorted by relative path, without
    test suites (any `test`, `tests` or `idle_test` directory, any `test_*.py`) or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]  # prune: never descend
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_order() -> list[Path]:
    """The stdlib files sorted by path, then shuffled with a fixed seed. Sorted order walks the
    library alphabetically (a run would train on `encodings/` tables for hundreds of steps and
    validate on `asyncio/`); the challenge's FineWeb documents are shuffled too."""
    files = stdlib_files()
    random.Random(STDLIB_SHUFFLE_SEED).shuffle(files)
    return files


def iter_documents(*, source: str, path: str | None, max_docs: int | None) -> Iterator[str]:
    """Yield document texts in order: stdlib files in `stdlib_order` (empty ones skipped) or the
    `text` field of each line of a jsonl file, stopping after `max_docs` documents when given."""
    if source == "stdlib":
        texts = (p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_order())
        docs = (t for t in texts if t.strip())
    else:
        docs = _jsonl_texts(Path(path))
    for i, text in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            return
        yield text


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                msg = f'{path}:{lineno}: not a {{"text": ...}} JSON line ({e}); fix or drop that line'
                raise PgolfError(msg) from None


def _whole_docs(docs: Iterator[str], stats: dict[str, int], limit: int) -> Iterator[str]:
    """The challenge's tokenizer input: the first `limit` documents, NUL as space, stripped, empty
    ones skipped; the trainer itself drops those over max_sentence_length (4192 bytes), as there."""
    for i, text in enumerate(docs):
        if i >= limit:
            stats["subset"] = 1
            return
        stats["docs"] += 1
        text = text.replace("\x00", " ").strip()
        if text:
            stats["sentences"] += 1
            yield text


def _sentences(docs: Iterator[str], stats: dict[str, int]) -> Iterator[str]:
    """Cut documents into chunks of whole lines under SENTENCE_BYTES for the trainer."""
    for text in docs:
        if stats["sentences"] >= MAX_TRAIN_SENTENCES:
            stats["subset"] = 1
            return
        stats["docs"] += 1
        buf: list[str] = []
        size = 0
        for line in text.replace("\x00", " ").splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > SENTENCE_BYTES:
                yield "".join(buf)
                stats["sentences"] += 1
                buf, size = [], 0
            # A single over-long line is cut by characters (4 bytes at most each).
            while n > SENTENCE_BYTES:
                yield line[: SENTENCE_BYTES // 4]
                stats["sentences"] += 1
                line = line[SENTENCE_BYTES // 4 :]
                n = len(line.encode("utf-8"))
            buf.append(line)
            size += n
        if "".join(buf).strip():
            yield "".join(buf)
            stats["sentences"] += 1


def _train_tokenizer(docs: Iterator[str], *, vocab_size: int, prefix: Path, normalization: str,
                     caseops: bool, train_docs: int | None) -> tuple[dict, dict]:
    """Train the SentencePiece model `prefix`.model/.vocab on `docs` (already CaseOps-encoded
    when `caseops`): whole documents, the first `train_docs`, as the challenge's export does, or
    with `train_docs` None chunks of lines (the stdlib's files are mostly longer than the
    trainer's 4192-byte sentence limit). Returns the settings used and how much it saw."""
    stats = {"docs": 0, "sentences": 0, "subset": 0}
    # input_sentence_size=0: train on every chunk we feed (already capped), no random sampling.
    settings = {**TRAINER_SETTINGS, **NORMALIZATION_SETTINGS[normalization], "vocab_size": vocab_size,
                "input_sentence_size": 0, "max_sentence_length": 4192, "required_chars": REQUIRED_CHARS}
    if caseops:  # the operators are always one piece each, ids 4..7 as in the record's tokenizer
        settings["user_defined_symbols"] = list(caseops_mod.OPERATORS)
    errors: list[PgolfError] = []

    def sentences() -> Iterator[str]:
        # SentencePiece turns an exception inside the iterator into an opaque failure, so a
        # bad input line is caught here and re-raised once training has returned.
        try:
            yield from _sentences(docs, stats) if train_docs is None else _whole_docs(docs, stats, train_docs)
        except PgolfError as e:
            errors.append(e)

    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_prefix=str(prefix), num_threads=_num_threads(), minloglevel=2,
            **settings,
        )
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if too_small:
            msg = f"vocab_size={vocab_size} is too small: this corpus needs {too_small[2]} pieces; raise vocab_size"
            raise PgolfError(msg) from None
        msg = f"sentencepiece training failed: {str(e).strip()}; check vocab_size and the documents"
        raise PgolfError(msg) from None
    if errors:
        raise errors[0]
    limits = {"max_sentences": MAX_TRAIN_SENTENCES} if train_docs is None else {"train_docs": train_docs}
    return settings, {**stats, "subset": bool(stats["subset"]), **limits}


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _num_threads() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus))


class _ShardWriter:
    """Packs one split's documents into fixed-size shards named like the challenge's, and with
    `sidecar`, each token's original-text byte count into `fineweb_val_bytes_*.bin` beside them
    (same shard format and cuts, so token i of one is byte count i of the other; PR #1729)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, sidecar: bool = False):
        self.out_dir, self.split, self.shard_tokens, self.sidecar = out_dir, split, shard_tokens, sidecar
        self.parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.fill = self.num_files = self.num_tokens = self.num_docs = 0

    def add(self, toks: np.ndarray, counts: np.ndarray | None = None) -> None:
        self.num_docs += 1
        self.num_tokens += toks.size
        pos = 0
        while pos < toks.size:
            k = min(self.shard_tokens - self.fill, toks.size - pos)
            self.parts.append((toks[pos : pos + k], None if counts is None else counts[pos : pos + k]))
            self.fill += k
            pos += k
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = f"{self.num_files:06d}.bin"
            write_shard(self.out_dir / f"fineweb_{self.split}_{name}", np.concatenate([t for t, _ in self.parts]))
            if self.sidecar:
                write_shard(self.out_dir / f"{SIDECAR_PREFIX}{name}", np.concatenate([c for _, c in self.parts]))
            self.parts, self.fill, self.num_files = [], 0, self.num_files + 1


def _source_val_docs(path: str | None) -> int | None:
    """The validation count the source's own manifest declares (the challenge ships
    `docs_selected.source_manifest.json` beside `docs_selected.jsonl`), if any."""
    if path is None:
        return None
    side = Path(path).with_name(f"{Path(path).stem}.source_manifest.json")
    if not side.is_file():
        return None
    val = json.loads(side.read_text(encoding="utf-8")).get("docs_val")
    return None if val is None else int(val)


def _check_args(*, source: str, path: str | None, vocab_size: int, out: Path, num_val_docs: int,
                shard_tokens: int, max_docs: int | None, normalization: str) -> None:
    if source not in SOURCES:
        raise PgolfError(f"source={source!r} is unknown; use one of {', '.join(SOURCES)}")
    if normalization not in NORMALIZATIONS:
        raise PgolfError(f"normalization={normalization!r} is unknown; use one of {', '.join(NORMALIZATIONS)}")
    if source == "jsonl" and (path is None or not Path(path).is_file()):
        raise PgolfError(f'jsonl source file {path} not found; pass the path of a file of {{"text": ...}} lines')
    if source == "stdlib" and path is not None:
        raise PgolfError(f"source=stdlib takes no path (got {path}); drop it or use --source jsonl")
    if not 260 < vocab_size <= 65536:
        raise PgolfError(f"vocab_size={vocab_size} must be in (260, 65536]: 256 byte pieces + 4 specials, uint16 ids")
    if num_val_docs < 1:
        raise PgolfError(f"num_val_docs={num_val_docs} must be >= 1: evaluation needs a validation split")
    declared = _source_val_docs(path)
    if declared is not None and num_val_docs < declared:
        # The trap of the records' prepare_caseops_data.py (--val-docs 10_000 against the 50,000-doc split).
        raise PgolfError(f"{path}: its source manifest makes the first {declared} documents validation; "
                         f"--val-docs {num_val_docs} would train on validation documents {num_val_docs}-{declared - 1}; "
                         f"pass --val-docs {declared}")
    if shard_tokens < 1:
        raise PgolfError(f"shard_tokens={shard_tokens} must be >= 1")
    if max_docs is not None and max_docs <= num_val_docs:
        raise PgolfError(f"max_docs={max_docs} must exceed num_val_docs={num_val_docs} to leave training documents")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PgolfError(f"{out} already exists and is not empty; delete it or pick another --out")


def _export(docs: Iterator[str], sp: spm.SentencePieceProcessor, *, out_dir: Path, num_val_docs: int,
            shard_tokens: int, total: int | None, caseops: bool) -> tuple[dict[str, int], str]:
    """Encode every document as BOS + tokens into val then train shards (CaseOps-encoded first
    when `caseops`, with the validation byte sidecar); returns the stats and the sha256 of the
    document list. Every validation document's bytes are checked (see the module docstring)."""
    from pgolf.evaluate import build_byte_luts

    luts = build_byte_luts(sp, sp.vocab_size())
    # Validation always gets a byte sidecar while building; without CaseOps it is kept only when a
    # document holds a literal '▁' (the tables would charge it 1 byte of its 3; issue 21).
    writers = {split: _ShardWriter(out_dir, split, shard_tokens, sidecar=split == "val") for split in ("val", "train")}
    literal_docs = 0
    digest = hashlib.sha256()
    val_docs: dict[bytes, int] = {}
    n = bytes_val = 0
    with tqdm(total=total, unit="doc", desc="tokenizing", disable=None) as bar:  # disable=None: off if no tty
        for batch in _batched(docs, ENCODE_BATCH_DOCS):
            texts = [caseops_mod.encode(t) for t in batch] if caseops else batch
            spans = n < num_val_docs  # the sidecar needs each piece's offsets
            encoded = sp.encode(texts, out_type="proto" if spans else int, num_threads=_num_threads())
            for text, seen, enc in zip(batch, texts, encoded):
                raw = text.encode("utf-8")
                # Length-prefixed, so the hash pins document boundaries as well as contents.
                digest.update(len(raw).to_bytes(8, "little") + raw)
                key = hashlib.sha1(raw).digest()
                if n == num_val_docs:
                    writers["val"].flush()
                split = "val" if n < num_val_docs else "train"
                ids = [p.id for p in enc.pieces] if spans else enc
                counts = None
                if split == "val":
                    val_docs.setdefault(key, n)
                    if caseops:
                        spans_k = [(p.begin, p.end) for p in enc.pieces]
                        counts = np.concatenate([[0], caseops_mod.original_byte_counts(seen, spans_k)])
                        if int(counts.sum()) != len(raw):
                            raise PgolfError(f"validation document {n} has {len(raw)} bytes but no token to charge "
                                             "them to (it is only whitespace); drop it from the source")
                        bytes_val += len(raw)
                    else:
                        counts = literal_space_counts(luts, text, ids, [(p.begin, p.end) for p in enc.pieces],
                                                      sp.bos_id())
                        literal_docs += int(counts.sum() != lut_charges(luts, ids, sp.bos_id()).sum())
                        bytes_val += check_document(sp, luts, text, ids, where=f"validation document {n}",
                                                    counts=counts)
                        counts = np.concatenate([[0], counts])
                elif key in val_docs:
                    raise PgolfError(f"training document {n} repeats validation document {val_docs[key]}: the "
                                     "model would train on text it is scored on; remove the duplicate from the source")
                writers[split].add(np.array([sp.bos_id(), *ids], dtype=np.uint16), counts)
                n += 1
            bar.update(len(batch))
    for w in writers.values():
        w.flush()
    if not caseops and not literal_docs:  # the tables are exact: no sidecar, as the challenge's data
        for f in out_dir.glob(f"{SIDECAR_PREFIX}*.bin"):
            f.unlink()
    stats = {"docs_total": n, "val_docs_with_literal_space": literal_docs}
    for key in ("docs", "tokens", "files"):
        for split, w in writers.items():
            stats[f"{key}_{split}"] = getattr(w, f"num_{key}")
    stats["bytes_val"] = bytes_val
    return stats, digest.hexdigest()


def prepare(*, source: str, path: str | None, vocab_size: int, out: str, num_val_docs: int, shard_tokens: int,
            max_docs: int | None, normalization: str = "nmt_nfkc", caseops: bool = False,
            tokenizer_train_docs: int | None = None) -> dict:
    """Train a SentencePiece BPE tokenizer on `source` documents and write it, the val/train
    shards (and with `caseops` the validation byte sidecar) and `manifest.json` into `out`
    (which must not exist or be empty); returns the manifest. `normalization` is the
    challenge's `nmt_nfkc` or `identity` (text kept byte for byte). `tokenizer_train_docs` N
    trains the tokenizer on the first N whole documents (the challenge's 5,000,000); None on
    line chunks of at most 100,000 x 4 KB (the stdlib's). See the module docstring
    for the format, the checks and the atomic-write guarantee."""
    t0 = time.perf_counter()
    out_dir = Path(out).expanduser().absolute()
    _check_args(source=source, path=path, vocab_size=vocab_size, out=out_dir, num_val_docs=num_val_docs,
                shard_tokens=shard_tokens, max_docs=max_docs, normalization=normalization)
    docs = lambda: iter_documents(source=source, path=path, max_docs=max_docs)  # noqa: E731
    transformed = lambda: map(caseops_mod.encode, docs()) if caseops else docs()  # noqa: E731
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a shared cache should be readable
    try:
        settings, train_stats = _train_tokenizer(transformed(), vocab_size=vocab_size, prefix=tmp / "tokenizer",
                                                 normalization=normalization, caseops=caseops,
                                                 train_docs=tokenizer_train_docs)
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))
        total = sum(1 for _ in docs()) if source == "stdlib" else None  # a cheap extra read, for the bar
        stats, docs_sha256 = _export(docs(), sp, out_dir=tmp, num_val_docs=num_val_docs,
                                     shard_tokens=shard_tokens, total=total, caseops=caseops)
        if stats["docs_train"] == 0:
            raise PgolfError(f"num_val_docs={num_val_docs} leaves no training documents out of "
                             f"{stats['docs_total']} from {source}; lower it")
        manifest = {
            "source": source,
            "source_path": str(Path(path).absolute()) if path else sysconfig.get_paths()["stdlib"],
            "python_version": platform.python_version() if source == "stdlib" else None,
            "docs_sha256": docs_sha256,
            "shuffle_seed": STDLIB_SHUFFLE_SEED if source == "stdlib" else None,
            "num_val_docs": num_val_docs,
            "source_val_docs": _source_val_docs(path),
            "max_docs": max_docs,
            "normalization": normalization,
            "caseops": caseops,
            "text_transform": "lossless_caps_caseops_v1" if caseops else "identity",
            "shard_tokens": shard_tokens,
            "stats": stats,
            "train_glob": "fineweb_train_*.bin",
            "val_glob": "fineweb_val_[0-9]*.bin",
            "val_bytes_glob": f"{SIDECAR_PREFIX}*.bin" if caseops or stats["val_docs_with_literal_space"] else None,
            "tokenizer_path": "tokenizer.model",
            "tokenizer_vocab_path": "tokenizer.vocab",
            "requested_vocab_size": vocab_size,
            "vocab_size": sp.vocab_size(),
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "trainer_settings": settings,
            "tokenizer_train": train_stats,
            "elapsed_s": round(time.perf_counter() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        # rename(2) is atomic and may replace an empty directory; a non-empty `out` created
        # meanwhile by another builder makes it fail, and that builder's output stands.
        try:
            os.replace(tmp, out_dir)
        except OSError:
            msg = f"{out_dir} was created by another prepare meanwhile; delete it or pick another --out"
            raise PgolfError(msg) from None
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
