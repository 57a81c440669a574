"""The records' compressors and selective pruning: lzma, byte shuffle + brotli, #1855's per-group
coder (against the record's own group bytes, tests/goldens/lqer_pergroup_1855.json), and
+-1 pruning to a decimal byte target."""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil

import pytest
import torch
from test_lqer import GOLDEN, golden_object  # noqa: F401  (fixture)

from pgolf.errors import PgolfError
from pgolf.quant import (
    QuantSpec,
    compress,
    decompress,
    dequantize_state_dict,
    detect_compressor,
    load_quantized,
    serialize,
)
from pgolf.quant import pergroup
from pgolf.quant.codecs import byte_shuffle, byte_unshuffle
from pgolf.quant.lqer import LQER, apply_lqer
from pgolf.quant.prune import _prune_zeroed, prune_candidates, prune_to_target

brotli = pytest.importorskip("brotli")
RAW = bytes(range(256)) * 300 + b"pgolf" * 1000 + os.urandom(999)


@pytest.mark.parametrize(("compressor", "shuffle"), [("lzma", 0), ("lzma", 2), ("brotli", 0), ("brotli", 2),
                                                     ("zstd", 3), ("zlib", 2)])
def test_compress_round_trip_detection_and_shuffle(compressor, shuffle):
    blob = compress(RAW, compressor=compressor, level=1 if compressor != "zlib" else 9, byte_shuffle_stride=shuffle)
    assert detect_compressor(blob) == (None if compressor == "brotli" else compressor)
    assert decompress(blob) == RAW


def test_records_calls_byte_for_byte():
    # 03-25 #1019: lzma.compress(raw, preset=9); 04-05 #1394 .. #1851: brotli(quality 11) of the
    # stride-2 byte shuffle ("BSHF", stride, even bytes, odd bytes).
    assert compress(RAW, compressor="lzma") == lzma.compress(RAW, preset=9)
    shuffled = byte_shuffle(RAW, 2)
    assert shuffled == b"BSHF\x02" + RAW[0::2] + RAW[1::2] and byte_unshuffle(shuffled) == RAW
    assert byte_unshuffle(byte_shuffle(RAW[:-1], 3)) == RAW[:-1]
    assert compress(RAW, compressor="brotli", byte_shuffle_stride=2) == brotli.compress(shuffled, quality=11)


def test_similarity_order_is_the_records_greedy_l1_walk():
    def record_walk(m):  # #1855 `_similarity_sort_l1`, restated: nearest unused row, lowest index on ties
        order, used = [0], {0}
        for _ in range(len(m) - 1):
            cur = m[order[-1]].astype("int64")
            best = min((int(abs(m[i].astype("int64") - cur).sum()), i) for i in range(len(m)) if i not in used)[1]
            order.append(best)
            used.add(best)
        return order

    g = torch.Generator().manual_seed(3)
    for scale in (0.4, 3.0):  # small scale: many ties
        m = torch.clamp(torch.round(torch.randn(60, 24, generator=g) * scale), -31, 31).to(torch.int8).numpy()
        assert pergroup.similarity_order(m).tolist() == record_walk(m)


def test_group_bytes_and_permutations_equal_1855(golden_object, monkeypatch):  # noqa: F811
    _, obj = golden_object
    monkeypatch.setattr(pergroup, "backend_compress", lambda data, backend: data)  # the bytes before the back end
    streams = pergroup.pergroup_streams(pergroup.pergroup_encode(obj, backend="brotli"))
    want = GOLDEN["pergroup_raw"]
    assert len(streams) == len(want) + 2
    for stream, (label, w) in zip(streams, want.items()):
        assert (len(stream), hashlib.sha256(stream).hexdigest()[:32]) == (w["bytes"], w["sha256"]), label
    perms = brotli.decompress(streams[-1])
    assert hashlib.sha256(perms).hexdigest()[:32] == GOLDEN["pergroup_perms"]["sha256"]


@pytest.mark.parametrize("backend", ["brotli", "lzma", "zpaq", "lrzip"])
def test_pergroup_round_trip(golden_object, backend, tmp_path, monkeypatch):  # noqa: F811
    if backend == "lrzip" and shutil.which("lrzip") is None:
        pytest.skip("lrzip binary not installed")
    if backend == "zpaq":
        pytest.importorskip("zpaq")
    sd, obj = golden_object
    obj = {**obj, "lqer": apply_lqer(sd, obj, LQER())}
    if backend == "lrzip":  # never stall the suite: a busy machine gets an xfail, not a hang
        monkeypatch.setattr(pergroup, "LRZIP_TIMEOUT_S", 60)
    path = tmp_path / "a.ptz"
    try:
        blob = pergroup.pergroup_encode(obj, backend=backend)
        path.write_bytes(blob)
        back = load_quantized(path)
    except PgolfError as e:
        if backend == "lrzip" and "did not finish" in str(e):
            pytest.xfail(str(e))
        raise
    assert detect_compressor(blob) == "pergroup"
    assert list(back["quantized"]) == list(obj["quantized"])
    a, b = dequantize_state_dict(obj), dequantize_state_dict(back)
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_pergroup_bad_input(golden_object):  # noqa: F811
    _, obj = golden_object
    with pytest.raises(PgolfError, match="backend 'paq' is unknown"):
        pergroup.pergroup_encode(obj, backend="paq")
    with pytest.raises(PgolfError, match="pergroup_backend='paq' is unknown"):
        QuantSpec(compressor="pergroup", pergroup_backend="paq")
    blob = pergroup.pergroup_encode(obj, backend="brotli")
    with pytest.raises(PgolfError, match="more or fewer"):
        pergroup.pergroup_streams(blob + b"x")


# -----------------------------
# PRUNING
# -----------------------------


def test_prune_zeroes_the_fewest_cheapest_ones_to_fit(golden_object):  # noqa: F811
    _, obj = golden_object
    tensors = {n: {"treatment": "int7" if "tok_emb" in n else "int6"} for n in obj["quantized"]}
    keys, which, flat = prune_candidates(obj, tensors)
    assert "tok_emb.weight" not in {keys[i] for i in which.tolist()}  # int7: not a candidate at max_bits 6
    costs = torch.stack([obj["scales"][keys[i]].float()[j // obj["quantized"][keys[i]].shape[1]] ** 2
                         for i, j in zip(which.tolist(), flat.tolist())])
    assert bool((costs[1:] >= costs[:-1]).all())
    encode = lambda o: compress(serialize(o), compressor="zlib", level=1)  # noqa: E731
    full = len(encode(obj))
    out, info = prune_to_target(obj, encode, target_bytes=full - 3000, tensors=tensors)
    assert info["fits"] and len(encode(out)) <= full - 3000 and 0 < info["pruned"] < info["candidates"]
    n = info["pruned"]
    changed = sum(int((out["quantized"][k] != obj["quantized"][k]).sum()) for k in obj["quantized"])
    assert changed == n
    assert len(encode(_prune_zeroed(obj, keys, which[:n - 1], flat[:n - 1]))) > full - 3000  # the fewest
    same, info = prune_to_target(obj, encode, target_bytes=full, tensors=tensors)
    assert info["pruned"] == 0 and same["quantized"] == obj["quantized"]


def test_prune_through_the_spec_counts_code_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.mlp.fc.weight": torch.randn(256, 320, generator=g) * 0.05 for i in range(2)}
    plain = QuantSpec(preset="int6", default="int6:rowmax", compressor="zlib", level=1)
    size = plain.export(sd, tmp_path / "a.ptz").total_bytes
    spec = QuantSpec(preset="int6", default="int6:rowmax", compressor="zlib", level=1, prune=True,
                     prune_target_bytes=size + 1000)
    report = spec.export(sd, tmp_path / "b.ptz", code_bytes=3000)  # model target: size - 2000
    assert report.total_bytes <= size - 2000 and report.pruned["pruned"] > 0
    assert "selective_prune: zeroed" in report.format_table()
    with pytest.raises(PgolfError, match="prune_target_bytes=0"):
        QuantSpec(prune=True, prune_target_bytes=0)


def test_size_command_reports_the_plans_bytes_against_the_cap(capsys):
    # #1855's plan (GPTQ on identity Hessians, LQER, per-group) on the smoke model's shape.
    from pgolf.quant.size import main

    assert main(["experiment=smoke", "quant=pr1855", "quant.small_numel=4096", "quant.pergroup_backend=brotli"]) == 0
    out = capsys.readouterr().out
    assert "+lqer_asym" in out and "total pergroup-0:" in out
    line = out.strip().splitlines()[-1]
    fields = dict(kv.split(":") for kv in line.split(" ")[:5])
    assert int(fields["total_bytes"]) == int(fields["model_bytes"]) + int(fields["code_bytes"])
    assert fields["cap"] == "16000000" and "to spare" in line
    assert main(["experiment=smoke", "--std", "0"]) == 2
