"""The start of every run, done once: what `train`, `eval` and `cache` read and check before any model exists.

`open_run` resolves the student (its shape from `student.init`, the layer map of an importance carve), reads the
teacher's config, the prepared data's meta and the teacher's weights digest, refuses a `data.seq_len` longer than the
teacher's positions, and computes what the run needs of its targets from its loss terms (`run_needs`). The context
then builds the run's target source — the one place that decides between a cache and the live teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from torch import nn
from transformers import PretrainedConfig

from pipeline.config import Config
from pipeline.config.validation import validate_for_data
from pipeline.data.prepare import data_format, load_prepared
from pipeline.errors import PipelineError
from pipeline.infra import dist
from pipeline.infra.runtime import default_device, resolve_dtype
from pipeline.models.capture import AttentionDims, attention_dims
from pipeline.models.loading import check_seq_len, load_teacher, load_teacher_config
from pipeline.objective.loss import Objective, evaluation_objective, matched_layers
from pipeline.students import resolve
from pipeline.targets import kinds
from pipeline.targets.compute import prepare_kinds
from pipeline.targets.fingerprint import cache_fingerprint, provenance, teacher_weights_digest
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.needs import TargetNeeds
from pipeline.targets.source import CachedTargets, LiveTargets, TargetSource


class RunError(PipelineError):
    """A run cannot start as configured; the message names the key, file or field."""


@dataclass
class RunContext:
    """What a run reads before any model exists, read and checked once."""

    config: Config
    """Resolved: every student shape key set, an importance carve's layer map explicit."""
    teacher_config: PretrainedConfig
    dims: AttentionDims
    splits: DatasetDict
    meta: dict[str, Any]
    teacher_sha: str
    teacher_layers: list[int]
    """The teacher layer each student layer is matched to."""
    evaluation: Objective
    """Every term a run is evaluated with (a superset of training's terms)."""

    @property
    def needs(self) -> TargetNeeds:
        """What the run needs of its targets (`evaluation.needs()`): what a cache must hold."""
        return self.evaluation.needs()

    @property
    def teacher_dir(self) -> Path:
        return Path(self.config.teacher.path)

    def provenance(self, split: str) -> dict[str, Any]:
        """The fingerprint fields a cache of `split` must carry for this run."""
        return provenance(self.meta, split, self.teacher_sha)

    @property
    def train_samples(self) -> int:
        """The samples a training epoch reads: the prepared train split, cut at `cache.max_samples`."""
        max_samples = self.config.cache.max_samples
        return len(self.splits["train"]) if max_samples is None else min(len(self.splits["train"]), max_samples)

    @property
    def sample_columns(self) -> list[str]:
        """The prepared columns the teacher's targets are computed from: ids and tokens, and chat data's response
        mask (where the losses are)."""
        chat = data_format(self.meta) != "text"
        return ["sample_id", "input_ids", *(["response_mask"] if chat else [])]

    def cache_directory(self, split: str) -> Path:
        return Path(self.config.cache.output_dir) / split

    def check_targets(self, fingerprint: dict[str, Any]) -> None:
        """Refuse targets a term cannot use beyond their content (e.g. top-m rows with an MSE loss)."""
        problem = self.evaluation.cache_problem(fingerprint)
        if problem is not None:
            raise RunError(problem)

    def cached(self, split: str, reads: TargetNeeds | None = None) -> CachedTargets:
        """The cache of `split`, opened and checked against everything the run is evaluated with, once; its batches
        read only `reads` (default: all of that)."""
        source = CachedTargets(
            self.cache_directory(split),
            self.provenance(split),
            self.needs,
            reads,
            num_workers=self.config.train.num_workers,
        )
        self.check_targets(source.fingerprint)
        return source

    def target_source(self, needs: TargetNeeds) -> TargetSource:
        """The train split's targets as `train.mode` says: the cache (checked against everything the run is
        evaluated with, read for `needs`), or the teacher live (loaded here in `teacher.dtype`: before any
        DeepSpeed engine exists, so no ZeRO-3 machinery can partition it). The one place that decides."""
        validate_for_data(self.config, train_samples=self.train_samples, world_size=dist.world_size())
        if self.config.train.mode == "cached":
            return self.cached("train", needs)
        device = default_device()
        teacher = load_teacher(self.teacher_dir, dtype=resolve_dtype(self.config.teacher.dtype, device), device=device)
        return self.live_source(teacher, needs)

    def live_source(self, teacher: nn.Module, needs: TargetNeeds) -> LiveTargets:
        """`teacher` computing exactly `needs` (the training objective's) batch by batch, on the rows `distill
        cache` would cache, in the order it would serve them."""
        rows = self.splits["train"]
        if len(rows) > self.train_samples:
            rows = rows.select(range(self.train_samples))
        settings, _ = prepare_kinds(
            teacher, self.splits["train"], self.live_settings(needs), self.config.cache.batch_size
        )
        fingerprint = cache_fingerprint(
            settings,
            self.provenance("train"),
            teacher_num_heads=self.dims.num_heads,
            vocab_size=self.teacher_config.vocab_size,
            dtype=self.config.cache.dtype,
        )
        self.check_targets(fingerprint)
        return LiveTargets(
            teacher,
            rows.with_format("torch", columns=self.sample_columns),
            settings,
            needs,
            fingerprint,
            shard_size=self.config.cache.shard_size,
        )

    def live_settings(self, needs: TargetNeeds) -> TargetSettings:
        """What the live teacher computes for `needs`: their kinds and layers for the student's head count, with the
        tail sums of the temperatures they read, at the rows the cache would store (`cache.attn_row_fraction`), in
        fp32 (nothing stored, nothing rounded)."""
        named = {kinds.get(need.kind).variant_key: need.variant for need in needs.maps}
        cache = self.config.cache
        return TargetSettings(
            layers=needs.layers() or tuple(sorted(set(self.teacher_layers))),
            head_counts=(self.config.student.num_heads,),
            kinds=needs.kinds(),
            encoding=cache.encoding,
            attn_top_m=cache.attn_top_m,
            top_k=needs.top_k,
            temperatures=needs.temperatures(),
            dtype=torch.float32,
            variants=kinds.variants_of(needs.kinds(), named.get),
            row_fraction=cache.attn_row_fraction,
        )


def open_run(config: Config) -> RunContext:
    """Resolve the student and read the run's inputs; errors name the key, file or field."""
    config = resolve(config)
    teacher_config = load_teacher_config(Path(config.teacher.path))
    dims = attention_dims(teacher_config)
    splits, meta = load_prepared(Path(config.data.output_dir))
    check_seq_len(teacher_config, meta["seq_len"])
    teacher_sha = teacher_weights_digest(Path(config.teacher.path))
    layers = matched_layers(config, dims.num_layers)
    return RunContext(
        config, teacher_config, dims, splits, meta, teacher_sha, layers, evaluation_objective(config, layers)
    )
