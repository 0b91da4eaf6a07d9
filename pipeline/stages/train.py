"""`distill train`: the run's inputs (`stages.context`) → its targets (cached or live) → the student in a DeepSpeed
engine → resume → the loop (`training.trainer`) → the exported student.

One process, or one process per rank under the DeepSpeed launcher. Checkpoints, resuming (also at another world
size) and the export: `training.checkpoints`. Outputs in `train.output_dir` besides the trainer's: `student/` (the
exported HF model) and `mlflow_run_id` (the run a resumed job continues).

One job per `train.output_dir`: rank 0 locks it (`infra.locks`) before any rank writes. A run that starts over on an
earlier one (`train.resume=never --overwrite`) is trained beside it and swapped in only once complete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.prepare import META_NAME, data_format
from pipeline.errors import require
from pipeline.infra import dist
from pipeline.infra.locks import rank_zero_output_lock
from pipeline.infra.runtime import default_device, resolve_dtype
from pipeline.infra.tracking import Tracker, create_tracker, sigterm_as_keyboard_interrupt
from pipeline.models.loading import load_tokenizer, max_positions
from pipeline.objective.loss import build_objective
from pipeline.reports.figures import alpha_figure
from pipeline.reports.generations import GENERATIONS_DIR
from pipeline.stages.context import RunContext, open_run
from pipeline.targets.manifest import MANIFEST_NAME
from pipeline.targets.source import TargetSource
from pipeline.training.checkpoints import (
    RUN_ID_FILE,
    STUDENT,
    TrainState,
    claim_fresh_run,
    convert_to_universal,
    plan_resume,
    publish_run,
    recipe_changes,
    recover_run_directory,
    training_recipe,
)
from pipeline.training.deepspeed_config import deepspeed_config, zero_stage
from pipeline.training.engine import build_engine, load_resume_point, released
from pipeline.training.evaluator import Evaluator
from pipeline.training.export import export_student
from pipeline.training.generations import (
    TEACHER_REPLIES_DIR,
    ResponseEvaluator,
    held_out_prompts,
    stop_token_ids,
    teacher_generations,
)
from pipeline.training.trainer import METRICS_LOG, EarlierLines, Trainer, TrainError, trim_metrics_log

logger = logging.getLogger(__name__)


def train_stage(config: Config, *, overwrite: bool = False) -> dict[str, float]:
    """`distill train`: train the configured student; returns the final global metrics (on every rank).

    `overwrite` lets `train.resume: never` replace a run already in `train.output_dir` (refused otherwise). Outside
    a launcher the process joins a world of one, and keeps that group for its lifetime: DeepSpeed caches its
    process groups, so a second run in the same process (tests, notebooks) must find the same group.
    """
    with dist.launcher_environment():
        dist.init_distributed()
        with rank_zero_output_lock(config.train.output_dir, "train.output_dir", "distill train"):
            return _train(open_run(config), overwrite)


def evaluator(context: RunContext, split: str = "validation", max_batches: int | None = -1) -> Evaluator | None:
    """The evaluator of the `split` cache (None, with a warning, when that cache is missing), checked against the
    run now rather than at the first evaluation. `max_batches=-1` means `train.eval_batches`; None: every sample."""
    directory = context.cache_directory(split)
    if not (directory / MANIFEST_NAME).is_file():
        logger.warning("%s: no %s cache; evaluation is skipped", directory, split)
        return None
    train = context.config.train
    return Evaluator(
        context.cached(split),
        context.evaluation,
        batch_size=train.micro_batch_size,
        max_batches=train.eval_batches if max_batches == -1 else max_batches,
    )


def response_evaluator(context: RunContext, split: str, run_dir: Path) -> ResponseEvaluator | None:
    """The generations of the first `train.generations` conversations of the prepared `split` (None when 0 or the
    split is empty). Every rank calls it: rank 0 makes the teacher's replies (or reads them from
    `run_dir/generations/`), before any student engine exists, and shares them."""
    config = context.config
    count, max_new_tokens = config.train.generations, config.train.max_new_tokens
    if count == 0:
        return None
    prepared_format = data_format(context.meta)
    require(
        prepared_format != "text",
        "train.generations",
        count,
        f"0 for {Path(config.data.output_dir) / META_NAME} (data_format {prepared_format!r}): generations need chat "
        "data, a prompt and a reference reply (`distill prepare` with data.format: chat or prompt_response)",
    )
    positions = max_positions(context.teacher_config)
    if positions is not None:
        require(
            max_new_tokens < positions,
            "train.max_new_tokens",
            max_new_tokens,
            f"fewer than the teacher's {positions} positions (a prompt and its reply must fit in them)",
        )
    tokenizer = load_tokenizer(context.teacher_dir)
    max_prompt_tokens = positions - max_new_tokens if positions is not None else context.meta["seq_len"]
    prompts, truncated = held_out_prompts(context.splits[split], tokenizer, count, max_prompt_tokens)
    if not prompts:
        logger.warning("train.generations: the %s split holds no conversation; no generations", split)
        return None
    if truncated:
        logger.warning(
            "train.generations: %d of %d prompts are longer than %d tokens (the teacher's %d positions less "
            "train.max_new_tokens %d) and lose their oldest tokens",
            truncated,
            len(prompts),
            max_prompt_tokens,
            positions,
            max_new_tokens,
        )
    stop_ids = stop_token_ids(tokenizer, context.teacher_dir)
    texts = None
    if dist.is_main():
        device = default_device()
        texts = teacher_generations(
            run_dir / GENERATIONS_DIR / f"teacher-{split}.json",
            prompts,
            tokenizer,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            teacher_dir=context.teacher_dir,
            teacher_sha=context.teacher_sha,
            dtype=resolve_dtype(config.teacher.dtype, device),
            device=device,
            store=Path(os.path.abspath(run_dir)).parent / TEACHER_REPLIES_DIR,
        )
    return ResponseEvaluator(
        prompts, tokenizer, dist.broadcast_value(texts), max_new_tokens=max_new_tokens, stop_ids=stop_ids
    )


def _run_id_from_file(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _log_run_inputs(tracker: Tracker, config: Config, ds_config: dict, targets: TargetSource) -> None:
    """Params, provenance tags and input artifacts of a run (rank 0's tracker; a no-op elsewhere)."""
    if not tracker.active:
        return
    tracker.log_params(config.flat())
    tracker.set_tags({f"cache.{key}": value for key, value in targets.fingerprint.items()})
    tracker.log_text(config.dump(), "config.yaml")
    tracker.log_text(json.dumps(ds_config, indent=2), "deepspeed.json")
    if targets.manifest_path is not None:
        tracker.log_artifact(targets.manifest_path, "cache")
        tracker.log_figure(alpha_figure(targets.alpha_stats), "alpha_histograms.png")


def _train(context: RunContext, overwrite: bool) -> dict[str, float]:
    config = context.config
    train_cfg = config.train
    output_dir = Path(train_cfg.output_dir)
    device = default_device()
    dtype = resolve_dtype(train_cfg.precision, device)
    objective = build_objective(config, context.teacher_layers)
    targets = context.target_source(objective.needs())

    state = TrainState(
        world_size=dist.world_size(),
        zero_stage=zero_stage(config),
        bf16=dtype == torch.bfloat16,
        student=asdict(config.student),
        recipe=training_recipe(config),
    )
    starting_over = train_cfg.resume == "never"
    if dist.is_main():
        recover_run_directory(output_dir, starting_over=starting_over and overwrite)
    dist.barrier()
    run_dir = claim_fresh_run(config, overwrite) if starting_over else output_dir
    dist.barrier()
    resume = plan_resume(config, state.world_size, state.zero_stage, state.bf16)
    if resume is not None and resume.state.step >= train_cfg.max_steps and (output_dir / STUDENT).is_dir():
        changes = recipe_changes(resume.state.recipe, state.recipe)
        if changes:
            raise TrainError(
                f"train.output_dir {str(output_dir)!r} holds a run finished at step {resume.state.step} with other "
                f"settings ({'; '.join(changes)}); train into another train.output_dir, or replace that run with "
                "train.resume=never --overwrite"
            )
        logger.info("already trained: step %d of train.max_steps %d", resume.state.step, train_cfg.max_steps)
        return {}
    if resume is not None and resume.universal:
        if dist.is_main():
            convert_to_universal(resume.save_dir, resume.tag)
        dist.barrier()
    # before the engine: the teacher that makes its replies never meets ZeRO-3's partitioning, nor shares memory with it
    responses = response_evaluator(context, "validation", run_dir)
    ds_config = deepspeed_config(config, dtype, load_universal=resume is not None and resume.universal)
    if dist.is_main():
        logger.info("DeepSpeed config (world size %d):\n%s", state.world_size, json.dumps(ds_config, indent=2))
        logger.info("loss terms: %s", ", ".join(f"{term.name} (w {term.weight:g})" for term in objective.terms))
    engine = build_engine(config, context.teacher_config, ds_config, resuming=resume is not None, targets=targets)
    earlier_lines: EarlierLines = {}
    with released(engine):
        if resume is not None:
            state = load_resume_point(engine, resume, state)
            if dist.is_main():
                earlier_lines = trim_metrics_log(run_dir, state.step)
        elif dist.is_main() and (run_dir / METRICS_LOG).exists():
            (run_dir / METRICS_LOG).unlink()  # a fresh run's log must not continue an earlier run's
        if state.step >= train_cfg.max_steps:  # trained, but the export is missing
            export_student(engine.module, state.zero_stage, context.teacher_dir, run_dir / STUDENT)
            return {}
        metrics = _loop(
            context,
            objective,
            engine,
            state,
            targets,
            ds_config,
            dtype,
            run_dir,
            earlier_lines,
            responses,
            resumed=resume is not None,
        )
    if dist.is_main():
        publish_run(run_dir, output_dir)
    dist.barrier()
    return metrics


def _loop(
    context: RunContext,
    objective: Any,
    engine: Any,
    state: TrainState,
    targets: TargetSource,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    run_dir: Path,
    earlier_lines: EarlierLines,
    responses: ResponseEvaluator | None,
    *,
    resumed: bool,
) -> dict[str, float]:
    """The tracked part of a run, writing into `run_dir` (`train.output_dir`, or where an `--overwrite` run is built):
    MLflow run, batches, evaluators, the loop, the export. `earlier_lines`: what an interrupted attempt logged after the
    checkpoint to the MLflow run this one continues (`trim_metrics_log`)."""
    config = context.config
    run_id = state.mlflow_run_id or (_run_id_from_file(run_dir) if resumed else None)
    tracker = create_tracker(config, rank=dist.rank(), run_id=run_id, run_dir=run_dir)
    if tracker.run_id != run_id:  # a new MLflow run holds nothing yet
        earlier_lines = {}
    # The run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, or SIGTERM from a scheduler or the launcher).
    with sigterm_as_keyboard_interrupt(), tracker.running():
        state.mlflow_run_id = dist.broadcast_value(tracker.run_id)
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            if state.mlflow_run_id:
                (run_dir / RUN_ID_FILE).write_text(state.mlflow_run_id + "\n")
        _log_run_inputs(tracker, config, ds_config, targets)
        precision = str(dtype).removeprefix("torch.")
        tracker.set_tags({"world_size": state.world_size, "precision": precision, "zero_stage": state.zero_stage})
        batches = targets.batches(
            batch_size=config.train.micro_batch_size,
            seed=config.train.seed,
            start_position=state.position,
            rank=dist.rank(),
            world_size=dist.world_size(),
        )
        trainer = Trainer(
            config,
            engine,
            objective,
            batches,
            state,
            tracker,
            evaluator(context),
            context.teacher_layers,
            earlier_lines=earlier_lines,
            output_dir=run_dir,
            responses=responses,
        )
        metrics = trainer.run()
        export_student(engine.module, state.zero_stage, context.teacher_dir, run_dir / STUDENT)
    return metrics
