"""`distill eval`: a trained student (exported, another HF directory, or a checkpoint) on every sample of a cached
split — `validation`, or the held-out `test` split (`data.test_fraction`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra import dist
from pipeline.infra.atomic import atomic_write_text
from pipeline.infra.runtime import default_device
from pipeline.infra.tracking import create_tracker, default_run_name
from pipeline.models.capture import CAPTURE_ATTENTION
from pipeline.models.loading import load_pretrained, load_teacher_config, read_model_config
from pipeline.reports.figures import attention_heatmap_figures
from pipeline.reports.generations import generations_file
from pipeline.stages.context import open_run
from pipeline.stages.train import evaluator, response_evaluator
from pipeline.students import build_student_model
from pipeline.training.checkpoints import (
    CHECKPOINTS,
    RUN_ID_FILE,
    STUDENT,
    TRAINER_STATE,
    find_checkpoint,
    load_checkpoint_weights,
    read_trainer_state,
)
from pipeline.training.evaluator import EvalResult
from pipeline.training.generations import publish_generations

EVAL_FILE = "eval.json"
MODEL_HINT = (
    "pass --model a directory written by `distill train` (train.output_dir/student) or save_pretrained, or "
    "--checkpoint a training checkpoint"
)


class EvalError(PipelineError):
    """A student or a cached split cannot be evaluated as configured; the message names the path or key."""


def load_student_for_eval(config: Config, model_dir: Path | None, checkpoint: Path | None) -> tuple[nn.Module, int]:
    """(student in eval mode on the default device, the step it was trained for) from an exported HF directory
    (`model_dir`, default `train.output_dir/student`) or a training checkpoint (`checkpoint`)."""
    output_dir = Path(config.train.output_dir)
    device = default_device()
    if checkpoint is not None:
        found = find_checkpoint(
            dataclasses.replace(config, train=dataclasses.replace(config.train, resume=str(checkpoint)))
        )
        save_dir, tag = found
        teacher_config = load_teacher_config(Path(config.teacher.path))
        student = build_student_model(config, teacher_config, structure_only=True)
        missing, unexpected = student.load_state_dict(load_checkpoint_weights(save_dir, tag), strict=False)
        tied = {"lm_head.weight"} if student.config.tie_word_embeddings else set()
        missing = [key for key in missing if not any(key.endswith(name) for name in tied)]
        if missing or unexpected:
            raise EvalError(
                f"{save_dir / tag}: weights do not fit the configured student (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); check student.* against the run that wrote the checkpoint"
            )
        student.tie_weights()
        step = read_trainer_state(save_dir, tag).step
    else:
        directory = Path(model_dir) if model_dir is not None else output_dir / STUDENT
        if not (directory / "config.json").is_file():
            raise EvalError(f"{directory}: no exported student here (run `distill train`, or pass --checkpoint)")
        hf_config = read_model_config(directory, MODEL_HINT)
        what = "eval --model" if model_dir is not None else "the exported student"
        student = load_pretrained(directory, what, MODEL_HINT, config=hf_config, attn_implementation=CAPTURE_ATTENTION)
        heads = student.config.num_attention_heads
        if heads != config.student.num_heads:
            raise EvalError(
                f"{directory}: the student has {heads} heads, student.num_heads is {config.student.num_heads}; the "
                "cached targets are read for student.num_heads"
            )
        latest = output_dir / CHECKPOINTS / "latest"
        step = 0
        if model_dir is None and latest.is_file():
            state_path = output_dir / CHECKPOINTS / latest.read_text().strip() / TRAINER_STATE
            if state_path.is_file():
                step = json.loads(state_path.read_text())["step"]
    return student.to(device).eval(), step


def eval_stage(
    config: Config, model_dir: Path | None = None, checkpoint: Path | None = None, split: str = "validation"
) -> dict[str, float]:
    """`distill eval`: metrics of a trained student on every sample of a cached split, each rank's share;
    `cache.max_samples` bounds what was cached.

    Rank 0 prints them as a markdown table, writes `train.output_dir/eval.json` (`eval-test.json` for the test split;
    metric names `eval/…` or `test/…`) and logs them with heat maps to MLflow — into the training run when
    `train.output_dir` names one, else into a new run. With `train.generations`, the student's replies to the split's
    first held-out prompts are scored too (`…/rougeL`, beside the teacher's `…/rougeL_teacher`, made once, shared by
    runs side by side, kept in `train.output_dir/generations/`) and written to `generations/<split>-step-<step>.json`.
    """
    dist.init_cpu_group()
    context = open_run(config)
    config = context.config
    if split not in context.meta["splits"]:
        raise EvalError(
            f"{Path(config.data.output_dir)}: no {split!r} split was prepared (splits: "
            f"{', '.join(context.meta['splits'])}); set data.test_fraction and re-run `distill prepare` and "
            "`distill cache` into new directories"
        )
    split_evaluator = evaluator(context, split, max_batches=None)
    if split_evaluator is None:
        raise EvalError(f"{context.cache_directory(split)}: no {split} cache to evaluate on (run `distill cache`)")
    output_dir = Path(config.train.output_dir)
    responses = response_evaluator(context, split, output_dir)
    model, step = load_student_for_eval(config, model_dir, checkpoint)
    result = split_evaluator.run(model, model, heatmap=True)
    prefix = "eval" if split == "validation" else split
    if split != "validation":
        result = EvalResult(
            {f"{split}/{key.split('/', 1)[1]}": value for key, value in result.metrics.items()}, result.heatmap
        )
    scores = responses.run(model, next(model.parameters()).device, prefix) if responses is not None else None
    if scores is not None:
        result.metrics.update(scores.metrics)
    if dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        name = EVAL_FILE if split == "validation" else f"eval-{split}.json"
        # Atomic and unlocked: evaluating a run's latest checkpoint while it trains is allowed, and a reader of
        # eval.json sees the earlier result or this one, never a part.
        atomic_write_text(output_dir / name, json.dumps({"step": step, **result.metrics}, indent=2) + "\n")
        print("| metric | value |\n|---|---|")
        for key, value in result.metrics.items():
            print(f"| {key} | {value:.6g} |")
        run_id_path = output_dir / RUN_ID_FILE
        run_id = run_id_path.read_text().strip() if run_id_path.is_file() and model_dir is None else None
        tracker = create_tracker(config, rank=0, run_id=run_id, run_name=f"{default_run_name(config)}-eval")
        with tracker.running():
            tracker.log_metrics(result.metrics, step=step)
            if scores is not None:
                about = {"step": step, "split": split, "max_new_tokens": responses.max_new_tokens}
                publish_generations(scores, output_dir, generations_file(step, split), tracker, **about)
            if result.heatmap is not None:
                figures = attention_heatmap_figures(*result.heatmap, dict(enumerate(context.teacher_layers)))
                for figure_name, figure in figures.items():
                    tracker.log_figure(figure, f"heatmaps/{split}-step-{step:08d}/{figure_name}.png")
    dist.barrier()
    return result.metrics
