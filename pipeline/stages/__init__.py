"""Stage drivers: each wires library pieces together for one `distill` command and knows nothing else.

Every driver takes the validated `Config`, skips work whose output is already complete and valid, and logs what it
does. Multi-process stages are started by the DeepSpeed launcher; the driver only asks `infra.dist` for its rank.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.infra import dist
from pipeline.infra.atomic import staged_directory

logger = logging.getLogger(__name__)

TINY_TEACHERS = {"tiny-random-llama": "llama", "tiny-random-gpt2": "gpt2"}
"""Teacher sources generated on the spot: 4 layers, 6 heads (LLaMA: 2 KV heads), width 96, for tests and CI."""


def teacher_stage(config: Config, *, overwrite: bool = False) -> Path:
    """`distill teacher import`: make `teacher.path` a plain HF directory of the configured teacher; a directory
    holding another teacher is replaced only with `overwrite`, one that holds no teacher never."""
    output = Path(config.teacher.path)
    family = TINY_TEACHERS.get(config.teacher.source)
    if family is None:
        from pipeline.models.teacher_import import import_teacher

        return import_teacher(config.teacher.source, output, overwrite=overwrite)
    from pipeline.models.loading import TeacherConfigError, write_tiny_teacher

    if (output / "config.json").is_file():
        found = _model_type(output / "config.json")
        if found == family:
            logger.info("%s: tiny %s teacher already there", output, family)
            return output
        if not overwrite:
            raise TeacherConfigError(
                f"teacher.path {str(output)!r} holds a {found!r} teacher, teacher.source is "
                f"{config.teacher.source!r} ({family}); pass --overwrite to replace it, or choose another teacher.path"
            )
    elif output.is_dir() and any(output.iterdir()):
        raise TeacherConfigError(
            f"teacher.path {str(output)!r} is not empty and holds no config.json: it is no teacher; remove it or "
            "choose another teacher.path"
        )

    with staged_directory(output) as staging:
        write_tiny_teacher(
            staging, family, num_layers=4, hidden_size=96, num_heads=6, num_kv_heads=2 if family == "llama" else 6
        )
    logger.info("%s: wrote a tiny random %s teacher", output, family)
    return output


def _model_type(config_file: Path) -> str | None:
    """`model_type` of an HF config.json, None where it is unreadable."""
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return values.get("model_type") if isinstance(values, dict) else None


def prepare_stage(config: Config, *, overwrite: bool = False) -> dict[str, Any]:
    """`distill prepare`: tokenize and pack the corpus with the teacher's tokenizer; refuses a `data.seq_len` longer
    than the teacher's positions, and output prepared from other inputs unless `overwrite`."""
    from pipeline.data.prepare import fetch_shakespeare, prepare_dataset
    from pipeline.models.loading import check_seq_len, load_teacher_config

    check_seq_len(load_teacher_config(config.teacher.path), config.data.seq_len)
    sources = []
    for source in config.data.sources:
        if source == "shakespeare":
            sources.append(str(fetch_shakespeare(Path(config.data.output_dir).parent / "shakespeare")))
        else:
            sources.append(source)
    return prepare_dataset(
        sources,
        Path(config.teacher.path),
        Path(config.data.output_dir),
        seq_len=config.data.seq_len,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        num_proc=config.data.num_proc,
        seed=config.data.seed,
        text_field=config.data.text_field,
        overwrite=overwrite,
    )


def cache_stage(config: Config, *, overwrite: bool = False) -> None:
    """`distill cache`: one teacher pass → every target map kind of `cache.attn_targets` for every head count, plus
    sparse logits with their tail sums per temperature. A split cached from other inputs, or with another
    `cache.max_samples` or `cache.shard_size`, is refused unless `overwrite`, which rebuilds it beside the old one
    and swaps it in once complete."""
    import torch

    from pipeline.data.prepare import load_prepared
    from pipeline.infra.runtime import default_device, resolve_dtype
    from pipeline.models.capture import attention_dims
    from pipeline.models.loading import check_seq_len, load_teacher
    from pipeline.students import resolve
    from pipeline.targets.fingerprint import cache_fingerprint, cached_layers
    from pipeline.targets.writer import (
        SELECTION_SAMPLES,
        TargetSettings,
        select_teacher_heads,
        weights_sha256,
        write_cache_split,
    )

    dist.init_cpu_group()
    config = resolve(config)  # the student's head count and layer map decide what is cached
    device = default_device()
    teacher_dir = Path(config.teacher.path)
    teacher = load_teacher(teacher_dir, dtype=resolve_dtype(config.teacher.dtype, device), device=device)
    dims = attention_dims(teacher.config)
    layers = cached_layers(config, dims.num_layers)
    splits, meta = load_prepared(Path(config.data.output_dir))
    check_seq_len(teacher.config, meta["seq_len"])
    teacher_sha = weights_sha256(teacher_dir)
    fingerprints = {
        split: cache_fingerprint(config, meta, split, teacher_sha, dims, teacher.config.vocab_size, layers)
        for split in splits
    }
    selected, importance = None, None
    if "selective" in config.cache_attn_targets():
        calibration = splits["train"].with_format("torch", columns=["input_ids"])[:SELECTION_SAMPLES]["input_ids"]
        selected, importance = select_teacher_heads(
            teacher, calibration.long(), tuple(layers), tuple(config.cache_head_counts())
        )
        logger.info("selective targets: teacher heads %s (by mean output share)", selected)
    settings = TargetSettings.from_fingerprint(
        fingerprints["train"], getattr(torch, config.cache.dtype), selected_heads=selected
    )
    logger.info(
        "caching teacher layers %s for student head counts %s (%d teacher heads): %s targets, %s encoding, "
        "tail sums at τ %s",
        layers,
        list(settings.head_counts),
        dims.num_heads,
        ", ".join(settings.kinds),
        settings.encoding,
        list(settings.temperatures),
    )
    for split, rows in splits.items():
        if config.cache.max_samples is not None and len(rows) > config.cache.max_samples:
            logger.info("%s: caching the first %d of %d samples", split, config.cache.max_samples, len(rows))
            rows = rows.select(range(config.cache.max_samples))
        write_cache_split(
            teacher,
            rows.with_format("torch", columns=["sample_id", "input_ids"]),
            Path(config.cache.output_dir) / split,
            settings,
            fingerprints[split],
            shard_size=config.cache.shard_size,
            batch_size=config.cache.batch_size,
            head_importance=importance,
            overwrite=overwrite,
        )


def verify_stage(directory: Path) -> None:
    """`distill cache verify DIR`: every checksum, shape and value of a cache split, and no file its manifest does
    not list (or the same for each split below DIR; hidden directories there are an unfinished `--overwrite`)."""
    from pipeline.targets.reader import verify_cache

    in_splits = sorted(
        manifest.parent for manifest in directory.glob("*/manifest.json") if not manifest.parent.name.startswith(".")
    )
    splits = [directory] if (directory / "manifest.json").is_file() or not in_splits else in_splits
    for split_dir in splits:
        manifest = verify_cache(split_dir)
        logger.info("%s: OK — %d shards, %d samples", split_dir, len(manifest.shards), manifest.num_samples)


def train_stage(config: Config, *, overwrite: bool = False) -> dict[str, float]:
    """`distill train`: the DeepSpeed student loop (resumes from `train.output_dir` per `train.resume`), then the
    exported student in `train.output_dir/student`. `overwrite` lets `train.resume: never` replace a run already in
    `train.output_dir`. Returns the final global metrics."""
    from pipeline.training.trainer import train

    return train(config, overwrite=overwrite)


def eval_stage(
    config: Config, model_dir: Path | None = None, checkpoint: Path | None = None, split: str = "validation"
) -> dict[str, float]:
    """`distill eval`: a trained student (exported, another HF directory, or a checkpoint) on the whole cached
    validation (or held-out test) split."""
    from pipeline.training.evaluate import evaluate_stage

    return evaluate_stage(config, model_dir=model_dir, checkpoint=checkpoint, split=split)


def compare_stage(config: Config, report_dir: Path) -> str:
    """`distill compare` for the config's experiment: tables and plots under `report_dir/<experiment>/`."""
    from pipeline.reports.compare import compare_runs, resolve_target

    uri, experiment = resolve_target(config, None, None)
    return compare_runs(uri, experiment, output=report_dir).markdown


def run_stage(config: Config, *, overwrite: bool = False) -> None:
    """`distill run`: every stage in order, each skipped when its output is already complete; with `run.variants`,
    one student per variant on the same prepared data (and the same cache where the variants share it), then a
    comparison of their runs. `overwrite` is handed to every stage. Prints where the time went."""
    timings: list[tuple[str, float]] = []

    def timed(label: str, stage: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = stage()
        timings.append((label, time.perf_counter() - start))
        return result

    timed("teacher import", lambda: teacher_stage(config, overwrite=overwrite))
    timed("prepare", lambda: prepare_stage(config, overwrite=overwrite))
    variants = {name: config.variant(name) for name in config.run.variants} or {"": config}
    trained = False
    for name, variant in variants.items():
        suffix = f" [{name}]" if name else ""
        if name:
            logger.info("variant %s: %s", name, " ".join(config.run.variants[name]) or "(the base config)")
        timed(f"cache{suffix}", lambda variant=variant: cache_stage(variant, overwrite=overwrite))
        trained |= bool(timed(f"train{suffix}", lambda variant=variant: train_stage(variant, overwrite=overwrite)))
    report = Path(config.run.report_dir) / config.mlflow.experiment
    if dist.is_main() and config.mlflow.enabled and len(variants) > 1 and (trained or not report.is_dir()):
        print(timed("compare", lambda: compare_stage(config, Path(config.run.report_dir))), end="")
    dist.shutdown()
    if dist.is_main():
        total = sum(seconds for _, seconds in timings)
        print("\nwhere the time went:")
        for label, seconds in timings:
            print(f"  {label:32s} {seconds:8.1f} s  {100 * seconds / max(total, 1e-9):5.1f} %")
        print(f"  {'total':32s} {total:8.1f} s")
