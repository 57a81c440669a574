"""Depth recurrence: which physical layer runs at each virtual position.

Loop45x2 (2026-04-05 #1394) and the 3-layer loop (2026-04-09 #1493, all top records) run the
physical span [loop_start, loop_end] 1 + passes times:
virtual = [0 .. loop_start-1] + [loop_start .. loop_end] * (1 + passes) + [loop_end+1 .. L-1],
the first half (floor) of the virtual layers is the U-Net encoder, the rest the decoder, and
the same Block objects are reused. With passes = 0 the split is the plain L//2 / rest. The
number of U-Net skips is min(|enc|, |dec|) of the full schedule (passes = num_loops); fewer
passes use the first ones. Indices here are physical (`physical_idx`); a virtual position is
its place in the list.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.errors import PgolfError


# Which index per-layer options (xsa_last_n, ve_layers, LN scale) and block scalars follow.
LAYER_INDEX = ("physical", "virtual")


@dataclass
class RecurrenceConfig:
    """`model.recurrence`: `num_loops` extra passes over physical layers [loop_start, loop_end]
    (when looping switches on is the schedule's); `loop_untie_mlp` and `layer_index=virtual`
    are #1204's untied repeat MLPs and one block of scalars per virtual layer."""

    num_loops: int = 0
    loop_start: int = 0
    loop_end: int = 0
    loop_untie_mlp: bool = False
    layer_index: str = "physical"

    @property
    def loop(self) -> dict:
        """The keywords of layer_schedule / layer_plan / num_skips."""
        return {"num_loops": self.num_loops, "loop_start": self.loop_start, "loop_end": self.loop_end}

    @property
    def extra_layers(self) -> int:
        """Virtual layers the loops add at full depth."""
        return self.num_loops * (self.loop_end - self.loop_start + 1) if self.num_loops else 0

    def num_indexed(self, num_layers: int) -> tuple[str, int]:
        """(kind, count) of the layer indices per-layer options take: physical, or virtual under
        layer_index=virtual (#1204)."""
        if self.layer_index == "virtual":
            return "virtual", num_layers + self.extra_layers
        return "physical", num_layers

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        if self.layer_index not in LAYER_INDEX:
            raise PgolfError(f"model.recurrence.layer_index={self.layer_index!r} is not one of {', '.join(LAYER_INDEX)}")
        if self.num_loops < 0:
            raise PgolfError(f"model.recurrence.num_loops={self.num_loops} must be >= 0 (0 = no depth recurrence)")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < model.num_layers:
            raise PgolfError(f"model.recurrence.loop_start={self.loop_start}, model.recurrence.loop_end={self.loop_end} "
                             f"must satisfy 0 <= loop_start <= loop_end < num_layers={model.num_layers} "
                             "(physical indices, inclusive)")
        if self.loop_untie_mlp and not self.num_loops:
            raise PgolfError("model.recurrence.loop_untie_mlp=true needs depth recurrence "
                             "(model.recurrence.num_loops >= 1)")


def layer_schedule(num_layers: int, *, num_loops: int = 0, loop_start: int = 0, loop_end: int = -1,
                   passes: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder, decoder) physical indices with `passes` extra passes over the loop span."""
    if not num_loops or not passes:
        half = num_layers // 2
        return tuple(range(half)), tuple(range(half, num_layers))
    span = list(range(loop_start, loop_end + 1))
    order = list(range(loop_start)) + span * (1 + passes) + list(range(loop_end + 1, num_layers))
    half = len(order) // 2
    return tuple(order[:half]), tuple(order[half:])


def describe_loop(*, num_loops: int, loop_start: int, loop_end: int, virtual_blocks: bool,
                  untie_mlp: bool) -> str | None:
    """One line for the record README (None without depth recurrence). When looping switches on
    is the schedule's to say, not the model's."""
    if not num_loops:
        return None
    extras = ("; one block of scalars per virtual layer" if virtual_blocks else "") + (
        "; untied repeat MLPs" if untie_mlp else "")
    return (f"depth recurrence: physical layers {loop_start}..{loop_end} run {1 + num_loops} times{extras} "
            "(2026-04-05 #1394, 04-09 #1493, 03-31 #1204)")


def num_skips(num_layers: int, **loop) -> int:
    """U-Net skip rows: min(|enc|, |dec|) of the fully looped schedule."""
    enc, dec = layer_schedule(num_layers, passes=loop.get("num_loops", 0), **loop)
    return min(len(enc), len(dec))


def layer_plan(num_layers: int, *, num_loops: int = 0, loop_start: int = 0, loop_end: int = -1, passes: int = 0,
               virtual_blocks: bool = False, untie_mlp: bool = False
               ) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """(encoder, decoder) as (block_idx, physical_idx, repeat_mlp_idx) per virtual position.

    block_idx is the Block whose scalars run there: the physical index (shared blocks, #1394 on)
    or the virtual position itself (`virtual_blocks`, 2026-03-31 #1204: one Block per virtual
    layer). repeat_mlp_idx is -1 (the physical layer's MLP) or, with `untie_mlp` (#1204's
    REPEAT_UNTIE_MLP=full), the untied copy for that span layer in that extra pass:
    (pass - 1) * span + (physical - loop_start)."""
    enc, dec = layer_schedule(num_layers, num_loops=num_loops, loop_start=loop_start, loop_end=loop_end,
                              passes=passes)
    span = loop_end - loop_start + 1
    seen: dict[int, int] = {}
    plan = []
    for v, p in enumerate(enc + dec):
        n = seen.get(p, 0)  # earlier passes over p
        seen[p] = n + 1
        plan.append((v if virtual_blocks else p, p, (n - 1) * span + (p - loop_start) if untie_mlp and n else -1))
    return tuple(plan[:len(enc)]), tuple(plan[len(enc):])
