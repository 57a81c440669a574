"""How a layer updates the residual stream: sequential (the baseline) or one of the four
published parallel-residual designs, which the records conflate. Each design is a function

    step(routing, layer, lanes, x0, rope, values, docs) -> lanes

over a tuple of lanes: one lane for the single-stream designs, two for the lane designs. `layer`
is what runs at this virtual position (`Layer`: the block whose scalars apply, its physical
index, the attention linears and the MLP); `values`: value_residual.LayerValues, what the
layer's attention adds to its v. A lane design forks (lane0 = lane1 = x) at its first layer and
`merge_lanes` joins the lanes after the last layer. The U-Net skip is added to lane 0 only,
except in #1204's design (`SKIP_ALL_LANES`). The model wires one `Routing` at construction; it
owns the design's parameters (`parallel_post_lambdas` (L, 2, 2), `parallel_resid_lambdas` (L, 2),
`lane_merge`, indexed by physical layer), which the model registers at top level under those
names, as the records keep them, and the steps read them from the routing, never from the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.model.recurrence import layer_schedule
from pgolf.model.roles import CONTROL, Role


PARALLEL_RESIDUALS = ("gptj", "lane_merge", "routed_2x2", "learned_2lane")
PARALLEL_FINAL_LANES = ("mean", "attn", "mlp")
# Designs that carry two lanes from their first layer on.
TWO_LANE = ("lane_merge", "routed_2x2", "learned_2lane")
# Designs whose U-Net skip enters every lane (#1204's _apply_skip_parallel), not lane 0 only.
SKIP_ALL_LANES = ("learned_2lane",)
# Designs that fork the lanes before the decoder layer's skip, so the skip reaches lane 0 only (#1530).
FORK_BEFORE_SKIP = ("routed_2x2",)
ROUTING_DESCRIPTIONS = {
    "gptj": "GPT-J parallel block (attention and MLP read the same input; 2026-04-06 #1412, 04-09 #1493)",
    "lane_merge": "two independent lanes (attention / MLP) merged by a learned scalar (2026-04-04 #1334, 04-08 #1477)",
    "routed_2x2": "2x2 routed parallel lanes with learned resid/post lambdas (#1529 / 2026-04-10 #1530)",
    "learned_2lane": "two lanes with learned routing, skips into every lane (2026-03-31 #1204)",
}


@dataclass
class ResidualConfig:
    """`model.residual`: how layers update the stream. `parallel_residual` from physical layer
    `parallel_start_layer` (0 = sequential everywhere), sigmoid U-Net skip gates
    (`skip_gates_enabled`, #1089 via 2026-04-01 #1218), the count of skip rows (null = derived)
    and the LN scale 1/sqrt(layer+1) of the block norms (`ln_scale`, 2026-03-21 #315)."""

    ln_scale: bool = False
    skip_gates_enabled: bool = False
    num_skip_weights: int | None = None
    parallel_start_layer: int = 0
    parallel_residual: str = "routed_2x2"
    parallel_final_lane: str = "mean"

    def check(self, model) -> None:  # model: config.ModelConfig (every family, read-only)
        for field, value, allowed in (("parallel_residual", self.parallel_residual, PARALLEL_RESIDUALS),
                                      ("parallel_final_lane", self.parallel_final_lane, PARALLEL_FINAL_LANES)):
            if value not in allowed:
                raise PgolfError(f"model.residual.{field}={value!r} is not one of {', '.join(allowed)}")
        n, rec = model.num_layers, model.recurrence
        if not 0 <= self.parallel_start_layer < n:
            raise PgolfError(f"model.residual.parallel_start_layer={self.parallel_start_layer} must be 0 (off) or a "
                             f"physical layer in 1..{n - 1}")
        if self.parallel_start_layer and self.parallel_residual in TWO_LANE:
            encoder = layer_schedule(n, passes=rec.num_loops, **rec.loop)[0] + layer_schedule(n)[0]
            if max(encoder, default=-1) >= self.parallel_start_layer:
                raise PgolfError(f"model.residual.parallel_start_layer={self.parallel_start_layer} falls in the U-Net "
                                 f"encoder (layers {sorted(set(encoder))}); the {self.parallel_residual} lanes start "
                                 f"in the decoder: use at least {max(encoder) + 1}")
        if self.num_skip_weights is not None and not 0 <= self.num_skip_weights <= n + rec.extra_layers:
            raise PgolfError(f"model.residual.num_skip_weights={self.num_skip_weights} must be null (derived) or a "
                             "count of U-Net skips")


class Layer(NamedTuple):
    """One virtual position: `block` (scalars, LN scale, XSA flag), `physical_idx` (lane
    lambdas), `lin` (the attention module whose c_q/c_k/c_v/proj run) and `mlp`."""
    block: nn.Module
    physical_idx: int
    lin: nn.Module
    mlp: nn.Module


def sequential(routing, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
               docs=None) -> tuple[Tensor, ...]:
    """The baseline block: attention, then the MLP on its output."""
    return (layer.block(lanes[0], x0, rope, values, docs, layer.lin, layer.mlp),)


def gptj(routing, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values, docs=None) -> tuple[Tensor, ...]:
    """GPT-J single stream (2026-04-06 #1412, 2026-04-09 #1493): attention and MLP both read x_in,
    x_out = x_in + attn_scale*Attn(n(x_in)) + mlp_scale*MLP(n'(x_in)). No parameters."""
    block = layer.block
    x_in = block.mix(lanes[0], x0)
    return (x_in + block.attn_branch(x_in, rope, values, docs, layer.lin) + block.mlp_branch(x_in, layer.mlp),)


def lane_merge(routing, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
               docs=None) -> tuple[Tensor, ...]:
    """Independent lanes (2026-04-04 #1334, 2026-04-08 #1477): attention updates lane 0 (reading
    mix(lane0, x0)), the MLP updates lane 1 (reading lane 1 only); the lanes never exchange and
    `merge_lanes` returns m*lane0 + (1-m)*lane1 with the scalar `lane_merge` (init 0.5)."""
    block = layer.block
    x_in = block.mix(lanes[0], x0)
    return (x_in + block.attn_branch(x_in, rope, values, docs, layer.lin),
            lanes[1] + block.mlp_branch(lanes[1], layer.mlp))


def routed_2x2(routing, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
               docs=None) -> tuple[Tensor, ...]:
    """2x2 routed lanes (#1529/2026-04-10 #1530, all top records): attention reads mix(L0, x0), the
    MLP reads L1 in parallel; L_j' = r[i,j]*L_j + P[i,0,j]*a + P[i,1,j]*m, r init 1.1, P init 1."""
    block, i = layer.block, layer.physical_idx
    lane0, lane1 = lanes
    a = block.attn_branch(block.mix(lane0, x0), rope, values, docs, layer.lin)
    m = block.mlp_branch(lane1, layer.mlp)
    r = routing.resid_lambdas[i].to(dtype=lane0.dtype)
    post = routing.post_lambdas[i].to(dtype=lane0.dtype)
    return r[0] * lane0 + post[0, 0] * a + post[1, 0] * m, r[1] * lane1 + post[0, 1] * a + post[1, 1] * m


def learned_2lane(routing, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
                  docs=None) -> tuple[Tensor, ...]:
    """Two lanes with learned routing (2026-03-31 #1204, `GPT._parallel_block`), attention then MLP:
    a = attn_scale*Attn(n(mix(L0, x0))); L_j <- r[i,0]*L_j + P[i,0,j]*a; then
    m = mlp_scale*MLP(n(mix(L1, x0))) (L1 already holds P[i,0,1]*a); L_j <- r[i,1]*L_j + P[i,1,j]*m.
    r = `parallel_resid_lambdas` init sqrt(1.1), P = `parallel_post_lambdas` init 1, i physical.
    A block with its attention disabled skips the first half (no r scaling either)."""
    block, i = layer.block, layer.physical_idx
    lane0, lane1 = lanes
    r = routing.resid_lambdas[i].to(dtype=lane0.dtype)
    post = routing.post_lambdas[i].to(dtype=lane0.dtype)
    if block.attn_enabled:
        a = block.attn_branch(block.mix(lane0, x0), rope, values, docs, layer.lin)
        lane0, lane1 = r[0] * lane0 + post[0, 0] * a, r[0] * lane1 + post[0, 1] * a
    m = block.mlp_branch(block.mix(lane1, x0), layer.mlp)
    return r[1] * lane0 + post[1, 0] * m, r[1] * lane1 + post[1, 1] * m


STEPS = {"none": sequential, "gptj": gptj, "lane_merge": lane_merge, "routed_2x2": routed_2x2,
         "learned_2lane": learned_2lane}


def fork(lanes: tuple[Tensor, ...], two_lanes: bool) -> tuple[Tensor, ...]:
    """lane0 = lane1 = x at the first layer of a two-lane design."""
    return (lanes[0], lanes[0]) if two_lanes and len(lanes) == 1 else lanes


class Routing:
    """One residual design wired for a model: per physical layer its step (`steps[i]`), whether it
    carries two lanes (`two_lane[i]`) and forks them before the skip (`fork_before_skip[i]`),
    whether skips enter every lane, how the lanes merge, and the design's parameters
    (`params`: record name -> (Parameter, role), for the model to register)."""

    def __init__(self, design: str, final_lane: str, num_layers: int, start_layer: int):
        parallel = [bool(start_layer) and i >= start_layer for i in range(num_layers)]
        self.design, self.final_lane, self.start_layer = design, final_lane, start_layer
        self.steps = [STEPS[design] if p else sequential for p in parallel]
        self.two_lane = [p and design in TWO_LANE for p in parallel]
        self.fork_before_skip = [t and design in FORK_BEFORE_SKIP for t in self.two_lane]
        self.skip_all_lanes = design in SKIP_ALL_LANES
        self.params: dict[str, tuple[nn.Parameter, Role]] = {}
        if start_layer and design in ("routed_2x2", "learned_2lane"):
            self.post_lambdas = nn.Parameter(torch.ones(num_layers, 2, 2))
            init = 1.1 if design == "routed_2x2" else 1.1 ** 0.5
            self.resid_lambdas = nn.Parameter(torch.full((num_layers, 2), init))
            self.params = {"parallel_post_lambdas": (self.post_lambdas, CONTROL),
                           "parallel_resid_lambdas": (self.resid_lambdas, CONTROL)}
        if start_layer and design == "lane_merge":
            self.lane_merge = nn.Parameter(torch.tensor(0.5))
            self.params = {"lane_merge": (self.lane_merge, CONTROL)}
        self.merge = {"mean": _mean, "attn": _first, "mlp": _second}[final_lane]
        if start_layer and design == "lane_merge":
            self.merge = self._learned_merge

    def merge_lanes(self, lanes: tuple[Tensor, ...]) -> Tensor:
        """One stream from the lanes: the lane itself, `lane_merge` mixing, or the final-lane rule."""
        return lanes[0] if len(lanes) == 1 else self.merge(lanes)

    def _learned_merge(self, lanes: tuple[Tensor, ...]) -> Tensor:
        m = self.lane_merge.to(dtype=lanes[0].dtype)
        return m * lanes[0] + (1 - m) * lanes[1]

    def describe(self) -> str | None:
        """One line for the record README, or None for the sequential baseline."""
        if not self.start_layer or self.design not in ROUTING_DESCRIPTIONS:
            return None
        lanes = f", final lane {self.final_lane}" if self.design in ("routed_2x2", "learned_2lane") else ""
        return f"{ROUTING_DESCRIPTIONS[self.design]} from physical layer {self.start_layer}{lanes}"


def _mean(lanes: tuple[Tensor, ...]) -> Tensor:
    return 0.5 * (lanes[0] + lanes[1])


def _first(lanes: tuple[Tensor, ...]) -> Tensor:
    return lanes[0]


def _second(lanes: tuple[Tensor, ...]) -> Tensor:
    return lanes[1]
