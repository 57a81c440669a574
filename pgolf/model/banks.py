"""Convert between a banked record checkpoint and pgolf's per-layer state dict, both ways.

From 2026-03-23 (#549, Parallel Muon) the records store every block matrix in four banks:
`qo_bank` (2L, d, d) with Q_i at i and O_i at L+i, `kv_bank` (2L, kv, d) with K_i at i and V_i at
L+i, `mlp_up_bank` (L, hidden, d) and `mlp_down_bank` (L, d, hidden). Their exports and
quantizers already use the per-layer names pgolf's modules have (`blocks.{i}.attn.c_q.weight`,
...), so unbanking is a relabelling: slices are copied as they are (no transpose), every other
tensor passes through unchanged.
"""

from __future__ import annotations

from torch import Tensor

from pgolf.errors import PgolfError

# bank -> (per-layer name of slice i, per-layer name of slice L+i or None)
BANKS = {
    "qo_bank": ("attn.c_q.weight", "attn.proj.weight"),
    "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
    "mlp_up_bank": ("mlp.fc.weight", None),
    "mlp_down_bank": ("mlp.proj.weight", None),
}


def num_banked_layers(banked: dict[str, Tensor]) -> int:
    if "mlp_up_bank" not in banked:
        raise PgolfError("not a banked checkpoint: no mlp_up_bank (2026-03-23+ records store qo/kv/mlp banks)")
    return banked["mlp_up_bank"].shape[0]


def unbank_state_dict(banked: dict[str, Tensor]) -> dict[str, Tensor]:
    """A banked record state dict -> per-layer names that load into pgolf's GPT (`strict=True`)."""
    L = num_banked_layers(banked)
    out = {k: v for k, v in banked.items() if k not in BANKS}
    for bank, (first, second) in BANKS.items():
        t = banked[bank]
        if t.shape[0] != (2 * L if second else L):
            raise PgolfError(f"{bank} has {t.shape[0]} slices; a {L}-layer checkpoint has {2 * L if second else L}")
        for i in range(L):
            out[f"blocks.{i}.{first}"] = t[i].clone()
            if second:
                out[f"blocks.{i}.{second}"] = t[L + i].clone()
    return out


def rebank_state_dict(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """pgolf's per-layer state dict -> the banked layout a 2026-03-23+ record script loads."""
    import torch

    L = sum(1 for k in flat if k.startswith("blocks.") and k.endswith(".mlp.fc.weight"))
    if not L:
        raise PgolfError("no blocks.{i}.mlp.fc.weight in the state dict: nothing to bank")
    names = {f"blocks.{i}.{n}" for i in range(L) for pair in BANKS.values() for n in pair if n}
    missing = sorted(n for n in names if n not in flat)
    if missing:
        raise PgolfError(f"cannot bank: {missing[0]} is missing (every layer needs q, k, v, proj, fc, proj)")
    out = {k: v for k, v in flat.items() if k not in names}
    for bank, (first, second) in BANKS.items():
        slices = [flat[f"blocks.{i}.{first}"] for i in range(L)]
        if second:
            slices += [flat[f"blocks.{i}.{second}"] for i in range(L)]
        out[bank] = torch.stack(slices)
    return out
