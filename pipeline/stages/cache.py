"""`distill cache`: one teacher pass → every target kind of `cache.attn_targets` for every head count, plus sparse
logits with their tail sums per temperature; `distill cache verify DIR` checks a cache in full."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.infra import dist
from pipeline.infra.runtime import default_device, resolve_dtype
from pipeline.models.loading import load_teacher
from pipeline.stages.context import RunContext, open_run
from pipeline.targets import kinds as target_kinds
from pipeline.targets.compute import prepare_kinds
from pipeline.targets.fingerprint import cache_fingerprint
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.manifest import MANIFEST_NAME, CacheError
from pipeline.targets.store import verify_cache
from pipeline.targets.writer import write_cache_split

logger = logging.getLogger(__name__)


def cache_settings(context: RunContext) -> TargetSettings:
    """What the cache holds: `cache.attn_targets`, `cache.layers` and `cache.head_counts`, each defaulting to what
    the run's own terms need (its target kinds, its matched layers, its head count); tail sums at τ = 1 and every
    τ of `cache.temperatures`; the logits' top k of `distill.kd.top_k`."""
    config, needs = context.config, context.needs
    cache = config.cache
    kinds = tuple(sorted(cache.attn_targets)) or needs.kinds()
    if cache.layers:
        bad = [layer for layer in cache.layers if layer >= context.dims.num_layers]
        if bad:
            raise CacheError(
                f"cache.layers: layer {bad[0]} does not exist; the teacher has {context.dims.num_layers} layers "
                f"(0..{context.dims.num_layers - 1})"
            )
        layers = tuple(sorted(set(cache.layers)))
    else:
        layers = tuple(sorted(set(context.teacher_layers)))
    return TargetSettings(
        layers=layers,
        head_counts=tuple(sorted(cache.head_counts or [config.student.num_heads])),
        kinds=kinds,
        encoding=cache.encoding,
        attn_top_m=cache.attn_top_m,
        top_k=config.distill.kd.top_k,
        temperatures=tuple(sorted({1.0, *cache.temperatures})),
        dtype=getattr(torch, cache.dtype),
        variants=target_kinds.variants_of(kinds, config.value),
    )


def cache_stage(config: Config, *, overwrite: bool = False) -> None:
    """`distill cache`: the teacher's targets of every prepared split. A split cached from other inputs, or with
    another `cache.max_samples` or `cache.shard_size`, is refused unless `overwrite`, which rebuilds it beside the
    old one and swaps it in once complete."""
    dist.init_cpu_group()
    context = open_run(config)  # the student's head count, layer map and terms decide what is cached
    config = context.config
    device = default_device()
    teacher = load_teacher(context.teacher_dir, dtype=resolve_dtype(config.teacher.dtype, device), device=device)
    settings, records = prepare_kinds(teacher, context.splits["train"], cache_settings(context))
    if settings.selected_heads:
        logger.info("selective targets: teacher heads %s (by mean output share)", settings.selected_heads)
    logger.info(
        "caching teacher layers %s for student head counts %s (%d teacher heads): %s targets, %s encoding, "
        "tail sums at τ %s",
        list(settings.layers),
        list(settings.head_counts),
        context.dims.num_heads,
        ", ".join(settings.kinds),
        settings.encoding,
        list(settings.temperatures),
    )
    for split, rows in context.splits.items():
        if config.cache.max_samples is not None and len(rows) > config.cache.max_samples:
            logger.info("%s: caching the first %d of %d samples", split, config.cache.max_samples, len(rows))
            rows = rows.select(range(config.cache.max_samples))
        fingerprint = cache_fingerprint(
            settings,
            context.provenance(split),
            teacher_num_heads=context.dims.num_heads,
            vocab_size=teacher.config.vocab_size,
            dtype=config.cache.dtype,
        )
        write_cache_split(
            teacher,
            rows.with_format("torch", columns=["sample_id", "input_ids"]),
            context.cache_directory(split),
            settings,
            fingerprint,
            shard_size=config.cache.shard_size,
            batch_size=config.cache.batch_size,
            records=records,
            overwrite=overwrite,
        )


def verify_stage(directory: Path) -> None:
    """`distill cache verify DIR`: every checksum, shape and value of a cache split, and no file its manifest does
    not list (or the same for each split below DIR; hidden directories there are an unfinished `--overwrite`)."""
    in_splits = sorted(
        manifest.parent for manifest in directory.glob(f"*/{MANIFEST_NAME}") if not manifest.parent.name.startswith(".")
    )
    splits = [directory] if (directory / MANIFEST_NAME).is_file() or not in_splits else in_splits
    for split_dir in splits:
        manifest = verify_cache(split_dir)
        logger.info("%s: OK — %d shards, %d samples", split_dir, len(manifest.shards), manifest.num_samples)
