"""Checks that need only the config, across groups: run at compose time, before anything is written.

`pgolf.build.check_values` calls `check_groups` on the resolved config (a plain dict), so a
wrong combination costs one line and leaves no run directory, reads no data (issue 21 item 4).
Each group's own ranges live with the group (its constructor, or `check_<group>_args` for a
group built with runtime objects, such as the optimizer); here are the ones that span groups,
and the runtime check of the data's BOS id (item 7), which needs the tokenizer.
"""

from __future__ import annotations

from pgolf.data.packing import CONTIGUOUS_LOADERS
from pgolf.errors import PgolfError
from pgolf.optim import check_optimizer_args
from pgolf.progressive import parse_train_seq_schedule

MICRO_BATCHES = 8  # world_size * grad_accum_steps: the baseline's 8 // world_size accumulation on any world size


def check_groups(config: dict) -> None:
    """Cross-group checks of a resolved config (PgolfError naming the values and the fix)."""
    model, sched, data = config.get("model", {}), config.get("schedule", {}), config.get("data", {})
    if "optimizer" in config:
        check_optimizer_args(**{k: v for k, v in config["optimizer"].items() if not k.startswith("_")})
    if sched:
        tokens = sched["train_batch_tokens"]
        local = tokens // MICRO_BATCHES
        for seq in seq_lens(sched):  # each length of a progressive schedule (#2014) too
            if tokens % MICRO_BATCHES or local % seq:
                raise PgolfError(f"schedule.train_batch_tokens={tokens} must split into whole sequences of {seq} over "
                                 f"{MICRO_BATCHES} micro-batches; use a multiple of {MICRO_BATCHES * seq}")
        loader = data.get("loader", "sequential")
        if len(seq_lens(sched)) > 1 and loader not in CONTIGUOUS_LOADERS:
            raise PgolfError(f"schedule.train_seq_schedule changes the training length but data.loader={loader} draws "
                             f"windows of one fixed length; use data.loader=documents (#2014) or sequential")
    if model and data and "bos_id" in model and "bos_id" in data and model["bos_id"] != data["bos_id"]:
        raise PgolfError(f"model.bos_id={model['bos_id']} but data.bos_id={data['bos_id']}: document boundaries must "
                         "follow the data's tokenizer; set both to its BOS id (1 for the challenge's tokenizers)")
    attention = model.get("attention") or {}
    if attention.get("doc_attention") and data.get("loader", "sequential") in CONTIGUOUS_LOADERS and sched:
        packed = sched["train_batch_tokens"] // MICRO_BATCHES
        rope = attention.get("rope_train_seq_len") or 0
        if rope and packed > rope:  # pgolf.data.packing: training attends over one packed row per micro-batch
            raise PgolfError(f"model.attention.rope_train_seq_len={rope} with model.attention.doc_attention: training "
                             f"packs each micro-batch into one row of {packed} tokens (#1530), so RoPE's NTK rescale "
                             "would switch on in training only; set model.attention.rope_train_seq_len=0 (the VarLen "
                             "records' ROPE_YARN=0)")


def seq_lens(sched: dict) -> list[int]:
    """The training lengths of a schedule config: its train_seq_schedule's, else train_seq_len."""
    plan = parse_train_seq_schedule(sched.get("train_seq_schedule", ""), sched["train_seq_len"])
    return list(dict.fromkeys(length for _, length in plan))


def check_bos(tokenizer_bos: int, *, model_bos: int | None, data_bos: int | None, tokenizer_path: str) -> None:
    """Every part that looks for a BOS uses the tokenizer's: refuse a config that names another."""
    for key, value in (("model.bos_id", model_bos), ("data.bos_id", data_bos)):
        if value is not None and value != tokenizer_bos:
            raise PgolfError(f"{key}={value} but the data's tokenizer {tokenizer_path} has BOS id {tokenizer_bos}; "
                             f"set {key}={tokenizer_bos}")
