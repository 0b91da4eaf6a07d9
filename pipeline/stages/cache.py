"""`distill cache`: one teacher pass → every target kind of `cache.attn_targets` for every head count, plus sparse
logits with their tail sums per temperature; `distill cache verify DIR` checks a cache in full."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import PretrainedConfig

from pipeline.config import Config
from pipeline.data.prepare import data_format, load_prepared
from pipeline.errors import ConfigError, PipelineError
from pipeline.infra import dist
from pipeline.infra.locks import rank_zero_output_lock
from pipeline.infra.runtime import default_device, resolve_dtype
from pipeline.models.capture import attention_dims
from pipeline.models.loading import load_teacher, load_teacher_config
from pipeline.models.templates import TEACHER_TEMPLATES
from pipeline.objective.loss import evaluation_objective, matched_layers
from pipeline.stages.context import RunContext, open_run
from pipeline.students import resolve_student
from pipeline.targets import kinds as target_kinds
from pipeline.targets.compute import prepare_kinds
from pipeline.targets.fingerprint import cache_fingerprint, format_fields
from pipeline.targets.kinds.base import TargetSettings
from pipeline.targets.manifest import MANIFEST_NAME, CacheError
from pipeline.targets.plan import format_plan
from pipeline.targets.store import verify_cache
from pipeline.targets.writer import write_cache_split

logger = logging.getLogger(__name__)


def cache_settings(context: RunContext) -> TargetSettings:
    """What the cache holds: `cache.attn_targets`, `cache.layers` and `cache.head_counts`, each defaulting to what
    the run's own terms need (its target kinds, its matched layers, its head count); tail sums at τ = 1 and every
    τ of `cache.temperatures`; the logits' top k of `distill.kd.top_k`; the stored rows and value bits of
    `cache.attn_row_fraction`, `cache.attn_value_bits` and `cache.logit_value_bits`."""
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
        row_fraction=cache.attn_row_fraction,
        attn_value_bits=cache.attn_value_bits,
        logit_value_bits=cache.logit_value_bits,
    )


def cache_stage(config: Config, *, overwrite: bool = False) -> None:
    """`distill cache`: the teacher's targets of every prepared split. A split cached from other inputs, or with
    another `cache.max_samples` or `cache.shard_size`, is refused unless `overwrite`, which rebuilds it beside the
    old one and swaps it in once complete. Rank 0 locks `cache.output_dir` first: one writing job per cache."""
    dist.init_cpu_group()
    with rank_zero_output_lock(config.cache.output_dir, "cache.output_dir", "distill cache"):
        _cache(config, overwrite)


def _cache(config: Config, overwrite: bool) -> None:
    context = open_run(config)  # the student's head count, layer map and terms decide what is cached
    config = context.config
    device = default_device()
    teacher = load_teacher(context.teacher_dir, dtype=resolve_dtype(config.teacher.dtype, device), device=device)
    settings, records = prepare_kinds(
        teacher, context.splits["train"], cache_settings(context), config.cache.batch_size
    )
    if settings.selected_heads:
        logger.info("selective targets: teacher heads %s (by mean output share)", settings.selected_heads)
    logger.info(
        "caching teacher layers %s for student head counts %s (%d teacher heads): %s targets, %s encoding%s, "
        "tail sums at τ %s, %d-bit logits",
        list(settings.layers),
        list(settings.head_counts),
        context.dims.num_heads,
        ", ".join(settings.kinds),
        settings.encoding,
        _topk_form(settings),
        list(settings.temperatures),
        settings.logit_value_bits,
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
            rows.with_format("torch", columns=context.sample_columns),
            context.cache_directory(split),
            settings,
            fingerprint,
            shard_size=config.cache.shard_size,
            batch_size=config.cache.batch_size,
            records=records,
            overwrite=overwrite,
        )


def shape_context(config: Config, teacher_config: PretrainedConfig) -> RunContext:
    """The run context of `config` against a teacher's shape alone — no weights, no prepared data: enough for
    `cache_settings` (what the cache would hold), as `distill cache --plan` and the benchmarks need it."""
    config = resolve_student(config, teacher_config)
    dims = attention_dims(teacher_config)
    if config.student.init == "teacher" and config.student.carve.layers == "importance":
        if not config.cache.layers:
            raise ConfigError(
                "cache.layers: an importance carve picks its teacher layers on the teacher itself; set cache.layers "
                "to plan the cache without running it"
            )
        layers = sorted(config.cache.layers)[: config.student.num_layers]
    else:
        layers = matched_layers(config, dims.num_layers)
    return RunContext(config, teacher_config, dims, DatasetDict(), {}, "", layers, evaluation_objective(config, layers))


def plan_stage(config: Config, template: str | None = None) -> str:
    """`distill cache --plan`: the bytes per token of every tensor the cache would store, and each split's total,
    from the config and the teacher's shape alone (its config.json, or a `template` such as `llama3-8b`) — no
    teacher runs, nothing is written. Returns the table (also printed)."""
    teacher_config = TEACHER_TEMPLATES[template]() if template else load_teacher_config(config.teacher.path)
    context = shape_context(config, teacher_config)
    settings = cache_settings(context)
    dims, config = context.dims, context.config
    fingerprint = cache_fingerprint(
        settings,
        {"seq_len": config.data.seq_len, **format_fields(_planned_format(config))},
        teacher_num_heads=dims.num_heads,
        vocab_size=teacher_config.vocab_size,
        dtype=config.cache.dtype,
    )
    teacher = f"template {template}" if template else str(config.teacher.path)
    title = (
        f"cache plan: teacher {teacher} ({dims.num_layers} layers, {dims.num_heads} heads, vocab "
        f"{teacher_config.vocab_size}), T {config.data.seq_len}, layers {list(settings.layers)}, head counts "
        f"{list(settings.head_counts)}, {', '.join(settings.kinds) or 'no'} attention targets"
    )
    table = format_plan(fingerprint, _planned_samples(config), title)
    print(table)
    return table


def _planned_format(config: Config) -> str:
    """The data format the cache will read: the prepared data's (what `distill cache` goes by) where it is there,
    else `data.format`."""
    try:
        _, meta = load_prepared(config.data.output_dir)
    except (OSError, PipelineError):
        return config.data.format
    return data_format(meta)


def _planned_samples(config: Config) -> dict[str, int | None]:
    """Split → samples `distill cache` would cache (`cache.max_samples` applied), from the prepared data when it is
    there at the config's `data.seq_len`; train: None otherwise."""
    try:
        splits, meta = load_prepared(config.data.output_dir)
    except (OSError, PipelineError):
        return {"train": None}
    if meta["seq_len"] != config.data.seq_len:
        return {"train": None}
    limit = config.cache.max_samples
    return {split: len(rows) if limit is None else min(limit, len(rows)) for split, rows in splits.items()}


def _topk_form(settings: TargetSettings) -> str:
    """` (m 16, 25 % of the rows, 8-bit values)` for a top-m cache, nothing for a dense one."""
    if settings.encoding != "topk":
        return ""
    return f" (m {settings.attn_top_m}, {settings.row_fraction:.0%} of the rows, {settings.attn_value_bits}-bit values)"


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
