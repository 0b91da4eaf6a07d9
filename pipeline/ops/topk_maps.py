"""The top-m form of target map rows: the m largest probabilities of every row, their keys and the tail sums beyond
them — what the `topk` encoding stores (`pipeline.targets.encoding`).

`topk_rows` takes rows already formed; `topk_maps` goes from post-RoPE queries and keys to the top-m rows of every map
that is a fixed combination of the teacher heads (SHD's squeeze, a head selection, a mean): on a CPU with the native
kernel (`pipeline.ops.native`: scores of a tile of rows in the core's cache, then one sweep per query row; neither
scores nor probabilities written back), elsewhere the torch form, a block of rows at a time (`attention_scores`,
causal softmax, the stacked head product, `topk_rows`). Both give the same numbers to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.ops import native
from pipeline.ops.attention_rows import attention_scores, causal_softmax_, position_blocks
from pipeline.ops.kd import TOPK_BLOCK
from pipeline.ops.shd import combine_heads


def topk_rows(maps: Tensor, m: int, temperatures: tuple[float, ...] = (1.0,)) -> tuple[Tensor, ...]:
    """The top-m form of map rows [..., K]: the m largest entries of every row and, for every τ, the row's tail sum
    R_τ = Σ_{not kept} t^{1/τ} (τ = 1: the mass outside the top m).

    Returns (`values` [..., m] fp32 probabilities, descending; `indices` [..., m] int64; `tails`
    [..., len(temperatures)] fp32), the tails summed over the complement itself, so they are exactly 0 when the top m
    hold every non-zero key. A row with fewer than m keys (K < m) is padded with zero columns: the extra entries carry
    exactly 0 mass at indices ≥ K, keys the row cannot see. Long rows are cut into blocks of `TOPK_BLOCK` keys: the
    m blocks with the largest maxima hold the top m, so only their entries (taken as whole blocks, whatever the strides
    of `maps`) are ranked one by one, and the tail is the other blocks' sums plus the candidates not kept (as
    `ops.kd.topk_targets` does for the logits).
    """
    if m < 1:
        raise ValueError(f"m={m}: expected m >= 1")
    maps = maps.float()
    if maps.shape[-1] < m:
        maps = torch.nn.functional.pad(maps, (0, m - maps.shape[-1]))
    keys = maps.shape[-1]
    if 2 * m * TOPK_BLOCK > keys:
        values, indices = maps.topk(m, dim=-1)
        rest = maps.scatter(-1, indices, 0.0)
        tails = torch.stack([(rest if tau == 1.0 else rest.pow(1 / tau)).sum(-1) for tau in temperatures], dim=-1)
        return values, indices, tails
    num_blocks = keys // TOPK_BLOCK
    lead = maps.shape[:-1]
    blocked = maps[..., : num_blocks * TOPK_BLOCK].unflatten(-1, (num_blocks, TOPK_BLOCK))
    blocks = blocked.amax(-1).topk(m, dim=-1, sorted=False).indices
    grid = [torch.arange(n, device=maps.device).view(n, *[1] * (len(lead) - dim)) for dim, n in enumerate(lead)]
    candidate_values = blocked[(*grid, blocks)].flatten(-2)
    candidates = (blocks[..., None] * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=maps.device)).flatten(-2)
    if num_blocks * TOPK_BLOCK < keys:
        ragged_end = torch.arange(num_blocks * TOPK_BLOCK, keys, device=maps.device).expand(*lead, -1)
        candidates = torch.cat([candidates, ragged_end], dim=-1)
        candidate_values = torch.cat([candidate_values, maps[..., num_blocks * TOPK_BLOCK :]], dim=-1)
    values, positions = candidate_values.topk(m, dim=-1)
    tails = []
    for tau in temperatures:
        powered_blocks = blocked if tau == 1.0 else blocked.pow(1 / tau)
        powered_candidates = candidate_values if tau == 1.0 else candidate_values.pow(1 / tau)
        other_blocks = powered_blocks.sum(-1).scatter_(-1, blocks, 0.0).sum(-1)
        tails.append(other_blocks + powered_candidates.scatter(-1, positions, 0.0).sum(-1))
    return values, candidates.gather(-1, positions), torch.stack(tails, dim=-1)


def topk_maps(
    query: Tensor,
    key: Tensor,
    scale: float,
    positions: Tensor,
    weights: Tensor,
    m: int,
    temperatures: tuple[float, ...] = (1.0,),
) -> tuple[Tensor, Tensor, Tensor]:
    """`topk_rows` of the maps Σ_h weights[b, s, h] · softmax_h(q kᵀ · scale) of the query rows at `positions`.

    `query` [B, H, T, d], `key` [B, H_kv, T, d] (as `attention_scores` takes them), `positions` [R] or [B, R]
    (sorted; row r sees keys 0..positions[r]), `weights` [B, S, H] → (`values` [B, S, R, m], `indices` [B, S, R, m],
    `tails` [B, S, R, len(temperatures)]) as `topk_rows` gives them. A row that sees fewer than m keys is padded with
    exact zeros; the native kernel puts them at the keys after the row's own (which it cannot see), the torch form at
    any key whose probability is exactly 0. The kernel takes non-negative weights (every kind's are: selections,
    means, α); others go through the torch form, which holds one block of probabilities (`position_blocks`) at a time.
    """
    if query.device.type == "cpu" and native.library() is not None and not bool((weights < 0).any()):
        return native.topk_map_qk(query, key, scale, positions, weights, m, temperatures)
    batch, heads, seq_len = query.shape[:3]
    per_sample = positions if positions.dim() == 2 else positions.expand(batch, -1)
    parts = []
    for block in position_blocks(per_sample, batch, heads, seq_len):
        probabilities = causal_softmax_(attention_scores(query, key, scale, block), block)
        parts.append(topk_rows(combine_heads(probabilities, weights), m, temperatures))
    return tuple(torch.cat(part, dim=2) for part in zip(*parts, strict=True))
