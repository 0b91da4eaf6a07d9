"""Which query rows of a sample the cache stores attention targets for (`cache.attn_row_fraction`).

R = round(f · T) rows per sample, stratified: the positions 0..T−1 are cut into R consecutive strata
(⌊k T / R⌋ … ⌊(k + 1) T / R⌋ − 1) and one row is drawn uniformly inside each, from a generator seeded by the sample
id alone — so the rows are the same whatever the world size, the shard size or a resume, early and late rows are
both represented, and every row is stored with probability R / T when R divides T (each stratum the same size): the
mean of a per-row loss over the stored rows is then an unbiased estimate of its mean over all rows. f = 1 stores
every row.
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


def stored_rows(sample_ids: Tensor, seq_len: int, fraction: float) -> Tensor:
    """Sorted, distinct query positions [B, R] int64 of the samples `sample_ids` [B] (all rows when f = 1)."""
    count = stored_row_count(seq_len, fraction)
    if count == seq_len:
        return torch.arange(seq_len).expand(len(sample_ids), seq_len).clone()
    bounds = torch.tensor([stratum * seq_len // count for stratum in range(count + 1)])
    starts, sizes = bounds[:-1], bounds[1:] - bounds[:-1]
    draws = torch.stack([torch.rand(count, generator=_generator(int(sample))) for sample in sample_ids.tolist()])
    return starts + (draws * sizes).long().clamp_max(sizes - 1)
