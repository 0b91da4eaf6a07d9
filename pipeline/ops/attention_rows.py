"""Attention probabilities of a block of query rows, recomputed from post-RoPE queries and keys: what the cache stage
forms its targets from without ever holding a [B, H, T, T] map.

A block is a set of query positions per sample — contiguous rows [a, b), or any sorted rows (a subsample) — against
the keys up to the block's last row; memory is O(B · H · rows · T). Scores and softmax are fp32 whatever the model's
dtype (the probabilities are distillation targets), with the causal mask of each row. Pure tensor maths.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

ROW_BLOCK_ELEMENTS = 1 << 22
"""Probabilities (B · H · rows · keys) per block: 16 MB of fp32. The passes over a block (scores, softmax, squeeze,
top m, sums) are memory-bound on a CPU; at this size a block stays in a large last-level cache between them (2²⁴
took 1.5× as long at T 8192, 2²⁰ no less: more blocks, more calls)."""


def repeat_heads(key: Tensor, num_heads: int) -> Tensor:
    """Keys or values [B, H_kv, T, d] repeated per query head → [B, H, T, d]: query head h reads KV head
    h // (H / H_kv)."""
    return key if key.shape[1] == num_heads else key.repeat_interleave(num_heads // key.shape[1], dim=1)


def block_size(batch: int, heads: int, seq_len: int, budget: int = ROW_BLOCK_ELEMENTS) -> int:
    """Query rows per block so that a block's probabilities hold at most `budget` entries (at least one row)."""
    return max(1, budget // max(1, batch * heads * seq_len))


def position_blocks(positions: Tensor, batch: int, heads: int, seq_len: int) -> Iterator[Tensor]:
    """Query rows `positions` [B, R] in blocks of columns small enough for one block of probabilities
    (`block_size`)."""
    step = block_size(batch, heads, seq_len)
    for start in range(0, positions.shape[1], step):
        yield positions[:, start : start + step]


def row_blocks(seq_len: int, rows_per_block: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of contiguous query-row blocks covering 0..T−1."""
    for start in range(0, seq_len, rows_per_block):
        yield start, min(start + rows_per_block, seq_len)


def attention_scores(query: Tensor, key: Tensor, scale: float, positions: Tensor) -> Tensor:
    """q kᵀ · scale of the query rows at `positions`, unmasked → [B, H, R, K] fp32, K = the last position + 1 (keys
    after it are causally hidden from every row of the block).

    `query` [B, H, T, d], `key` [B, H_k, T, d] (H_k divides H; query head h reads key head h // (H / H_k), taken as
    a grouped matrix product, never repeated); `positions` [R] (the same rows in every sample) or [B, R] (per
    sample), sorted. The scale is folded into the query rows (the block is memory-bound on a CPU: every pass over it
    counts).
    """
    batch, heads, _, width = query.shape
    key_heads = key.shape[1]
    per_sample = positions if positions.dim() == 2 else positions.expand(batch, -1)
    count = per_sample.shape[1]
    keys = int(per_sample.max()) + 1
    index = per_sample[:, None, :, None].expand(batch, heads, count, width)
    rows = query.gather(2, index).float() * scale
    grouped = rows.view(batch, key_heads, heads // key_heads * count, width)
    return (grouped @ key[:, :, :keys].float().transpose(-1, -2)).view(batch, heads, count, keys)


def causal_softmax_(scores: Tensor, positions: Tensor) -> Tensor:
    """The probabilities of `attention_scores`' block, each row over the keys up to its own position; the keys a row
    may not see are exactly 0 (only the keys after the block's first row can be hidden, so only those are masked).
    On a CPU the softmax is written over the scores (the out= form, row by row: a row's maximum and sum are read
    before it is overwritten; no second 16 MB block per block; the cache tests compare it with eager attention).
    Elsewhere it makes a fresh tensor: that aliasing is not relied on where no test runs it."""
    per_sample = positions if positions.dim() == 2 else positions.expand(scores.shape[0], -1)
    first, keys = int(per_sample.min()), scores.shape[-1]
    if keys > first + 1:
        hidden = torch.arange(first + 1, keys, device=scores.device) > per_sample[:, None, :, None]
        scores[..., first + 1 :].masked_fill_(hidden, float("-inf"))
    if scores.device.type == "cpu":
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.softmax(scores, dim=-1)


def attention_rows(query: Tensor, key: Tensor, scale: float, positions: Tensor) -> Tensor:
    """softmax(q kᵀ · scale) of the query rows at `positions` under the causal mask → [B, H, R, K] fp32
    (`attention_scores`, then `causal_softmax_`). Scores and softmax are fp32 whatever the model's dtype."""
    return causal_softmax_(attention_scores(query, key, scale, positions), positions)
