"""Which query rows of a sample the cache stores attention targets for (`cache.attn_row_fraction`).

R = round(f · T) rows per sample, stratified: the positions 0..T−1 are cut into R consecutive strata
(⌊k T / R⌋ … ⌊(k + 1) T / R⌋ − 1) and one row is drawn uniformly inside each, from a generator seeded by the sample
id alone — so the rows are the same whatever the world size, the shard size or a resume, early and late rows are
both represented, and every row is stored with probability R / T when R divides T (each stratum the same size): the
mean of a per-row loss over the stored rows is then an unbiased estimate of its mean over all rows. f = 1 stores
every row.

Chat data (`loss_mask`: only the rows predicting a response token carry a loss) draws the R rows among those rows: the
strata cut the sample's n trained positions instead of 0..T−1, so every stored row is a trained one. A sample with
n < R trained rows stores all of them and fills the rest with its first untrained rows (which the terms give weight
0), so every sample keeps R sorted, distinct rows. Within a sample the stored rows are an unbiased sample of its
trained rows (each kept with probability R / n when R divides n), but a sample contributes at most R rows: averaged
over a batch, samples with long replies weigh less than at f = 1 (per-row weights n / R would undo that; not done).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

ROWS_TENSOR = "attn_rows"
"""The stored query rows of every sample, ⌈log2 T⌉ bits each, packed (only in caches with f < 1)."""


def stores_rows(fraction: float, kinds: tuple[str, ...] | list[str]) -> bool:
    """Whether a cache stores `ROWS_TENSOR`: it has attention targets and keeps a fraction of their rows."""
    return fraction < 1 and bool(kinds)


def stored_row_count(seq_len: int, fraction: float) -> int:
    """R: the rows stored per sample (at least 1)."""
    return max(1, min(seq_len, round(fraction * seq_len)))


def _generator(sample_id: int) -> torch.Generator:
    digest = hashlib.sha256(f"rows:{sample_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _stratified(size: int, count: int, draws: Tensor) -> Tensor:
    """One index in each of `count` consecutive strata of 0..size−1 (size ≥ count), at the uniform `draws` [count]."""
    bounds = torch.tensor([stratum * size // count for stratum in range(count + 1)])
    starts, sizes = bounds[:-1], bounds[1:] - bounds[:-1]
    return starts + (draws * sizes).long().clamp_max(sizes - 1)


def _trained_rows(trained: Tensor, count: int, draws: Tensor) -> Tensor:
    """`count` sorted, distinct rows of one sample drawn among its `trained` [T] positions (see the module doc)."""
    positions = trained.nonzero().flatten()
    if len(positions) >= count:
        return positions[_stratified(len(positions), count, draws)]
    filler = (~trained).nonzero().flatten()[: count - len(positions)]
    return torch.cat([positions, filler]).sort().values


def stored_rows(sample_ids: Tensor, seq_len: int, fraction: float, loss_mask: Tensor | None = None) -> Tensor:
    """Sorted, distinct query positions [B, R] int64 of the samples `sample_ids` [B] (all rows when f = 1), drawn
    among the positions `loss_mask` [B, T] marks as trained where it is given."""
    count = stored_row_count(seq_len, fraction)
    if count == seq_len:
        return torch.arange(seq_len).expand(len(sample_ids), seq_len).clone()
    draws = torch.stack([torch.rand(count, generator=_generator(int(sample))) for sample in sample_ids.tolist()])
    if loss_mask is None:
        return _stratified(seq_len, count, draws)
    trained = loss_mask.bool().cpu()
    return torch.stack([_trained_rows(trained[row], count, draws[row]) for row in range(len(sample_ids))])
