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


def num_skips(num_layers: int, **loop) -> int:
    """U-Net skip rows: min(|enc|, |dec|) of the fully looped schedule."""
    enc, dec = layer_schedule(num_layers, passes=loop.get("num_loops", 0), **loop)
    return min(len(enc), len(dec))
