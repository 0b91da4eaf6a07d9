"""Training and scoring one run of a study, and running a list of them in order: a finished run (one with a result)
is skipped, an interrupted one discarded and trained again, and each run logs one line with its figures and the time
left."""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import Config
from pipeline.study.grid import TUNE_STAGE, RunSpec
from pipeline.study.layout import StudyError, derive
from pipeline.study.results import curves, load_result, read_history, write_result
from pipeline.study.stats import estimate_seconds, format_duration, measured_timing
from pipeline.study.workspace import Context, git_commit

logger = logging.getLogger(__name__)

SHOWN_METRICS = (
    ("val ppl", "tune/val_ppl"),
    ("test ppl", "test/ppl"),
    ("top-1", "test/top1_agreement"),
    ("attn KL", "test/attn_kl"),
    ("ROUGE-L", "test/rougeL"),
)
"""What a run's log line shows of its result, where present."""


def run_config(ctx: Context, spec: RunSpec) -> Config:
    """The base with the run's overrides, its own output directory, MLflow experiment and run name."""
    experiment = ctx.tuning_experiment if spec.stage == TUNE_STAGE else ctx.grid_experiment
    return derive(
        ctx.base,
        [
            *spec.overrides,
            f"train.output_dir={ctx.runs_dir / spec.name}",
            f"mlflow.experiment={experiment}",
            f"mlflow.run_name={spec.name}",
        ],
    )


def discard_unfinished(ctx: Context, spec: RunSpec) -> None:
    """A run directory without a result is an interrupted run: its MLflow run is deleted (a comparison must not
    show it) and the directory removed, so the run starts again from its first step."""
    directory = ctx.runs_dir / spec.name
    if not directory.exists():
        return
    from pipeline.training.checkpoints import RUN_ID_FILE  # imports torch

    run_id_file = directory / RUN_ID_FILE
    if run_id_file.is_file():
        # here, not at the top: MLflow takes seconds to import and only a run to discard needs it
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_id = run_id_file.read_text().strip()
        try:
            MlflowClient(tracking_uri=ctx.tracking_uri).delete_run(run_id)
            logger.info("%s: interrupted earlier; deleted its MLflow run %s", spec.name, run_id)
        except MlflowException as error:  # e.g. a run of the local fallback store, removed with the directory
            logger.warning("%s: could not delete MLflow run %s (%s)", spec.name, run_id, error.message)
    shutil.rmtree(directory)
    logger.info("%s: removed the interrupted run's directory, training it again", spec.name)


def drop_models(ctx: Context, spec: RunSpec) -> None:
    """Delete a finished run's checkpoint and exported weights (hundreds of MB each) unless `--keep-models`."""
    if ctx.keep_models:
        return
    from pipeline.training.checkpoints import CHECKPOINTS, STUDENT  # imports torch

    for name in (CHECKPOINTS, STUDENT):
        shutil.rmtree(ctx.runs_dir / spec.name / name, ignore_errors=True)


def validation_metrics(config: Config) -> dict[str, float]:
    """The exported student on the whole cached validation split (what `distill eval` computes), logged nowhere:
    the search's score must not be confused with the training's `eval/…` points at the same step."""
    # torch, transformers and DeepSpeed: imported when a run is scored
    from pipeline.infra import dist
    from pipeline.stages.context import open_run
    from pipeline.stages.evaluate import load_student_for_eval
    from pipeline.stages.train import evaluator as split_evaluator

    dist.init_cpu_group()
    context = open_run(config)
    config = context.config
    evaluator = split_evaluator(context, "validation", max_batches=None)
    if evaluator is None:
        raise StudyError(f"{config.cache.output_dir}/validation: no validation cache to score the search on")
    model, _ = load_student_for_eval(config, None, None)
    return evaluator.run(model, model).metrics


def tag_run(ctx: Context, run_id: str, spec: RunSpec, extra: Mapping[str, float]) -> None:
    """The setting, variant and seed as params and tags (filters, grouping) and any extra metrics."""
    from mlflow.tracking import MlflowClient  # MLflow takes seconds to import

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    client.log_param(run_id, "quality.setting", spec.setting)
    client.log_param(run_id, "quality.variant", spec.variant)
    for key, value in (
        ("setting", spec.setting),
        ("variant", spec.variant),
        ("seed", spec.seed),
        ("stage", spec.stage),
    ):
        client.set_tag(run_id, f"quality_{key}", str(value))
    for key, value in extra.items():
        client.log_metric(run_id, key, value, step=ctx.base.train.max_steps)


def execute(ctx: Context, spec: RunSpec) -> dict[str, Any]:
    """Train one run, evaluate it (validation for the search, the held-out test split for the grid), tag its MLflow
    run, publish its result; returns the result."""
    # torch, transformers and DeepSpeed: imported when a run is trained
    from pipeline.stages.evaluate import eval_stage
    from pipeline.stages.train import train_stage
    from pipeline.training.checkpoints import RUN_ID_FILE

    discard_unfinished(ctx, spec)
    config = run_config(ctx, spec)
    output_dir = Path(config.train.output_dir)
    started = time.perf_counter()
    train_stage(config)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if spec.stage == TUNE_STAGE:
        metrics = {f"tune/val_{key.split('/', 1)[1]}": value for key, value in validation_metrics(config).items()}
    else:
        metrics = eval_stage(config, split="test")
    eval_seconds = time.perf_counter() - started
    records = read_history(output_dir)
    steps = [record for record in records if "train/loss" in record]
    evals = [record for record in records if "eval/ppl" in record]
    grad_norms = [record["train/grad_norm"] for record in steps if "train/grad_norm" in record]
    run_id = (output_dir / RUN_ID_FILE).read_text().strip()
    tag_run(ctx, run_id, spec, metrics if spec.stage == TUNE_STAGE else {})
    result = {
        "name": spec.name,
        "stage": spec.stage,
        "setting": spec.setting,
        "variant": spec.variant,
        "seed": spec.seed,
        "overrides": list(spec.overrides),
        "mlflow_run_id": run_id,
        "metrics": {**{key: value for key, value in evals[-1].items() if key.startswith("eval/")}, **metrics},
        "max_grad_norm": max(grad_norms) if grad_norms else math.nan,
        "steps": len(steps),
        "tokens": steps[-1]["train/tokens"] if steps else 0,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "step_seconds_median": statistics.median(record["train/step_time_s"] for record in steps),
        "curves": curves(records),
        "commit": git_commit(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_result(ctx.results_dir, result)
    drop_models(ctx, spec)
    gc.collect()
    return result


def resident_mib() -> float:
    """This process's resident memory now (it trains every run in turn: a leak would show here), NaN off Linux."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Runner:
    """Runs specs in order with one progress bar, skipping finished ones, and logs a line per run with its figures
    and the time left. A run asked for again (the search scores the kept value of a stage once more) counts once.
    `execute` trains and scores one run (tests pass a fake)."""

    def __init__(
        self, ctx: Context, total: int, execute: Callable[[Context, RunSpec], dict[str, Any]] = execute
    ) -> None:
        self.ctx = ctx
        self.total = total
        self.execute = execute
        self.finished: list[dict[str, Any]] = []
        self.counted: set[str] = set()
        self.progress = tqdm(total=total, desc="study", unit="run", position=0, dynamic_ncols=True)

    def _count(self, spec: RunSpec) -> None:
        if spec.name not in self.counted:
            self.counted.add(spec.name)
            self.progress.update(1)

    def run(self, spec: RunSpec) -> dict[str, Any]:
        result = load_result(self.ctx.results_dir, spec)
        if result is not None:
            drop_models(self.ctx, spec)
            self._count(spec)
            return result
        logger.info("[%d/%d] %s: %s", self.progress.n + 1, self.total, spec.name, " ".join(spec.overrides))
        result = self.execute(self.ctx, spec)
        self.finished.append(result)
        self._count(spec)
        metrics = result["metrics"]
        figures = ", ".join(f"{label} {metrics[key]:.4g}" for label, key in SHOWN_METRICS if key in metrics)
        timing = measured_timing(self.finished, "this session")
        left = estimate_seconds(self.total - self.progress.n, self.ctx.base.train.max_steps, timing)
        logger.info(
            "[%d/%d] %s: %s, max grad norm %.3g; train %.0f s (%.2f s/step), eval %.0f s; resident memory %.0f MiB; "
            "about %s left",
            self.progress.n,
            self.total,
            spec.name,
            figures,
            result["max_grad_norm"],
            result["train_seconds"],
            result["step_seconds_median"],
            result["eval_seconds"],
            resident_mib(),
            format_duration(left),
        )
        return result

    def close(self) -> None:
        self.progress.close()
