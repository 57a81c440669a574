"""The bundle carries what its config uses (pgolf.submit.reach), and both of its forms (the
readable source and the counted minified, lzma, base85 two-line script) build the same model
as the package. Fast: no training here; tests/test_submit_record.py runs bundled scripts end to end.

Each case execs a bundle's code as a module (not as __main__, so nothing runs), builds its GPT
and pgolf's GPT from the same options and seed, and requires the same loss to the bit."""

from __future__ import annotations

import ast
import base64
import copy
import json
import lzma
import re
import sys
import types

from pathlib import Path

import pytest
import torch
from test_compile import ALL_ON, TINY, VARIANTS
from test_records_frontier import model_kwargs

import pgolf
from pgolf.build import to_container
from pgolf.errors import PgolfError
from pgolf.model import GPT, from_flat
from pgolf.submit import bundle, reach
from pgolf.submit.__main__ import main
from pgolf.submit.entry import apply_env


@pytest.fixture(scope="module")
def smoke() -> dict:
    return to_container(pgolf.compose(["experiment=smoke"]))


def with_model(config: dict, **options) -> dict:
    out = copy.deepcopy(config)
    model = from_flat({**{k: v for k, v in out["model"].items() if not k.startswith("_")}, **TINY, **options})
    if model["embeddings"].get("bigram_buckets"):
        model["embeddings"]["bigram_buckets"] = 64
    out["model"] = {"_target_": out["model"]["_target_"], **model}
    return out


def namespace(source: str) -> dict:
    """The globals of `source` run as a module (dataclasses look their module up in sys.modules)."""
    module = types.ModuleType("bundled_train_gpt")
    sys.modules[module.__name__] = module
    exec(compile(source, "train_gpt.py", "exec"), module.__dict__)
    return module.__dict__


def unwrap(script: str) -> str:
    """The code inside a counted two-line script."""
    lines = script.splitlines()
    assert len(lines) == 2 and lines[0] == "import lzma as L,base64 as B", lines[0]
    (blob,) = re.fullmatch(r'exec\(L\.decompress\(B\.b85decode\("([^"\\]*)"\)\)\)', lines[1]).groups()
    return lzma.decompress(base64.b85decode(blob)).decode("utf-8")


def loss_of(gpt_cls, options: dict) -> float:
    torch.manual_seed(0)
    model = gpt_cls(**options)
    with torch.no_grad():  # no zero-init matrices: every part changes the loss
        for p in model.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 128, (2, 32), generator=g), torch.randint(0, 128, (2, 32), generator=g)
    with torch.no_grad():
        return float(model(x, y))


def test_every_row_names_a_shipped_definition_and_a_real_option(smoke):
    statements, _ = bundle._statements()
    defined = set().union(*(bundle._defines(stmt) for _, stmt in statements))
    for row in reach.rows():
        assert set(row.names) <= defined, row.names
        for key in row.keys:
            reach.option(smoke, key)  # an option the config or its target has
    config = copy.deepcopy(smoke)
    del config["data"]["loader"]  # absent: the target's default decides, as in the run
    assert reach.option(config, "data.loader") == "sequential"


def test_a_stale_option_name_stops_the_bundler(smoke, monkeypatch):
    monkeypatch.setattr(reach, "REACH", (reach.Reach(("BigramHash",), ("model.bigram_vocab",), bool),))
    with pytest.raises(AssertionError, match="reads model.bigram_vocab, which neither the config nor "
                                             "pgolf.model.GPT has: update the table"):
        bundle.render(smoke)


def test_the_smoke_bundle_leaves_out_every_unused_part(smoke):
    dropped, fixed = reach.left_out(bundle.bundle_config(smoke))
    assert dropped == {name for row in reach.rows() for name in row.names}  # the baseline uses no part
    assert "model.embeddings.smear_gate" in fixed and "data.loader" in fixed
    source = bundle.render(smoke)
    tree = ast.parse(source)
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not top & dropped
    assert "Left out (the run's config does not use them): AttnOutGate, BigramHash, CoprimeStrideLoader" in source
    assert f"FIXED = {fixed!r}" in source
    counted = bundle.counted_script(smoke)
    assert counted.count("\n") == 2 and len(counted) < len(source) / 3
    assert bundle.code_bytes(smoke) == len(counted.encode())


@pytest.mark.parametrize("name", sorted(VARIANTS) + ["all_on"])
def test_the_bundled_model_equals_the_package_model(smoke, name):
    config = with_model(smoke, **(ALL_ON if name == "all_on" else VARIANTS[name]))
    dropped, _ = reach.left_out(config)
    ns = namespace(bundle.render(config))
    kept = {n for row in reach.rows() for n in row.names} - dropped
    assert all(ns[n] is not ns["_Absent"] for n in kept) and all(ns.get(n, ns["_Absent"]) is ns["_Absent"]
                                                                  for n in dropped)
    options = {k: v for k, v in config["model"].items() if not k.startswith("_")}
    assert loss_of(ns["GPT"], options) == loss_of(GPT, options)


@pytest.mark.parametrize("name", ["smoke", "all_on"])
def test_the_counted_script_runs_the_same_model(smoke, name):
    config = smoke if name == "smoke" else with_model(smoke, **ALL_ON)
    code = unwrap(bundle.counted_script(config))
    ns = namespace(code)
    assert ns["CONFIG"] == bundle.bundle_config(config)
    options = {k: v for k, v in config["model"].items() if not k.startswith("_")}
    assert loss_of(ns["GPT"], options) == loss_of(GPT, options)


def test_the_env_entry_takes_the_records_names_into_the_part_configs(smoke):
    """Leaf names as the records spell them set the nested keys (GATE_WINDOW both of its places), the
    prefixed form too, and the records' mutually exclusive gate booleans select model.attention.gate."""
    config = copy.deepcopy(smoke)
    env = {"XSA_LAST_N": "2", "GATE_WINDOW": "8", "MODEL_RECURRENCE_NUM_LOOPS": "1", "GATED_ATTN_ENABLED": "1",
           "SPARSE_ATTN_GATE_ENABLED": "0"}
    applied = apply_env(config, env)
    assert sorted(applied) == sorted(f"{k}={v}" for k, v in env.items())
    m = config["model"]
    assert (m["attention"]["xsa_last_n"], m["attention"]["gate_window"], m["embeddings"]["gate_window"],
            m["recurrence"]["num_loops"], m["attention"]["gate"]) == (2, 8, 8, 1, "gated")
    apply_env(config, {"GATED_ATTN_ENABLED": "0"})
    assert m["attention"]["gate"] == "none"
    with pytest.raises(PgolfError, match="GATED_ATTN_ENABLED=1 and SPARSE_ATTN_GATE_ENABLED=1 are mutually exclusive"):
        apply_env(config, {"GATED_ATTN_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "true"})


def test_an_override_of_a_frozen_option_is_refused(smoke):
    ns = namespace(unwrap(bundle.counted_script(smoke)))
    config = copy.deepcopy(ns["CONFIG"])
    ns["check_fixed"](config)  # unchanged: fine
    config["model"]["embeddings"]["smear_gate"] = "token"
    with pytest.raises(ns["PgolfError"], match=r"^model.embeddings.smear_gate='token': this script was bundled for "
                                               r"model.embeddings.smear_gate='none' and left out the code other values use"):
        ns["check_fixed"](config)
    # A record's gate boolean maps onto the choice even where the gate's class was left out, and is refused.
    config = copy.deepcopy(ns["CONFIG"])
    assert ns["apply_env"](config, {"SPARSE_ATTN_GATE_ENABLED": "1"}) == ["SPARSE_ATTN_GATE_ENABLED=1"]
    with pytest.raises(ns["PgolfError"], match=r"^model.attention.gate='sparse': this script was bundled for "
                                               r"model.attention.gate='none'"):
        ns["check_fixed"](config)
    with pytest.raises(ns["PgolfError"], match="this part was left out of the bundled script"):
        ns["BigramHash"](128, buckets=64, dim=16, hash="mul", init="normal", scale_init=None, qat={})


def test_the_run_data_options_travel_with_the_bundle(smoke):
    config = copy.deepcopy(smoke)
    config["data"].update(loader="coprime", bos_id=2)
    data = bundle.bundle_config(config)["data"]
    assert (data["loader"], data["bos_id"], data["caseops"]) == ("coprime", 2, False)
    ns = namespace(bundle.render(config))
    assert ns["CoprimeStrideLoader"] is not ns["_Absent"] and ns["ShuffledSequenceLoader"] is ns["_Absent"]


def test_the_1855_model_ships_its_parts_only(smoke):
    """The largest frontier model (04-27 #1855 at the goldens' small shape, with doc attention and
    the document loader): its parts are shipped and run as the package's; the others are not."""
    config = copy.deepcopy(smoke)
    config["model"].update(from_flat({**model_kwargs("pr1855_lqer_bossmear"), "doc_attention": True}))
    config["data"]["loader"] = "documents"
    dropped, fixed = reach.left_out(config)
    assert {"SparseAttnGate", "window_smear", "WindowSmearPart", "routed_2x2", "exclusive_self_attention",
            "build_doc_mask", "DocumentPackingLoader"}.isdisjoint(dropped)
    assert {"BigramHash", "ValueEmbedding", "gptj", "lane_merge", "learned_2lane", "DenseAttnGate",
            "AttnOutGate", "token_smear", "CoprimeStrideLoader"} <= dropped
    ns = namespace(unwrap(bundle.counted_script(config)))
    options = {k: v for k, v in config["model"].items() if not k.startswith("_")}
    assert loss_of(ns["GPT"], options) == loss_of(GPT, options)
    assert bundle.code_bytes(config) > bundle.code_bytes(smoke)


def test_the_code_command_prints_a_configs_bytes(smoke, capsys):
    assert main(["code", "experiment=smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    readable, minified = len(bundle.render(smoke).encode()), len(bundle.minified_source(smoke).encode())
    assert out[0] == (f"code bytes for experiment=smoke: readable {readable:,}, minified {minified:,}, counted "
                      f"{bundle.code_bytes(smoke):,} (minified + lzma + base85, the train_gpt.py a submission ships)")
    assert out[1].startswith(f"left out ({len(reach.left_out(smoke)[0])}, the config does not use them): AttnOutGate, BigramHash, ")


CODE_BYTES = json.loads((Path(__file__).parent / "goldens" / "code_bytes.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", sorted(CODE_BYTES["cases"]))
def test_code_is_counted_as_the_record_counts_it(case):
    """On the same source, pgolf's counted bytes equal #2135's own `_compressed_code_size`
    (pyminify without renames or hoisting, lzma, base85, the two-line wrapper)."""
    golden = CODE_BYTES["cases"][case]
    script = bundle.wrap(bundle.minify(golden["source"]))
    assert len(golden["source"].encode()) == golden["raw_bytes"]
    assert len(script.encode()) == golden["counted_bytes"]
    ns = namespace(unwrap(script))  # and the wrapped code runs
    assert "Point" in ns or "Counter" in ns


def test_the_records_ttt_variables_reach_the_nested_eval_ttt_keys():
    """#1530/#1626's TTT_*, PHASED_TTT_*, GLOBAL_TTT_* variables (eval.ttt's keys upper-cased) and
    the prefixed EVAL_TTT_<KEY> override a bundled phased-TTT script's nested eval.ttt."""
    config = to_container(pgolf.compose(["experiment=smoke", "eval=ttt_phased"]))
    ns = namespace(bundle.render(config))
    run = copy.deepcopy(ns["CONFIG"])
    environ = {"TTT_LORA_RANK": "8", "EVAL_TTT_TTT_CHUNK_SIZE": "48", "TTT_LORA_ALPHA": "144", "TTT_MASK": "no_qv",
               "TTT_K_LORA": "0", "PHASED_TTT_PREFIX_DOCS": "2500", "PHASED_TTT_NUM_PHASES": "1",
               "GLOBAL_TTT_LR": "0.002", "EVAL_STRIDE": "32"}
    applied = ns["apply_env"](run, environ)
    assert sorted(a.split("=")[0] for a in applied) == sorted(environ)
    ttt = ns["make"](run["eval"]).ttt
    assert (ttt.ttt_lora_rank, ttt.ttt_chunk_size, ttt.ttt_lora_alpha, ttt.ttt_mask, ttt.ttt_k_lora) == \
        (8, 48, 144, "no_qv", False)
    assert (ttt.phased_ttt_prefix_docs, ttt.phased_ttt_num_phases, ttt.global_ttt_lr) == (2500, 1, 0.002)
    assert run["eval"]["stride"] == 32 and type(ttt).__name__ == "PhasedTTT"
    with pytest.raises(ns["PgolfError"], match=r"^TTT_LORA_RANK='eight' is not a int"):
        ns["apply_env"](copy.deepcopy(ns["CONFIG"]), {"TTT_LORA_RANK": "eight"})
