"""The `data` config group: where shards and the tokenizer come from.

A `DataSpec` is either pre-built shards on disk (`source=None`: the challenge's FineWeb
export, fetched with `python -m pgolf.data download`) or a local source that pgolf builds
once and caches (`source="stdlib"`), so a fresh checkout can train with no download.
`ensure()` is the one place that checks the data exists, builds it if needed, and turns
relative paths into absolute ones; the loader and eval only see the resolved patterns.
`caseops=True` is CaseOps data (PR #1729): its validation split comes with a byte sidecar
that every eval charges instead of the tokenizer's tables.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import PgolfError

BUILT_SOURCES = ("stdlib",)
# Local dataset directory name -> `download --variant` (pgolf.data.download.VARIANTS).
_VARIANT_OF_DIR = {"fineweb10B_sp8192_lossless_caps_caseops_v1_reserved": "sp8192_caseops"}


def cache_root() -> Path:
    """pgolf's cache folder: `$PGOLF_CACHE`, else `~/.cache/pgolf` (built data, minified code)."""
    return Path(os.environ.get("PGOLF_CACHE") or "~/.cache/pgolf").expanduser().absolute()


@dataclass(frozen=True)
class ResolvedData:
    """Absolute paths the training run reads: shard globs, the SentencePiece model, and the
    validation byte-sidecar glob (CaseOps data only, else None)."""

    train_pattern: str
    val_pattern: str
    tokenizer_path: str
    val_bytes_pattern: str | None = None


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where a run's data lives. `data_path` and `tokenizer_path` locate pre-built shards
    (`source=None`); for a built source they are unused, the shards and `tokenizer.model`
    live in `cache_dir` (default `$PGOLF_CACHE` or `~/.cache/pgolf`, then a name from the
    settings), and `vocab_size`, `num_val_docs`, `max_docs`, `shard_tokens`, `normalization`
    and `caseops` are passed to `prepare`. `vocab_size` is also what the model's follows.
    `caseops` marks CaseOps data: the sidecar `fineweb_val_bytes_*.bin` must be there."""

    name: str
    data_path: str = ""
    tokenizer_path: str = ""
    train_files: str = "fineweb_train_*.bin"
    val_files: str = "fineweb_val_[0-9]*.bin"  # not fineweb_val_bytes_*.bin, the CaseOps sidecar
    source: str | None = None
    cache_dir: str | None = None
    vocab_size: int = 1024
    num_val_docs: int = 50
    max_docs: int | None = None
    shard_tokens: int = 1_000_000
    loader: str = "sequential"
    bos_id: int = 1
    normalization: str = "nmt_nfkc"
    caseops: bool = False

    def __post_init__(self) -> None:
        from pgolf.data.loaders import LOADERS

        if self.loader not in LOADERS:
            raise PgolfError(f"data.loader={self.loader!r} is unknown; use one of {', '.join(LOADERS)}")
        if self.source is not None and self.source not in BUILT_SOURCES:
            msg = f"data.source={self.source!r} is unknown; use null (pre-built shards) or one of {BUILT_SOURCES}"
            raise PgolfError(msg)
        if self.source is None and not (self.data_path and self.tokenizer_path):
            raise PgolfError(f"data {self.name}: data_path and tokenizer_path are required when data.source is null")

    def make_loader(self, train_pattern: str, *, rank: int, world_size: int, device, seq_len: int,
                    vocab_size: int | None = None):
        """This run's training loader (`loader`: see pgolf.data.loaders; `bos_id` for `documents`)."""
        from pgolf.data.loaders import make_loader

        return make_loader(self.loader, train_pattern, rank=rank, world_size=world_size, device=device,
                           seq_len=seq_len, bos_id=self.bos_id, vocab_size=vocab_size)

    def build_dir(self) -> Path:
        """Where a built source is cached."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().absolute()
        name = f"{self.source}_sp{self.vocab_size}" + ("_caseops" if self.caseops else "")
        return cache_root() / (name + ("" if self.normalization == "nmt_nfkc" else
                                                            f"_{self.normalization}"))

    def ensure(self) -> ResolvedData:
        """Check (or build, for a built source) the data and return its absolute paths."""
        if self.source is None:
            return self._check_prebuilt()
        out = self.build_dir()
        out.parent.mkdir(parents=True, exist_ok=True)
        # Every torchrun rank calls ensure(); the lock makes one of them build while the
        # others wait, then find the manifest and reuse the result.
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "manifest.json").is_file():
                from pgolf.data.prepare import prepare  # building needs tqdm; reading built shards does not

                print(f"pgolf.data: building {self.source} data into {out} (one-off)", flush=True)
                prepare(
                    source=self.source, path=None, vocab_size=self.vocab_size, out=str(out),
                    num_val_docs=self.num_val_docs, shard_tokens=self.shard_tokens, max_docs=self.max_docs,
                    normalization=self.normalization, caseops=self.caseops,
                )
        self._check_manifest(out)
        # A built split keeps a byte sidecar when its text has a literal '▁' (prepare, issue 21).
        sidecar = bool(json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("val_bytes_glob"))
        return self._resolved(out, out / "tokenizer.model", sidecar=sidecar)

    def _resolved(self, data_dir: Path, tokenizer: Path, sidecar: bool = False) -> ResolvedData:
        from pgolf.data.byte_counts import SIDECAR_PREFIX, sidecar_pattern

        val = str(data_dir / self.val_files)
        if any(Path(f).name.startswith(SIDECAR_PREFIX) for f in glob.glob(val)):  # read as tokens, they would score garbage
            raise PgolfError(f"data.val_files={self.val_files!r} also matches the byte sidecar {SIDECAR_PREFIX}*.bin "
                             f"in {data_dir}; use data.val_files='fineweb_val_[0-9]*.bin'")
        return ResolvedData(train_pattern=str(data_dir / self.train_files), val_pattern=val,
                            tokenizer_path=str(tokenizer), val_bytes_pattern=sidecar_pattern(val) if self.caseops or sidecar else None)

    def _check_manifest(self, out: Path) -> None:
        from pgolf.data.prepare import STDLIB_SHUFFLE_SEED

        # A cache built with other settings must not be reused silently.
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        want = {
            "source": self.source, "requested_vocab_size": self.vocab_size, "num_val_docs": self.num_val_docs,
            "max_docs": self.max_docs, "shard_tokens": self.shard_tokens,
            "shuffle_seed": STDLIB_SHUFFLE_SEED if self.source == "stdlib" else None,
            "normalization": self.normalization, "caseops": self.caseops,
        }
        diff = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
        if diff:
            shown = ", ".join(f"{k} {a} != {b}" for k, (a, b) in diff.items())
            raise PgolfError(f"{out} was built with other settings ({shown}); delete it or set another data.cache_dir")

    def _check_prebuilt(self) -> ResolvedData:
        data_dir = Path(self.data_path).expanduser().absolute()
        tokenizer = Path(self.tokenizer_path).expanduser().absolute()
        # The download command that creates this directory, when it follows the challenge layout.
        m = re.fullmatch(r"fineweb10B_(\w+)", data_dir.name)
        variant = _VARIANT_OF_DIR.get(data_dir.name, m.group(1) if m else "sp1024")
        root = data_dir.parent.parent if data_dir.parent.name == "datasets" else Path("data").absolute()
        root_arg = "" if root == Path("data").absolute() else f" --root {root}"
        fix = (f"run `python -m pgolf.data download --variant {variant} --train-shards 10{root_arg}` "
               "(or use data=stdlib for a run with no download)")
        resolved = self._resolved(data_dir, tokenizer)
        for pattern in (resolved.train_pattern, resolved.val_pattern, resolved.val_bytes_pattern):
            if pattern and not glob.glob(pattern):
                raise PgolfError(f"{pattern}: no shards found; {fix}")
        if not tokenizer.is_file():
            raise PgolfError(f"{tokenizer}: tokenizer not found; {fix}")
        return resolved
