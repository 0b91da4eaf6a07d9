"""Online mode: the teacher run live during training, giving the batches `TargetStream` would read from a cache.

The cache of the prepared split would hold row i in shard i // shard_size; the same `SampleOrder` over those virtual
shards, and the same partition of positions over ranks and micro-steps, gives every rank the very samples it would
read from the cache. Targets come from `writer.compute_targets`, the cache writer's own function, so online and
cached training differ only by the cache's fp16/bf16 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.targets.layout import TargetRequest
from pipeline.targets.reader import SampleOrder, training_batch

if TYPE_CHECKING:
    from pipeline.targets.writer import TargetSettings


def virtual_shard_sizes(num_samples: int, shard_size: int) -> list[int]:
    """Shard sizes the cache would have for `num_samples` rows: full shards, then the remainder."""
    return [min(shard_size, num_samples - first) for first in range(0, num_samples, shard_size)]


class OnlineTargets:
    """Micro-batches with targets from the live teacher, in exactly the order `TargetStream` reads a cache.

    `rows`: the prepared train split in torch format (`sample_id`, `input_ids`), as `distill cache` would read it.

    The cache of the prepared split would hold row i in shard i // shard_size, so the same `SampleOrder` over those
    virtual shards, and the same partition of positions over ranks, gives every rank the samples it would read from
    the cache. Targets come from `writer.compute_targets` (the cache writer's own function) in fp32 — nothing is
    stored, so nothing is rounded — and are converted by `reader.training_batch`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        rows: Any,
        settings: TargetSettings,
        request: TargetRequest,
        *,
        batch_size: int,
        shard_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
    ) -> None:
        self.teacher = teacher
        self.rows = rows
        self.settings = settings
        self.request = request
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.rank = rank
        self.world_size = world_size
        self.start_position = start_position
        self.order = SampleOrder(virtual_shard_sizes(len(rows), shard_size), seed, shuffle=True)

    def batch_at(self, first: int) -> dict[str, Any]:
        """The micro-batch of positions [first, first + batch_size)."""
        from pipeline.targets.writer import compute_targets

        positions = torch.arange(first, first + self.batch_size)
        located = [self.order.locate(position) for position in positions.tolist()]
        chunk = self.rows[[shard * self.shard_size + row for shard, row in located]]
        input_ids = torch.as_tensor(chunk["input_ids"], dtype=torch.long)
        targets = compute_targets(self.teacher, input_ids, self.settings)
        raw = {**targets, "sample_ids": torch.as_tensor(chunk["sample_id"]), "input_ids": input_ids}
        return training_batch(raw, positions, self.request, self.settings.encoding)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step in count():
            yield self.batch_at(self.start_position + (step * self.world_size + self.rank) * self.batch_size)


def online_settings(
    config: Config, teacher_layers: list[int], request: TargetRequest, teacher: nn.Module, train_rows: Any
) -> TargetSettings:
    """What the live teacher computes for `request`: only the target kinds the run's terms read, for the student's
    head count, with the tail sums of the temperatures they use; `selective` heads are chosen as `distill cache`
    chooses them (on the first train samples), so online and cached selective targets agree."""
    from pipeline.targets.writer import SELECTION_SAMPLES, TargetSettings, select_teacher_heads

    kinds = sorted({config.attention_kind(), *(["relations"] if config.distill.w_rel > 0 else [])})
    layers = tuple(sorted(set(teacher_layers)))
    heads = (config.student.num_heads,)
    selected = None
    if "selective" in kinds:
        calibration = train_rows.with_format("torch", columns=["input_ids"])[:SELECTION_SAMPLES]["input_ids"]
        selected, _ = select_teacher_heads(teacher, calibration.long(), layers, heads)
    temperatures = sorted({1.0, request.kd_temperature, *(temperature for _, temperature in request.maps)})
    return TargetSettings(
        layers=layers,
        head_counts=heads,
        kinds=tuple(kinds),
        encoding=config.cache.encoding,
        attn_top_m=config.cache.attn_top_m,
        top_k=config.distill.top_k,
        temperatures=tuple(temperatures),
        dtype=torch.float32,
        rel_heads=config.distill.rel_heads if "relations" in kinds else None,
        selected_heads=selected,
    )
