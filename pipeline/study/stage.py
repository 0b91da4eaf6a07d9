"""`distill study`: the stage driver. Lays the study out, prints the plan, then inputs → carves → search (or the
frozen choice) → grid → report, every step skipping what a killed study already finished."""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.study.grid import grid_specs, is_carved, start_assignment
from pipeline.study.inputs import carve_setting, prepare_inputs
from pipeline.study.plan import make_plan, searches
from pipeline.study.report import write_report
from pipeline.study.runner import Runner
from pipeline.study.search import frozen_choice, tuning_run_count
from pipeline.study.stats import format_duration
from pipeline.study.workspace import Context, open_study

logger = logging.getLogger(__name__)

PROGRESS_LOGGERS = (
    "pipeline.study",
    "pipeline.stages",
    "pipeline.targets.writer",
    "pipeline.students",
    "pipeline.data",
)
"""Loggers kept at INFO whatever the level: what the study, the cache, carve and data stages are doing."""
LIBRARY_LOGGERS = ("transformers", "mlflow", "alembic")


def study_command(
    config: Path,
    overrides: Sequence[str],
    *,
    quick: bool,
    report_only: bool,
    work: Path | None,
    report: Path | None,
    keep_models: bool,
) -> str:
    """The command line that runs (or rebuilt the report of) this study, as one would type it."""
    words = ["distill", "study", str(config), *overrides]
    words += ["--quick"] * quick + ["--report-only"] * report_only + ["--keep-models"] * keep_models
    words += [*(["--work", str(work)] if work else []), *(["--report", str(report)] if report else [])]
    return shlex.join(words)


def configure_logs(level: str, run_logs: bool) -> None:
    """The study's progress at INFO; each run's own messages (every DeepSpeed config, checkpoint and export) at
    WARNING unless `run_logs` or DEBUG; the libraries at WARNING or above."""
    numeric = logging.getLevelName(level.upper())
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    logging.getLogger().setLevel(numeric if run_logs or numeric < logging.INFO else max(logging.WARNING, numeric))
    for name in PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(min(logging.INFO, numeric))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))


def quiet_deepspeed(level: str) -> None:
    """DeepSpeed sets its logger's level when imported (and prints its config at every engine start): lower it
    after the import."""
    import deepspeed  # noqa: F401  (imported for its logger)

    numeric = logging.getLevelName(level.upper())
    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, numeric if isinstance(numeric, int) else 0))


def study_stage(
    config: Path,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    plan: bool = False,
    report_only: bool = False,
    work: Path | None = None,
    report: Path | None = None,
    keep_models: bool = False,
    run_logs: bool = False,
    log_level: str = "INFO",
) -> Path | None:
    """`distill study CONFIG`: print the plan; unless `plan`, run the study (or, with `report_only`, rebuild its report
    from the finished runs). Returns the report's `index.md` (None with `plan`)."""
    configure_logs(log_level, run_logs)
    command = study_command(
        config, overrides, quick=quick, report_only=report_only, work=work, report=report, keep_models=keep_models
    )
    ctx = open_study(
        config, quick=quick, work=work, report=report, keep_models=keep_models, overrides=overrides, command=command
    )
    laid_out = make_plan(ctx)
    print("\n".join(laid_out.lines), flush=True)
    if plan:
        return None
    if report_only:
        frozen, rows = frozen_choice(ctx, None)
        return write_report(ctx, laid_out.specs, frozen, rows, laid_out.lines)
    quiet_deepspeed(log_level)
    return run_study(ctx, len(laid_out.specs))


def run_study(ctx: Context, grid_runs: int) -> Path:
    """Inputs, carves, the search (or the frozen choice), the grid, the report."""
    started = time.perf_counter()
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.record_timing("command", ctx.command)
    prepare_inputs(ctx)
    for setting in ctx.settings:
        if is_carved(ctx.study, setting):
            carve_setting(ctx, setting)
    tuning = tuning_run_count(ctx.study, start_assignment(ctx.study, ctx.base)) if searches(ctx) else 0
    runner = Runner(ctx, tuning + grid_runs)
    with logging_redirect_tqdm():
        try:
            frozen, rows = frozen_choice(ctx, runner)
            specs = grid_specs(
                ctx.study,
                ctx.base,
                frozen,
                ctx.students_dir,
                settings=ctx.settings,
                variants=ctx.variants,
                seeds=ctx.seeds,
            )
            for spec in specs:
                runner.run(spec)
        finally:
            runner.close()
    index = write_report(ctx, specs, frozen, rows, make_plan(ctx).lines)
    logger.info("study done in %s; open %s", format_duration(time.perf_counter() - started), index)
    return index
