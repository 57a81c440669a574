"""Download the challenge's published FineWeb export from the Hugging Face Hub.

The export's `manifest.json` says how many train and val shards each tokenizer variant has
and where its tokenizer files live, so we fetch it first and derive every other path from
it, as `data/cached_challenge_fineweb.py` does. The local layout matches the challenge's
(remote `<remote_root>/datasets/X` lands in `root/datasets/X`, `<remote_root>/tokenizers/Y`
in `root/tokenizers/Y`), so its commands and ours share one `data/` directory. Training on
the first N train shards is training on a prefix of the same frozen, shuffled export.

The larger vocabularies of the later records are community re-exports of the same documents
(`VARIANTS`): `kevclark/parameter-golf` (sp4096, sp8192; PR #1218, #1394) and
`romeerp/parameter-golf-caseops-v1` (CaseOps sp8192, PR #1729), whose validation byte
sidecars (`fineweb_val_bytes_*.bin`) come with their shards. Each repository's manifest is
kept under its own local name, so a manifest cached from one never hides another's datasets
(the records' README tells users to delete `data/manifest.json` by hand for that reason).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from huggingface_hub import hf_hub_download

from pgolf.errors import PgolfError

CHALLENGE_REPO = "willdepueoai/parameter-golf"
# variant -> (default Hugging Face dataset repo, dataset directory in its manifest)
VARIANTS = {
    "sp1024": (CHALLENGE_REPO, "fineweb10B_sp1024"),
    "byte260": (CHALLENGE_REPO, "fineweb10B_byte260"),
    "sp4096": ("kevclark/parameter-golf", "fineweb10B_sp4096"),
    "sp8192": ("kevclark/parameter-golf", "fineweb10B_sp8192"),
    "sp8192_caseops": ("romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"),
}
SIDECAR_VARIANTS = ("sp8192_caseops",)


def dataset_name(variant: str) -> str:
    """The export's dataset directory for a tokenizer variant (`sp1024` -> `fineweb10B_sp1024`)."""
    if variant in VARIANTS:
        return VARIANTS[variant][1]
    if not re.fullmatch(r"sp\d+", variant):
        raise PgolfError(f"variant {variant!r} is unknown; use one of {', '.join(VARIANTS)} or sp<VOCAB_SIZE>")
    return f"fineweb10B_{variant}"


def _local_path(remote: str, *, root: Path, remote_root: str) -> Path:
    parts = PurePosixPath(remote).parts
    if remote_root and parts[:1] == (remote_root,):
        parts = parts[1:]
    return root.joinpath(*parts)


def _fetch(remote: str, *, root: Path, repo_id: str, remote_root: str, fetched: list[Path], dest: Path | None = None) -> Path:
    """Materialize one remote file locally (at `dest`, default its mirrored path) unless it is already there."""
    dest = dest or _local_path(remote, root=root, remote_root=remote_root)
    if dest.exists():
        return dest
    if dest.is_symlink():  # a dangling link left by an older layout
        dest.unlink()
    parent = PurePosixPath(remote).parent.as_posix()
    cached = hf_hub_download(
        repo_id=repo_id,
        filename=PurePosixPath(remote).name,
        subfolder=None if parent == "." else parent,
        repo_type="dataset",
    )
    # The HF cache holds snapshot symlinks into a blob store; link the blob itself so the
    # local file is real, and copy when linking is impossible (another filesystem).
    src = Path(cached).resolve(strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)  # never leave a half-copied shard under its real name
    fetched.append(dest)
    return dest


def download(
    *,
    variant: str = "sp1024",
    train_shards: int,
    root: str = "data",
    with_docs: bool = False,
    repo_id: str | None = None,
    remote_root: str = "datasets",
) -> dict:
    """Fetch the manifest, every val shard (and its byte sidecar, when the manifest lists
    them or the variant is CaseOps), the first `train_shards` train shards and the tokenizer
    files of `variant` into `root`, skipping files already present. `repo_id` None is the
    variant's repository (`VARIANTS`). Returns a summary: local `dataset_dir`,
    `tokenizer_paths` and the list of files newly `downloaded`."""
    name = dataset_name(variant)
    repo_id = repo_id or VARIANTS.get(variant, (CHALLENGE_REPO,))[0]
    if train_shards < 0:
        raise PgolfError(f"train_shards={train_shards} must be >= 0")
    root_dir = Path(root).expanduser().absolute()
    prefix = f"{remote_root}/" if remote_root else ""
    kw = {"root": root_dir, "repo_id": repo_id, "remote_root": remote_root, "fetched": []}

    # The challenge's manifest keeps its usual place; another repository's gets its own name.
    local_manifest = None if repo_id == CHALLENGE_REPO else root_dir / f"manifest.{repo_id.replace('/', '--')}.json"
    manifest_path = _fetch(f"{prefix}manifest.json", **kw, dest=local_manifest)
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise PgolfError(f"{manifest_path}: no dataset {name} (has {names}); pick another --variant")
    stats = entry.get("stats") or {}
    files_train, files_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > files_train:
        msg = f"{variant} has {files_train} train shards on {repo_id}, requested {train_shards}; lower --train-shards"
        raise PgolfError(msg)
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    tok_files = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok and tok.get(k)]
    if not tok_files:
        msg = f"{manifest_path}: no tokenizer files for {entry.get('tokenizer_name')!r}; delete it to re-download"
        raise PgolfError(msg)

    if with_docs:
        _fetch(f"{prefix}docs_selected.jsonl", **kw)
        _fetch(f"{prefix}docs_selected.source_manifest.json", **kw)
    shards = [f"fineweb_val_{i:06d}.bin" for i in range(files_val)]
    if entry.get("val_bytes_glob") or variant in SIDECAR_VARIANTS:
        shards += [f"fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
    shards += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    for shard in shards:
        _fetch(f"{prefix}datasets/{name}/{shard}", **kw)
    tokenizer_paths = [_fetch(f"{prefix}{t}", **kw) for t in tok_files]
    return {
        "dataset_dir": root_dir / "datasets" / name,
        "tokenizer_paths": tokenizer_paths,
        "downloaded": kw["fetched"],
    }
