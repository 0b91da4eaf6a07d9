"""What every run of a study reads, made once: the teacher, the prepared data with a test split, one cache of every
target any variant reads, and each carved setting saved as a plain HF directory. Each step skips what is done."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra.atomic import staged_directory
from pipeline.study.layout import derive
from pipeline.study.workspace import Context
from pipeline.targets.manifest import CacheError, read_manifest

logger = logging.getLogger(__name__)


def prepare_inputs(ctx: Context) -> None:
    """The teacher (imported, or checked where it is), the prepared data, and the one cache."""
    # the stage drivers import torch, transformers and DeepSpeed: not needed by `--plan`
    from pipeline.stages.cache import cache_stage
    from pipeline.stages.prepare import prepare_stage
    from pipeline.stages.teacher import teacher_stage

    teacher_stage(ctx.base)
    prepare_stage(ctx.base)
    done = cache_state(ctx.base)
    if all(done.values()):
        logger.info("cache %s: complete, reused", ctx.base.cache.output_dir)
        return
    logger.info(
        "caching the teacher's targets (%s) at layers %s for %s heads: the first %s samples of each split",
        ", ".join(ctx.base.cache.attn_targets),
        ctx.base.cache.layers,
        ctx.base.cache.head_counts,
        ctx.base.cache.max_samples,
    )
    started = time.perf_counter()
    cache_stage(ctx.base)
    ctx.record_timing("cache", {"seconds": round(time.perf_counter() - started, 1), "resumed": any(done.values())})


def cache_state(base: Config) -> dict[str, bool]:
    """Per split: whether its cache is complete with the samples this config caches (the cache stage itself loads
    the teacher and chooses the selective heads before it finds that out: a minute saved on every restart). A
    cache of other inputs is found by the cache stage, which refuses it naming the field, and by training."""
    from pipeline.data.prepare import load_prepared  # imports torch, datasets and transformers

    state = {}
    try:
        splits, _ = load_prepared(Path(base.data.output_dir))
    except PipelineError:
        return {"train": False}
    for split, rows in splits.items():
        wanted = min(len(rows), base.cache.max_samples or len(rows))
        try:
            manifest = read_manifest(Path(base.cache.output_dir) / split)
        except CacheError:
            state[split] = False
            continue
        state[split] = manifest.complete and manifest.num_samples == wanted
    return state


def carve_setting(ctx: Context, setting: str) -> Path:
    """Carve a `student.init=teacher` setting once and save it (model, the teacher's tokenizer files, the carve's
    `student_init.json`) as a plain HF directory; an existing one is reused."""
    # torch and transformers: imported when a carve is needed, not by `--plan`
    from pipeline.stages.context import open_run
    from pipeline.students import build_student_model
    from pipeline.training.export import copy_tokenizer

    target = ctx.students_dir / setting
    if (target / "config.json").is_file():
        logger.info("%s: carved student %s reused", setting, target)
        return target
    started = time.perf_counter()
    teacher_dir = Path(ctx.base.teacher.path)
    with staged_directory(target) as staging:
        context = open_run(derive(ctx.base, [*ctx.study.settings[setting], f"train.output_dir={staging}"]))
        # A `merge` carve weights each head group by the cache's SHD α statistics (the study caches first).
        model = build_student_model(context.config, context.teacher_config, targets=context.cached("train"))
        model.save_pretrained(staging, safe_serialization=True)
        copy_tokenizer(teacher_dir, staging)
    seconds = time.perf_counter() - started
    logger.info("%s: carved from the teacher in %.0f s → %s", setting, seconds, target)
    ctx.record_timing(f"carve.{setting}", round(seconds, 1))
    return target
