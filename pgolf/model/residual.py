"""How a layer updates the residual stream: sequential (the baseline) or one of the four
published parallel-residual designs, which the records conflate. Each design is a function

    step(gpt, layer, lanes, x0, rope, values, docs) -> lanes

over a tuple of lanes: one lane for the single-stream designs, two for the lane designs. `layer`
is what runs at this virtual position (`Layer`: the block whose scalars apply, its physical
index, the attention linears and the MLP); `values`: value_residual.LayerValues, what the
layer's attention adds to its v. A lane design forks (lane0 = lane1 = x) at its first layer and
`merge_lanes` joins the lanes after the last layer. The U-Net skip is added to lane 0 only,
except in #1204's design (`SKIP_ALL_LANES`). Parameters stay where the records keep them:
top-level `parallel_post_lambdas` (L, 2, 2), `parallel_resid_lambdas` (L, 2), `lane_merge`,
indexed by physical layer.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

PARALLEL_RESIDUALS = ("gptj", "lane_merge", "routed_2x2", "learned_2lane")
PARALLEL_FINAL_LANES = ("mean", "attn", "mlp")
# Designs that carry two lanes from their first layer on.
TWO_LANE = ("lane_merge", "routed_2x2", "learned_2lane")
# Designs whose U-Net skip enters every lane (#1204's _apply_skip_parallel), not lane 0 only.
SKIP_ALL_LANES = ("learned_2lane",)


class Layer(NamedTuple):
    """One virtual position: `block` (scalars, LN scale, XSA flag), `physical_idx` (lane
    lambdas), `lin` (the attention module whose c_q/c_k/c_v/proj run) and `mlp`."""
    block: nn.Module
    physical_idx: int
    lin: nn.Module
    mlp: nn.Module


def sequential(gpt, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
               docs=None) -> tuple[Tensor, ...]:
    """The baseline block: attention, then the MLP on its output."""
    return (layer.block(lanes[0], x0, rope, values, docs, layer.lin, layer.mlp),)


def gptj(gpt, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values, docs=None) -> tuple[Tensor, ...]:
    """GPT-J single stream (2026-04-06 #1412, 2026-04-09 #1493): attention and MLP both read x_in,
    x_out = x_in + attn_scale*Attn(n(x_in)) + mlp_scale*MLP(n'(x_in)). No parameters."""
    block = layer.block
    x_in = block.mix(lanes[0], x0)
    return (x_in + block.attn_branch(x_in, rope, values, docs, layer.lin) + block.mlp_branch(x_in, layer.mlp),)


def lane_merge(gpt, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
               docs=None) -> tuple[Tensor, ...]:
    """Independent lanes (2026-04-04 #1334, 2026-04-08 #1477): attention updates lane 0 (reading
    mix(lane0, x0)), the MLP updates lane 1 (reading lane 1 only); the lanes never exchange and
    `merge_lanes` returns m*lane0 + (1-m)*lane1 with the scalar `lane_merge` (init 0.5)."""
    block = layer.block
    x_in = block.mix(lanes[0], x0)
    return (x_in + block.attn_branch(x_in, rope, values, docs, layer.lin),
            lanes[1] + block.mlp_branch(lanes[1], layer.mlp))


def routed_2x2(gpt, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
               docs=None) -> tuple[Tensor, ...]:
    """2x2 routed lanes (#1529/2026-04-10 #1530, all top records): attention reads mix(L0, x0), the
    MLP reads L1 in parallel; L_j' = r[i,j]*L_j + P[i,0,j]*a + P[i,1,j]*m, r init 1.1, P init 1."""
    block, i = layer.block, layer.physical_idx
    lane0, lane1 = lanes
    a = block.attn_branch(block.mix(lane0, x0), rope, values, docs, layer.lin)
    m = block.mlp_branch(lane1, layer.mlp)
    r = gpt.parallel_resid_lambdas[i].to(dtype=lane0.dtype)
    post = gpt.parallel_post_lambdas[i].to(dtype=lane0.dtype)
    return r[0] * lane0 + post[0, 0] * a + post[1, 0] * m, r[1] * lane1 + post[0, 1] * a + post[1, 1] * m


def learned_2lane(gpt, layer: Layer, lanes: tuple[Tensor, ...], x0: Tensor, rope, values,
                  docs=None) -> tuple[Tensor, ...]:
    """Two lanes with learned routing (2026-03-31 #1204, `GPT._parallel_block`), attention then MLP:
    a = attn_scale*Attn(n(mix(L0, x0))); L_j <- r[i,0]*L_j + P[i,0,j]*a; then
    m = mlp_scale*MLP(n(mix(L1, x0))) (L1 already holds P[i,0,1]*a); L_j <- r[i,1]*L_j + P[i,1,j]*m.
    r = `parallel_resid_lambdas` init sqrt(1.1), P = `parallel_post_lambdas` init 1, i physical.
    A block with its attention disabled skips the first half (no r scaling either)."""
    block, i = layer.block, layer.physical_idx
    lane0, lane1 = lanes
    r = gpt.parallel_resid_lambdas[i].to(dtype=lane0.dtype)
    post = gpt.parallel_post_lambdas[i].to(dtype=lane0.dtype)
    if block.attn_enabled:
        a = block.attn_branch(block.mix(lane0, x0), rope, values, docs, layer.lin)
        lane0, lane1 = r[0] * lane0 + post[0, 0] * a, r[0] * lane1 + post[0, 1] * a
    m = block.mlp_branch(block.mix(lane1, x0), layer.mlp)
    return r[1] * lane0 + post[1, 0] * m, r[1] * lane1 + post[1, 1] * m


def merge_lanes(gpt, lanes: tuple[Tensor, ...]) -> Tensor:
    """One stream from the lanes: the lane itself, `lane_merge` mixing, or the final-lane rule."""
    if len(lanes) == 1:
        return lanes[0]
    if gpt.parallel_residual == "lane_merge":
        m = gpt.lane_merge.to(dtype=lanes[0].dtype)
        return m * lanes[0] + (1 - m) * lanes[1]
    if gpt.parallel_final_lane == "attn":
        return lanes[0]
    if gpt.parallel_final_lane == "mlp":
        return lanes[1]
    return 0.5 * (lanes[0] + lanes[1])


STEPS = {"none": sequential, "gptj": gptj, "lane_merge": lane_merge, "routed_2x2": routed_2x2,
         "learned_2lane": learned_2lane}


def fork(lanes: tuple[Tensor, ...], two_lanes: bool) -> tuple[Tensor, ...]:
    """lane0 = lane1 = x at the first layer of a two-lane design."""
    return (lanes[0], lanes[0]) if two_lanes and len(lanes) == 1 else lanes
