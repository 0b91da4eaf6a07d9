"""The student loop of `distill train`: one optimizer step after another over the run's target batches, with
evaluation, logging and checkpoints on schedule. Built by the stage driver (`pipeline.stages.train`).

Normalisation. The loss is a list of terms (`pipeline.objective`); each is a SUM over its valid units — CE over
labels ≠ -100, KD over every position, attention and relations over query rows (per row averaged over heads and
matched layers) — divided once by the GLOBAL count of those units in the optimizer step (all micro-batches of all
ranks, all-reduced before the first backward). DeepSpeed averages gradients over ranks and divides the loss by the
accumulation steps, so each micro-batch's loss is scaled by world_size · grad_accum / global_count before
`engine.backward`. The gradient is then that of the global mean, for any split of the global batch into ranks and
micro-batches; the logged values are the same global means.

A step whose loss is not finite stops the run with an error naming the step, the term and the sample ids, before any
update or checkpoint (the last good checkpoint stays the newest).

Outputs in `train.output_dir`: `checkpoints/`, `metrics.jsonl` (rank 0: one line per step with the train metrics and
`position`, the global sample position the step started at; one per evaluation with the eval metrics and the
position reached), `generations/` (with `train.generations`: the teacher's replies, made once, and the student's at
step 0 and at the final step; `pipeline.training.generations`). A resumed run first drops the lines of steps after
its checkpoint (`trim_metrics_log`): it writes them again, so every step has one line. The interrupted attempt logged
those steps to the MLflow run the resumed one continues (a line is written before its point is logged); where the
resumed run reproduces a step's losses, as it does unless the config changed, the point is not logged a second time.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra import dist
from pipeline.infra.atomic import atomic_write_text
from pipeline.infra.runtime import to_device
from pipeline.objective.loss import Objective
from pipeline.reports.figures import attention_heatmap_figures
from pipeline.reports.generations import generations_file
from pipeline.training.checkpoints import CHECKPOINTS, TrainState, save_checkpoint
from pipeline.training.generations import ResponseEvaluator, publish_generations

METRICS_LOG = "metrics.jsonl"
logger = logging.getLogger(__name__)


class TrainError(PipelineError):
    """A run cannot start or resume as configured; the message names the key, file or field."""


EarlierLines = dict[tuple[str, int], dict[str, Any]]
"""("train" or "eval", step) → the line an interrupted attempt wrote after the checkpoint a run resumed from."""


def _kind(record: dict[str, Any]) -> str:
    return "train" if "train/loss" in record else "eval"


def trim_metrics_log(output_dir: Path, step: int) -> EarlierLines:
    """Rank 0, when a run resumes from its checkpoint at `step`: drop the lines of later steps (the resumed run
    writes them again) and a line a kill cut short; returns the dropped lines."""
    path = output_dir / METRICS_LOG
    if not path.is_file():
        return {}
    kept: list[str] = []
    dropped: EarlierLines = {}
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
        else:
            dropped[(_kind(record), record["step"])] = record
    if len(kept) != len(lines):
        logger.info(
            "%s: dropped %d line(s) after step %d, which this run writes again", path, len(lines) - len(kept), step
        )
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def _reproduces(earlier: dict[str, Any] | None, values: dict[str, float]) -> bool:
    """Whether an interrupted attempt's line holds these losses (to 1e-6): the resume repeats that step exactly."""
    if earlier is None:
        return False
    losses = [key for key in values if "loss" in key and key in earlier]
    return bool(losses) and all(math.isclose(earlier[key], values[key], rel_tol=1e-6, abs_tol=1e-9) for key in losses)


@dataclass
class StepMetrics:
    """Global metrics of one optimizer step."""

    step: int
    position: int
    """Global sample position the step started at."""
    values: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Owns the engine, the batch iterator and the tracker of one run; `run()` is the loop."""

    def __init__(
        self,
        config: Config,
        engine: Any,
        objective: Objective,
        batches: Iterator[dict[str, Any]],
        state: TrainState,
        tracker: Any,
        evaluator: Any,
        teacher_layers: list[int],
        earlier_lines: EarlierLines | None = None,
        output_dir: Path | None = None,
        responses: ResponseEvaluator | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.objective = objective
        self.batches = batches
        self.state = state
        self.tracker = tracker
        self.evaluator = evaluator
        self.responses = responses
        """The validation split's generations, made at step 0 and at the final step (None: `train.generations` 0)."""
        self.teacher_layers = teacher_layers
        self.earlier_lines = earlier_lines or {}
        """Steps after the checkpoint that an interrupted attempt logged to the MLflow run this one continues."""
        self.device = engine.device
        self.world_size = dist.world_size()
        self.output_dir = Path(output_dir if output_dir is not None else config.train.output_dir)
        """Where the run writes: `train.output_dir`, or where an `--overwrite` run is built beside it."""
        self.save_dir = self.output_dir / CHECKPOINTS
        self.zero_stage = engine.zero_optimization_stage()

    def _grad_norm_before_step(self) -> float | None:
        """The global gradient norm where DeepSpeed does not compute one (ZeRO 0 in fp32): gradients are already
        averaged over ranks once the last micro-batch's backward has run."""
        if self.zero_stage != 0 or self.engine.bfloat16_enabled():
            return None
        norms = [
            param.grad.detach().float().norm() for param in self.engine.module.parameters() if param.grad is not None
        ]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0

    def _check_finite(self, sums: Tensor, batch: dict[str, Any]) -> None:
        """Stop before a non-finite loss reaches an update (a silent skip would train on, or drop, bad targets)."""
        finite = torch.isfinite(sums.detach())
        if bool(finite.all()):
            return
        bad = [name for name, ok in zip(self.objective.names, finite.tolist(), strict=True) if not ok]
        values = ", ".join(
            f"{name} = {value:g}" for name, value in zip(self.objective.names, sums.tolist(), strict=True)
        )
        raise TrainError(
            f"step {self.state.step + 1}: loss term {', '.join(bad)} is not finite ({values}) "
            f"on sample ids {batch['sample_ids'].tolist()}; nothing was updated or saved after the last checkpoint — "
            "check those samples' targets (`distill cache verify`) or lower train.lr"
        )

    def train_step(self) -> StepMetrics:
        """One optimizer step: fetch its micro-batches, count units globally, backward each, step."""
        accumulation = self.config.train.grad_accum
        started = time.perf_counter()
        micro_batches, waited = [], 0.0
        for _ in range(accumulation):
            before = time.perf_counter()
            batch = next(self.batches)
            waited += time.perf_counter() - before
            micro_batches.append(to_device(batch, self.device))
        counts = dist.all_reduce(torch.stack([self.objective.counts(batch) for batch in micro_batches]).sum(0))
        weights = self.objective.weights(self.state.step)
        # DeepSpeed averages gradients over ranks and divides by the accumulation steps: undo both, then divide
        # by the global unit count, so the gradient is that of Σ terms / global count.
        factors = (weights * self.world_size * accumulation / counts.clamp_min(1)).float().to(self.device)
        sums = torch.zeros(len(self.objective.terms), dtype=torch.float64)
        lr = self.engine.get_lr()[0]
        grad_norm = None
        self.engine.train()
        for index, batch in enumerate(micro_batches):
            # Backward inside the forward's capture block: with activation checkpointing the recomputed forward
            # must take the same (captured) attention path as the first one.
            with self.objective.forward(self.engine, self.engine.module, batch) as forward:
                batch_sums = self.objective.sums(forward)
                self._check_finite(batch_sums, batch)
                self.engine.backward((batch_sums * factors).sum())
            sums += batch_sums.detach().double().cpu()
            if index == accumulation - 1:
                grad_norm = self._grad_norm_before_step()
            self.engine.step()
            del forward, batch_sums
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        means = dist.term_means(sums, counts)
        waited_total = float(dist.all_reduce(torch.tensor([waited], dtype=torch.float64))[0])
        elapsed = time.perf_counter() - started
        positions = float(sum(batch["labels"].numel() for batch in micro_batches))
        tokens = float(dist.all_reduce(torch.tensor([positions], dtype=torch.float64))[0])
        values = {
            "train/loss": float((means * weights).sum()),
            **{f"train/loss_{name}": float(mean) for name, mean in zip(self.objective.names, means, strict=True)},
            **{
                f"train/w_{term.name}": float(weight)
                for term, weight in zip(self.objective.terms, weights, strict=True)
                if self.objective.schedule.varies(term.name)
            },
            "train/lr": lr,
            "train/tokens_per_s": tokens / elapsed,
            "train/loader_wait_frac": waited_total / self.world_size / elapsed,
            "train/step_time_s": elapsed,
        }
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        metrics = StepMetrics(self.state.step + 1, self.state.position, values)
        self.state.step += 1
        self.state.position += int(tokens) // micro_batches[0]["labels"].shape[1]
        values["train/tokens"] = float(self.state.position * micro_batches[0]["labels"].shape[1])
        return metrics

    def _log(self, kind: str, values: dict[str, float]) -> None:
        """Log a step's metrics to MLflow, unless the interrupted attempt this run resumes logged the same values
        there (a line is written to `metrics.jsonl` before its point is logged). Values that differ (the config
        changed on resume) are logged beside the earlier ones, with a warning."""
        earlier = self.earlier_lines.pop((kind, self.state.step), None)
        if _reproduces(earlier, values):
            return
        if earlier is not None:
            logger.warning(
                "%s step %d: the losses differ from those the interrupted attempt logged (the config changed?); "
                "MLflow keeps both points of this step",
                kind,
                self.state.step,
            )
        self.tracker.log_metrics(values, step=self.state.step)

    def _record(self, metrics: StepMetrics) -> None:
        if dist.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_LOG, "a") as log:
                log.write(json.dumps({"step": metrics.step, "position": metrics.position, **metrics.values}) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the validation cache, log the metrics and (per `train.heatmaps`) the attention heat maps at
        the current step; at step 0 and the final step also the student's generations (`train.generations`)."""
        final = self.state.step == self.config.train.max_steps
        metrics: dict[str, float] = {}
        if self.evaluator is not None:
            setting = self.config.train.heatmaps
            heatmap = setting == "every" or (setting == "final" and final)
            result = self.evaluator.run(self.engine, self.engine.module, heatmap=heatmap)
            metrics.update(result.metrics)
            if result.heatmap is not None and self.tracker.active:
                figures = attention_heatmap_figures(*result.heatmap, dict(enumerate(self.teacher_layers)))
                for name, figure in figures.items():
                    self.tracker.log_figure(figure, f"heatmaps/step-{self.state.step:08d}/{name}.png")
        if self.responses is not None and (self.state.step == 0 or final):
            scores = self.responses.run(self.engine, self.device)
            metrics.update(scores.metrics)
            if dist.is_main():
                about = {
                    "step": self.state.step,
                    "split": "validation",
                    "max_new_tokens": self.responses.max_new_tokens,
                }
                name = generations_file(self.state.step)
                publish_generations(scores, self.output_dir, name, self.tracker, **about)
        if not metrics:
            return {}
        self._record(StepMetrics(self.state.step, self.state.position, metrics))
        self._log("eval", metrics)
        logger.info(
            "eval step %d: %s",
            self.state.step,
            " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items()),
        )
        return metrics

    def run(self) -> dict[str, float]:
        """Train to `train.max_steps`, evaluating (first at step 0, before any update), logging and checkpointing on
        schedule; returns the last metrics."""
        train = self.config.train
        last: dict[str, float] = {}
        if self.state.step == 0:
            last = self.evaluate()
        progress = tqdm(
            total=train.max_steps, initial=self.state.step, desc="train", unit="step", disable=not dist.is_main()
        )
        with progress:
            while self.state.step < train.max_steps:
                metrics = self.train_step()
                last = metrics.values
                self._record(metrics)
                step = self.state.step
                if step % train.log_every == 0 or step == train.max_steps:
                    self._log("train", metrics.values)
                    terms = " ".join(f"{name} {last[f'train/loss_{name}']:.4f}" for name in self.objective.names)
                    logger.info(
                        "step %d/%d loss %.4f (%s) lr %.3g grad norm %.3g %.0f tok/s loader wait %.0f%%",
                        step,
                        train.max_steps,
                        last["train/loss"],
                        terms,
                        last["train/lr"],
                        last.get("train/grad_norm", math.nan),
                        last["train/tokens_per_s"],
                        100 * last["train/loader_wait_frac"],
                    )
                progress.set_postfix(loss=f"{last['train/loss']:.4f}", refresh=False)
                progress.update(1)
                final = step == train.max_steps
                if final or (train.eval_every and step % train.eval_every == 0):
                    last = {**last, **self.evaluate()}
                if final or (train.save_every and step % train.save_every == 0):
                    save_checkpoint(self.engine, self.save_dir, self.state, train.keep_checkpoints)
        return last
