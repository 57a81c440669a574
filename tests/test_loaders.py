"""The records' training loaders: same token windows as the records' own loaders, resumable.

GOLDEN digests were computed with a throwaway script outside this repository that exec'd each
record's loader class (and its shard helpers) from the openai/parameter-golf mirror @ 4908dc46f
on the synthetic shards below, from the challenge layout (./data/datasets/fineweb10B_sp1024/):
  coprime    2026-03-29_Loader_FullGPTQ_XSA11_BigramHash2816 (#1060) DistributedTokenLoader
  shuffled   2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2 (#1394) ShuffledSequenceLoader
  documents  2026-04-10_VarLenAttn (#1530) DocumentPackingLoader (pin_memory removed for CPU);
             its flattened (1, N) inputs/targets, cu_seqlens and max_seqlen
over 100 batches per rank (2 ranks, 4 micro-steps, 4 sequences of 32 per micro-step), which
wraps every shard at least once. pgolf's loaders give the same sha256 of the int64 windows.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from pgolf.data.loaders import make_loader
from pgolf.data.shards import write_shard
from pgolf.errors import PgolfError

SEQ, WORLD, ACC, K = 32, 2, 4, 100
GLOBAL_TOKENS = WORLD * ACC * 4 * SEQ
GOLDEN = {
    "coprime": ("01ea058cfd27f257a2ccd85c43965b1273f93b7a719094c14003bcecf5d7698c",
                "4b04dae2c7f990e8c44d5ab7e73e15453d9900180a407e887ef5eceeeac50331"),
    "shuffled": ("2afe0c514ca4b0b1b61b60c6227df2dceeba28a799b27c44df22f80f4c41ecad",
                 "a81359a0c05be522116d9e877dd5cdae628dc4d25a0182f32e6a5ad15e721b3f"),
    "documents": ("eef6894af50bc283ddff2d4bc0430049b8f5d033ba91a77721672f28805bcb99",
                  "c78e26169f65021fb5c2df20b3a69f3e4e687d1aa5773d7da14793b6900d3f33"),
}


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    """Four shards of random tokens in [2, 1024) with BOS (1) every 20-300 tokens, token 0 first."""
    root = tmp_path_factory.mktemp("loaders") / "data/datasets/fineweb10B_sp1024"
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((5000, 3100, 4097, 2600)):
        t = torch.randint(2, 1024, (n,), generator=g)
        pos = torch.cumsum(torch.randint(20, 300, (n // 20,), generator=g), 0)
        t[pos[pos < n]] = 1
        t[0] = 0
        write_shard(root / f"fineweb_train_{i:06d}.bin", t)
    return str(root / "fineweb_train_*.bin")


def batches(loader, kind: str, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        x, y = loader.next_batch(GLOBAL_TOKENS, SEQ, ACC)
        assert x.shape == (4, SEQ) and torch.equal(x[:, 1:], y[:, :-1])
        out.append((x.reshape(-1), y.reshape(-1), loader.last_cu_seqlens, loader.last_max_seqlen)
                   if kind == "documents" else (x, y))
    return out


def digest(items: list[tuple]) -> str:
    h = hashlib.sha256()
    for item in items:
        for t in item:
            arr = t.numpy() if isinstance(t, torch.Tensor) else np.array([t])
            h.update(np.ascontiguousarray(arr).astype(np.int64).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", GOLDEN)
def test_loader_yields_the_records_windows(kind, pattern):
    for rank in range(WORLD):
        loader = make_loader(kind, pattern, rank=rank, world_size=WORLD, device="cpu", seq_len=SEQ)
        assert digest(batches(loader, kind, K)) == GOLDEN[kind][rank]


@pytest.mark.parametrize("kind", [*GOLDEN, "sequential"])
def test_loader_resumes_exactly_through_a_checkpoint(kind, pattern):
    make = lambda: make_loader(kind, pattern, rank=1, world_size=WORLD, device="cpu", seq_len=SEQ)  # noqa: E731
    straight = make()
    want = batches(straight, kind, 60)[40:]
    first = make()
    batches(first, kind, 40)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = batches(resumed, kind, 20)
    assert digest(got) == digest(want)


def test_documents_loader_boundaries(pattern):
    loader = make_loader("documents", pattern, rank=0, world_size=1, device="cpu", seq_len=SEQ)
    x, _ = loader.next_batch(4 * SEQ * ACC, SEQ, ACC)
    flat, cu = x.reshape(-1), loader.last_cu_seqlens
    assert cu[0] == 0 and cu.numel() % 64 == 0 and int(cu[-1]) == flat.numel()
    assert bool((cu[1:] >= cu[:-1]).all())
    bos = set((flat == 1).nonzero().flatten().tolist())
    assert bos <= set(cu.tolist())  # every document start is a boundary
    assert loader.last_max_seqlen <= SEQ


def test_wrong_loader_state_names_the_fix(pattern):
    a = make_loader("shuffled", pattern, rank=0, world_size=1, device="cpu", seq_len=SEQ)
    b = make_loader("coprime", pattern, rank=0, world_size=1, device="cpu", seq_len=SEQ)
    with pytest.raises(PgolfError, match="data.loader=coprime"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(PgolfError, match="data.loader="):
        make_loader("nope", pattern, rank=0, world_size=1, device="cpu", seq_len=SEQ)


@pytest.mark.parametrize("kind", ["documents", "coprime"])
def test_a_run_trains_with_the_loader(kind, tmp_path, fast_cache):
    from runs import FAST, metrics, run_py

    r = run_py([*FAST, fast_cache, "logger=none", f"data.loader={kind}", "hydra.run.dir=run"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data_loader:{kind}" in (tmp_path / "run" / "train.log").read_text()
    assert metrics(tmp_path / "run")["status"] == "finished"
