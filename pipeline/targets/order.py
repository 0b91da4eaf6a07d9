"""The global order in which a cache (or the online source, over the shards a cache would have) is read.

Global order. The cache is read as one endless sequence of positions: position p is sample offset p % N of epoch
p // N (N = samples in the cache). Within epoch e the shards come in the order `randperm(num_shards)` of a generator
seeded from ("shards", seed, e), and the rows of shard j in the order `randperm(n_j)` of a generator seeded from
("rows", seed, e, j); an epoch is the concatenation of its shards' rows. Seeds are the first 8 bytes of the sha256 of
those values joined by ":" (top bit cleared), so nearby seeds and epochs give unrelated orders. `shuffle=False` reads
shards and rows in file order.

Partition. Micro-step k of a stream that starts at position s covers positions [s + k·W·B, s + (k+1)·W·B) for W ranks
and micro-batch B; rank r takes the contiguous block [s + k·W·B + r·B, s + k·W·B + (r+1)·B), and DataLoader worker w of
K takes the rank's micro-steps k ≡ w (mod K). Every sample is thus served once per epoch across any number of ranks
and workers, and a job that consumed p samples resumes from `start_position=p` with any world size or batch size.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from functools import lru_cache

import torch


def _seeded_generator(*parts: int | str) -> torch.Generator:
    """A generator seeded by hashing `parts`: unlike seed + epoch, (seed 1, epoch 0) and (seed 0, epoch 1) differ."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@lru_cache(maxsize=64)
def _row_order(seed: int, epoch: int, shard: int, num_rows: int, shuffle: bool) -> tuple[int, ...]:
    if not shuffle:
        return tuple(range(num_rows))
    return tuple(torch.randperm(num_rows, generator=_seeded_generator("rows", seed, epoch, shard)).tolist())


class SampleOrder:
    """Maps a global position to (shard index, row in shard); see the module docstring for the rule."""

    def __init__(self, shard_sizes: list[int], seed: int, shuffle: bool) -> None:
        self.shard_sizes = shard_sizes
        self.seed = seed
        self.shuffle = shuffle
        self.samples_per_epoch = sum(shard_sizes)
        self._epochs: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()

    def shard_order(self, epoch: int) -> list[int]:
        """Shard indices in the order epoch `epoch` reads them."""
        if not self.shuffle:
            return list(range(len(self.shard_sizes)))
        generator = _seeded_generator("shards", self.seed, epoch)
        return torch.randperm(len(self.shard_sizes), generator=generator).tolist()

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, offset of each of those shards within the epoch); the last two epochs are kept."""
        if epoch not in self._epochs:
            order = self.shard_order(epoch)
            starts = [0]
            for shard in order[:-1]:
                starts.append(starts[-1] + self.shard_sizes[shard])
            self._epochs[epoch] = (order, starts)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, row within that shard) of global position `position`."""
        epoch, offset = divmod(position, self.samples_per_epoch)
        order, starts = self._epoch(epoch)
        index = bisect.bisect_right(starts, offset) - 1
        shard = order[index]
        rows = _row_order(self.seed, epoch, shard, self.shard_sizes[shard], self.shuffle)
        return shard, rows[offset - starts[index]]


def micro_step_start(start_position: int, step: int, rank: int, world_size: int, batch_size: int) -> int:
    """First global position of micro-step `step` of rank `rank`: every rank takes a contiguous block of
    `batch_size` positions of each W·B-wide step (see the module docstring)."""
    return start_position + (step * world_size + rank) * batch_size


def virtual_shard_sizes(num_samples: int, shard_size: int) -> list[int]:
    """Shard sizes a cache of `num_samples` rows would have: full shards, then the remainder (the online source
    reads the prepared split in the order such a cache would be read)."""
    return [min(shard_size, num_samples - first) for first in range(0, num_samples, shard_size)]
