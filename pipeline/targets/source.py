"""Where a run's teacher targets come from: a cache written by `distill cache` (`CachedTargets`) or the teacher run
live (`LiveTargets`). Built once per run; the trainer, the student's carve and the tracker ask it for batches, the
fingerprint, the α statistics and the selective heads, and never branch on the mode themselves.

Both serve the same batches in the same order: the live source reads the prepared split in the order a cache of it
would be read (the same `SampleOrder` over the shards the cache would have, the same partition over ranks), and
computes the targets with the cache writer's own function (`compute.compute_targets`) in fp32 — so the two modes
differ only by the cache's fp16/bf16 rounding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.targets.compute import compute_targets
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.logits import response_masks
from pipeline.targets.manifest import Manifest
from pipeline.targets.needs import TargetNeeds
from pipeline.targets.order import SampleOrder, micro_step_start, virtual_shard_sizes
from pipeline.targets.store import open_cache
from pipeline.targets.stream import TargetStream, training_batch


class TargetSource(ABC):
    """A run's targets: what they are (`fingerprint`), what the teacher chose for them, and the batches."""

    fingerprint: dict[str, Any]
    needs: TargetNeeds

    @property
    def alpha_stats(self) -> dict[str, dict[str, Any]]:
        """`L<layer>.H<heads>.<squeeze>` → summary of the squeeze weights α (empty when none were measured)."""
        return {}

    @property
    def selected_heads(self) -> dict[str, list[int]]:
        """`L<layer>.H<heads>` → the teacher heads behind the `selective` targets (empty when none)."""
        return {}

    @property
    def manifest_path(self) -> Path | None:
        """The cache manifest behind the targets (logged with the run), or None."""
        return None

    @abstractmethod
    def batches(self, *, batch_size: int, seed: int, start_position: int, rank: int, world_size: int) -> Iterator:
        """This rank's micro-batches from global position `start_position` on, endlessly over epochs."""


class CachedTargets(TargetSource):
    """The targets of a cache directory, opened and checked against the run once (`store.open_cache`): against
    `required` (everything the run is evaluated with), reading only `reads` (what training uses; default all)."""

    def __init__(
        self,
        directory: Path,
        provenance: dict[str, Any],
        required: TargetNeeds,
        reads: TargetNeeds | None = None,
        *,
        num_workers: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.needs = reads or required
        self.manifest: Manifest = open_cache(self.directory, provenance, required)
        self.fingerprint = self.manifest.fingerprint
        self.num_workers = num_workers

    @property
    def alpha_stats(self) -> dict[str, dict[str, Any]]:
        return self.manifest.alpha_stats

    @property
    def selected_heads(self) -> dict[str, list[int]]:
        return self.manifest.selected_heads

    @property
    def manifest_path(self) -> Path | None:
        return self.directory / "manifest.json"

    def stream(self, **options: Any) -> TargetStream:
        """A `TargetStream` over this cache (no second open or check)."""
        return TargetStream(directory=self.directory, needs=self.needs, manifest=self.manifest, **options)

    def batches(self, *, batch_size: int, seed: int, start_position: int, rank: int, world_size: int) -> Iterator:
        stream = self.stream(
            batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, start_position=start_position
        )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
        return iter(loader)


class LiveTargets(TargetSource):
    """Targets computed by the teacher during training, batch by batch, in the order a cache would serve them.

    `rows`: the prepared train split (the rows `distill cache` would cache) in torch format (`sample_id`,
    `input_ids`); `settings`: exactly what the run needs (its kinds, layers and head count, fp32, no rounding);
    `fingerprint`: the one a cache of these targets would have; `shard_size`: the cache's, for the order.
    """

    def __init__(
        self,
        teacher: nn.Module,
        rows: Any,
        settings: TargetSettings,
        needs: TargetNeeds,
        fingerprint: dict[str, Any],
        *,
        shard_size: int,
    ) -> None:
        self.teacher = teacher
        self.rows = rows
        self.settings = settings
        self.needs = needs
        self.fingerprint = fingerprint
        self.shard_size = shard_size

    @property
    def selected_heads(self) -> dict[str, list[int]]:
        return dict(self.settings.selected_heads or {})

    def batch_at(self, order: SampleOrder, first: int, batch_size: int) -> dict[str, Any]:
        """The micro-batch of global positions [first, first + batch_size)."""
        positions = torch.arange(first, first + batch_size)
        located = [order.locate(position) for position in positions.tolist()]
        chunk = self.rows[[shard * self.shard_size + row for shard, row in located]]
        input_ids = torch.as_tensor(chunk["input_ids"], dtype=torch.long)
        sample_ids = torch.as_tensor(chunk["sample_id"])
        responses = response_masks(chunk, self.fingerprint, "the online teacher's rows")
        responses = None if responses is None else torch.as_tensor(responses)
        targets = compute_targets(self.teacher, input_ids, sample_ids, self.settings, responses)
        raw = {**targets, "sample_ids": sample_ids, "input_ids": input_ids}
        return training_batch(raw, positions, self.needs, self.fingerprint)

    def batches(self, *, batch_size: int, seed: int, start_position: int, rank: int, world_size: int) -> Iterator:
        order = SampleOrder(virtual_shard_sizes(len(self.rows), self.shard_size), seed, shuffle=True)
        for step in count():
            yield self.batch_at(order, micro_step_start(start_position, step, rank, world_size, batch_size), batch_size)
