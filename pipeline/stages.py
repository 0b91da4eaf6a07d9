"""Stage drivers: each wires library pieces together for one `distill` command and knows nothing else.

Every driver takes the validated `Config`, skips work whose output is already complete and valid, and logs what it
does. Multi-process stages are started by the DeepSpeed launcher; the driver only asks `pipeline.dist` for its rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import dist
from pipeline.atomic import staged_directory
from pipeline.config import Config

logger = logging.getLogger(__name__)

TINY_TEACHERS = {"tiny-random-llama": "llama", "tiny-random-gpt2": "gpt2"}
"""Teacher sources generated on the spot: 4 layers, 6 heads (LLaMA: 2 KV heads), width 96, for tests and CI."""


def teacher_stage(config: Config) -> Path:
    """`distill teacher import`: make `teacher.path` a plain HF directory of the configured teacher."""
    output = Path(config.teacher.path)
    family = TINY_TEACHERS.get(config.teacher.source)
    if family is None:
        from pipeline.teacher_import import import_teacher

        return import_teacher(config.teacher.source, output)
    if (output / "config.json").is_file():
        logger.info("%s: tiny %s teacher already there", output, family)
        return output
    from pipeline.models import write_tiny_teacher

    with staged_directory(output) as staging:
        write_tiny_teacher(
            staging, family, num_layers=4, hidden_size=96, num_heads=6, num_kv_heads=2 if family == "llama" else 6
        )
    logger.info("%s: wrote a tiny random %s teacher", output, family)
    return output


def prepare_stage(config: Config) -> dict[str, Any]:
    """`distill prepare`: tokenize and pack the corpus with the teacher's tokenizer."""
    from pipeline.data import fetch_shakespeare, prepare_dataset

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
        num_proc=config.data.num_proc,
        seed=config.data.seed,
        text_field=config.data.text_field,
    )


def cache_stage(config: Config) -> None:
    """`distill cache`: one teacher pass → squeezed attention targets for every head count + sparse logits."""
    import torch

    from pipeline.attention import attention_dims
    from pipeline.data import load_prepared
    from pipeline.models import load_teacher
    from pipeline.runtime import default_device, resolve_dtype
    from pipeline.targets.fingerprint import cache_fingerprint, cached_layers
    from pipeline.targets.writer import TargetSettings, weights_sha256, write_cache_split

    dist.init_cpu_group()
    device = default_device()
    teacher_dir = Path(config.teacher.path)
    teacher = load_teacher(teacher_dir, dtype=resolve_dtype(config.teacher.dtype, device), device=device)
    dims = attention_dims(teacher.config)
    layers = cached_layers(config, dims.num_layers)
    settings = TargetSettings(
        layers=tuple(layers),
        head_counts=tuple(config.cache_head_counts()),
        squeeze=config.distill.squeeze,
        encoding=config.cache.encoding,
        attn_top_m=config.cache.attn_top_m,
        top_k=config.distill.top_k,
        dtype=getattr(torch, config.cache.dtype),
    )
    logger.info(
        "caching teacher layers %s for student head counts %s (%d teacher heads, %s squeeze, %s encoding)",
        layers,
        list(settings.head_counts),
        dims.num_heads,
        settings.squeeze,
        settings.encoding,
    )
    splits, meta = load_prepared(Path(config.data.output_dir))
    teacher_sha = weights_sha256(teacher_dir)
    for split, rows in splits.items():
        if config.cache.max_samples is not None and len(rows) > config.cache.max_samples:
            logger.info("%s: caching the first %d of %d samples", split, config.cache.max_samples, len(rows))
            rows = rows.select(range(config.cache.max_samples))
        write_cache_split(
            teacher,
            rows.with_format("torch", columns=["sample_id", "input_ids"]),
            Path(config.cache.output_dir) / split,
            settings,
            cache_fingerprint(config, meta, split, teacher_sha, dims, teacher.config.vocab_size, layers),
            shard_size=config.cache.shard_size,
            batch_size=config.cache.batch_size,
        )


def verify_stage(directory: Path) -> None:
    """`distill cache verify DIR`: every checksum and shape of a cache split (or of each split below DIR)."""
    from pipeline.targets.reader import verify_cache

    in_splits = sorted(manifest.parent for manifest in directory.glob("*/manifest.json"))
    splits = [directory] if (directory / "manifest.json").is_file() or not in_splits else in_splits
    for split_dir in splits:
        manifest = verify_cache(split_dir)
        logger.info("%s: OK — %d shards, %d samples", split_dir, len(manifest.shards), manifest.num_samples)


def train_stage(config: Config) -> dict[str, float]:
    """`distill train`: the DeepSpeed student loop (resumes from `train.output_dir` per `train.resume`), then the
    exported student in `train.output_dir/student`. Returns the final global metrics."""
    from pipeline.train import train

    return train(config)


def eval_stage(config: Config, model_dir: Path | None = None, checkpoint: Path | None = None) -> dict[str, float]:
    """`distill eval`: a trained student (exported, another HF directory, or a checkpoint) on the whole cached
    validation split."""
    from pipeline.evaluate import evaluate_stage

    return evaluate_stage(config, model_dir=model_dir, checkpoint=checkpoint)


def compare_stage(config: Config, report_dir: Path) -> str:
    """`distill compare` for the config's experiment: tables and plots under `report_dir/<experiment>/`."""
    from pipeline.compare import compare_runs, resolve_target

    uri, experiment = resolve_target(config, None, None)
    return compare_runs(uri, experiment, output=report_dir).markdown


def run_stage(config: Config) -> None:
    """`distill run`: every stage in order, each skipped when its output is already complete; with `run.variants`,
    one student per variant on the same prepared data (and the same cache where the variants share it), then a
    comparison of their runs. Prints where the time went."""
    timings: list[tuple[str, float]] = []

    def timed(label: str, stage: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = stage()
        timings.append((label, time.perf_counter() - start))
        return result

    timed("teacher import", lambda: teacher_stage(config))
    timed("prepare", lambda: prepare_stage(config))
    variants = {name: config.variant(name) for name in config.run.variants} or {"": config}
    trained = False
    for name, variant in variants.items():
        suffix = f" [{name}]" if name else ""
        if name:
            logger.info("variant %s: %s", name, " ".join(config.run.variants[name]) or "(the base config)")
        timed(f"cache{suffix}", lambda variant=variant: cache_stage(variant))
        trained |= bool(timed(f"train{suffix}", lambda variant=variant: train_stage(variant)))
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
