"""Training under document attention packs each micro-batch into one row, as #1530 does.

The golden (tests/goldens/packed_docs_1530.json, made by #1530's own GPT, see goldens/README.md)
is a 512-token span whose documents cross the 128-token row edges (one is 200 tokens long and
is cut at 128 from its start, as #1530's `_build_cu_seqlens(max_doc_len=train_seq_len)` does).
The documents loader, wrapped by `PackedRows`, must give #1530's segments, and pgolf's GPT
(#1530's options, same weights) the record's per-token losses on them. Viewing the span as four
128-token rows, as training did before, changes the losses of the tokens after each edge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from golden import seeded_weights
from pgolf.data.loader import DistributedTokenLoader
from pgolf.data.loaders import DocumentPackingLoader, make_loader
from pgolf.data.packing import PackedRows, pack_documents, segment_starts
from pgolf.data.shards import write_shard
from pgolf.model import GPT, from_flat
from pgolf.model.docs import build_doc_mask
from test_records_frontier import GOLDENS, model_kwargs

GOLDEN = json.loads((Path(__file__).parent / "goldens" / "packed_docs_1530.json").read_text())
ROW, BOS = GOLDEN["row"], 1


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("packed") / "fineweb_train_000000.bin"
    write_shard(path, torch.tensor(GOLDEN["stream"]))
    return str(path)


@pytest.fixture(scope="module")
def record_1530() -> GPT:
    torch.manual_seed(0)
    model = GPT(**from_flat({**model_kwargs(GOLDEN["record"]), "doc_attention": True, "bos_id": BOS}))
    shapes = {k: tuple(v) for k, v in GOLDENS[GOLDEN["record"]]["state_dict_small"].items()}
    model.load_state_dict(seeded_weights(shapes), strict=True)
    return model.eval()


def packed_batch(shard: str, kind: str = "documents") -> PackedRows:
    model = type("M", (), {"doc_attention": True, "bos_id": BOS})()
    loader = pack_documents(make_loader(kind, shard, rank=0, world_size=1, device="cpu", seq_len=ROW, bos_id=BOS),
                            model, kind, ROW)
    assert isinstance(loader, PackedRows)
    return loader


def cu_of(segments: torch.Tensor) -> list[int]:
    return segments.reshape(-1).nonzero().flatten().tolist() + [segments.numel()]


@pytest.mark.parametrize("kind", ["documents", "sequential"])
def test_packed_segments_are_1530s(shard, kind):
    loader = packed_batch(shard, kind)
    x, y = loader.next_batch(4 * ROW * 8, ROW, 8)  # one rank, 8 micro-steps: 4 rows of 128 per micro-step
    assert x.shape == y.shape == (1, 4 * ROW)
    assert x.reshape(-1).tolist() == GOLDEN["stream"][:-1] and y.reshape(-1).tolist() == GOLDEN["stream"][1:]
    want = [c for i, c in enumerate(GOLDEN["cu_seqlens"]) if i == 0 or c != GOLDEN["cu_seqlens"][i - 1]]
    assert cu_of(loader.last_segments) == want
    assert loader.last_starts.reshape(-1).nonzero().flatten().tolist() == GOLDEN["bos_at"]


def test_segment_starts_equal_the_loaders_cu_seqlens():
    """The mask form equals DocumentPackingLoader.cu_seqlens (#1530's list form) on random spans."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, L = int(torch.randint(50, 400, (1,), generator=g)), int(torch.randint(3, 90, (1,), generator=g))
        x = torch.randint(0, 6, (n,), generator=g)  # BOS (1) often, runs of BOS too
        dl = DocumentPackingLoader.__new__(DocumentPackingLoader)
        dl.bos, dl.seq_len, dl.cu_bucket_size = (x == BOS).nonzero().flatten().numpy(), L, 64
        cu, _ = dl.cu_seqlens(0, n)
        listed = sorted(set(cu.tolist()))
        assert cu_of(segment_starts(x, BOS, L)) == listed, (trial, n, L)


def test_packed_per_token_losses_equal_1530(shard, record_1530):
    loader = packed_batch(shard)
    x, y = loader.next_batch(4 * ROW * 8, ROW, 8)
    want = torch.tensor(GOLDEN["per_token_loss"])
    with torch.no_grad():
        logits = record_1530.forward_logits(x, loader.doc_mask("sdpa"))
    got = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert float(got.mean()) == pytest.approx(GOLDEN["loss_mean"], rel=1e-5)
    # Teeth: the same span as four independent 128-token rows (the old training view) loses context.
    with torch.no_grad():
        rows = record_1530.forward_logits(x.view(-1, ROW), build_doc_mask(x.view(-1, ROW), BOS, "sdpa"))
    rows = F.cross_entropy(rows.reshape(-1, rows.size(-1)).float(), y.reshape(-1), reduction="none")
    differ = (rows - want).abs() > 1e-3
    assert differ[ROW:].any() and not differ[:ROW].any()  # only tokens after a row edge


def test_windows_loaders_stay_rows(shard):
    model = type("M", (), {"doc_attention": True, "bos_id": BOS})()
    plain = DistributedTokenLoader(shard, rank=0, world_size=1, device="cpu")
    assert pack_documents(plain, model, "coprime", ROW) is plain
    off = type("M", (), {"doc_attention": False, "bos_id": BOS})()
    assert pack_documents(plain, off, "documents", ROW) is plain
