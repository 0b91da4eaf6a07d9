"""`distill train`: the DeepSpeed student loop over cached (or live) teacher targets.

One process, or one process per rank under the DeepSpeed launcher. `train()` reads like a table of contents:
set up ranks → check the cache → build teacher (online) and student → DeepSpeed engine → resume → loop → export.

Normalisation. The loss is a list of terms (`pipeline.objective`); each is a SUM over its valid units — CE over
labels ≠ -100, KD over every position, attention and relations over query rows (per row averaged over heads and
matched layers) — divided once by the GLOBAL count of those units in the optimizer step (all micro-batches of all
ranks, all-reduced before the first backward). DeepSpeed
averages gradients over ranks and divides the loss by the accumulation steps, so each micro-batch's loss is scaled
by world_size · grad_accum / global_count before `engine.backward`. The gradient is then that of the global mean,
for any split of the global batch into ranks and micro-batches; the logged values are the same global means.

A step whose loss is not finite stops the run with an error naming the step, the term and the sample ids, before any
update or checkpoint (the last good checkpoint stays the newest). Checkpoints, resuming (also at another world size)
and the export: `training.checkpoints`. Online targets: `targets.online`. Evaluation (also at step 0, before the
first update): `pipeline.training.evaluate`.

Outputs in `train.output_dir`: `checkpoints/`, `student/` (the exported HF model), `metrics.jsonl` (rank 0: one line
per step with the train metrics and `position`, the global sample position the step started at; one per evaluation
with the eval metrics and the position reached) and `mlflow_run_id` (the run a resumed job continues).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra import dist
from pipeline.infra.runtime import to_device
from pipeline.infra.tracking import create_tracker, sigterm_as_keyboard_interrupt
from pipeline.objective import Objective, build_objective
from pipeline.training.checkpoints import (
    CHECKPOINTS,
    RUN_ID_FILE,
    STUDENT,
    ResumePoint,
    TrainState,
    convert_to_universal,
    export_student,
    plan_resume,
    restore_rng,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"


class TrainError(PipelineError):
    """A run cannot start or resume as configured; the message names the key, file or field."""


# --------------------------------------------------------------------------------------------------------------------
# Learning rate


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`.

    Linear warm-up over `warmup_steps` (step k uses (k + 1) / warmup), then `constant`, or `linear`/`cosine` decay
    from the peak at the first step after warm-up to `min_ratio` at the last step (`max_steps` − 1) and after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps - 1))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule as a `LambdaLR` for DeepSpeed to step and checkpoint.

    The factor is a `partial` (a callable without state of its own), so a checkpoint restores the step count only
    and the schedule always follows the current config (e.g. a resumed run with a larger `train.max_steps`).
    """
    train = config.train
    factor = partial(
        lr_factor,
        warmup_steps=train.warmup_steps,
        max_steps=train.max_steps,
        schedule=train.schedule,
        min_ratio=train.min_lr / train.lr,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------------------------
# The loop


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
    ) -> None:
        self.config = config
        self.engine = engine
        self.objective = objective
        self.batches = batches
        self.state = state
        self.tracker = tracker
        self.evaluator = evaluator
        self.teacher_layers = teacher_layers
        self.device = engine.device
        self.world_size = dist.world_size()
        self.output_dir = Path(config.train.output_dir)
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

    def _record(self, metrics: StepMetrics) -> None:
        if dist.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_LOG, "a") as log:
                log.write(json.dumps({"step": metrics.step, "position": metrics.position, **metrics.values}) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the validation cache, log the metrics and (per `train.heatmaps`) the attention heat maps at
        the current step."""
        if self.evaluator is None:
            return {}
        setting = self.config.train.heatmaps
        heatmap = setting == "every" or (setting == "final" and self.state.step == self.config.train.max_steps)
        result = self.evaluator.run(self.engine, self.engine.module, heatmap=heatmap)
        self.tracker.log_metrics(result.metrics, step=self.state.step)
        self._record(StepMetrics(self.state.step, self.state.position, result.metrics))
        if result.heatmap is not None and self.tracker.active:
            from pipeline.reports.figures import attention_heatmap_figures

            figures = attention_heatmap_figures(*result.heatmap, dict(enumerate(self.teacher_layers)))
            for name, figure in figures.items():
                self.tracker.log_figure(figure, f"heatmaps/step-{self.state.step:08d}/{name}.png")
        logger.info(
            "eval step %d: %s",
            self.state.step,
            " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in result.metrics.items()),
        )
        return result.metrics

    def run(self) -> dict[str, float]:
        """Train to `train.max_steps`, evaluating (first at step 0, before any update), logging and checkpointing on
        schedule; returns the last metrics."""
        from tqdm import tqdm

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
                    self.tracker.log_metrics(metrics.values, step=step)
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


# --------------------------------------------------------------------------------------------------------------------
# The driver


def _run_id_from_file(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _log_run_inputs(
    tracker: Any, config: Config, ds_config: dict, fingerprint: dict, manifest_dir: Path | None
) -> None:
    """Params, provenance tags and input artifacts of a run (rank 0's tracker; a no-op elsewhere)."""
    if not tracker.active:
        return
    tracker.log_params(config.flat())
    tracker.set_tags({f"cache.{key}": value for key, value in fingerprint.items()})
    tracker.log_text(config.dump(), "config.yaml")
    tracker.log_text(json.dumps(ds_config, indent=2), "deepspeed.json")
    if manifest_dir is not None:
        from pipeline.reports.figures import alpha_figure
        from pipeline.targets.manifest import MANIFEST_NAME, read_manifest

        tracker.log_artifact(manifest_dir / MANIFEST_NAME, "cache")
        tracker.log_figure(alpha_figure(read_manifest(manifest_dir).alpha_stats), "alpha_histograms.png")


def train(config: Config, *, overwrite: bool = False) -> dict[str, float]:
    """`distill train`: train the configured student; returns the final global metrics (on every rank).

    `overwrite` lets `train.resume: never` replace a run already in `train.output_dir` (refused otherwise). Outside
    a launcher the process joins a world of one, and keeps that group for its lifetime: DeepSpeed caches its
    process groups, so a second run in the same process (tests, notebooks) must find the same group.
    """
    from pipeline.students import resolve

    with dist.launcher_environment():
        return _train(resolve(config), overwrite)


@dataclass
class RunInputs:
    """What a run reads and checks before any model exists."""

    teacher_config: Any
    num_teacher_layers: int
    splits: Any
    meta: dict[str, Any]
    teacher_sha: str
    requirements: dict[str, Any]
    """What the cache must provide (`training_requirements`), checked field by field."""
    fingerprint: dict[str, Any]
    """The train cache's fingerprint (online mode: the one a cache of these targets would have)."""
    objective: Objective

    @property
    def teacher_layers(self) -> list[int]:
        return list(self.requirements["cached_layers"])


def check_objective(config: Config, fingerprint: dict[str, Any]) -> None:
    """Refuse loss settings the targets cannot serve, naming the key."""
    if fingerprint["encoding"] == "topk" and config.distill.attn_loss != "kl":
        raise TrainError(
            f"distill.attn_loss: got {config.distill.attn_loss!r}, but the cache stores top-m attention targets "
            "(cache.encoding: topk), which only the 'kl' loss can use; use 'kl' or a dense cache"
        )
    if config.attention_kind() == "selective" and config.student.num_heads > fingerprint["teacher_num_heads"]:
        raise TrainError(
            f"distill.attn_match: 'selective' picks student.num_heads = {config.student.num_heads} teacher heads, "
            f"but the teacher has {fingerprint['teacher_num_heads']}"
        )


def check_inputs(config: Config) -> RunInputs:
    """Read the teacher config, the prepared data's meta and the cache's manifest; refuse a cache that does not fit
    the config (another teacher, tokenizer, data or seq_len, a missing head count, layer, target kind or
    temperature) with an error naming the field — before any expensive set-up."""
    from pipeline.data.prepare import load_prepared
    from pipeline.models.capture import attention_dims
    from pipeline.models.loading import check_seq_len, load_teacher_config
    from pipeline.targets.fingerprint import cache_fingerprint, teacher_weights_digest, training_requirements
    from pipeline.targets.reader import open_cache

    teacher_dir = Path(config.teacher.path)
    teacher_config = load_teacher_config(teacher_dir)
    dims = attention_dims(teacher_config)
    splits, meta = load_prepared(Path(config.data.output_dir))
    check_seq_len(teacher_config, meta["seq_len"])
    teacher_sha = teacher_weights_digest(teacher_dir)
    requirements = training_requirements(config, meta, "train", teacher_sha, dims.num_layers)
    if config.train.mode == "cached":
        fingerprint = open_cache(Path(config.cache.output_dir) / "train", requirements).fingerprint
    else:
        layers = sorted(set(requirements["cached_layers"]))
        fingerprint = cache_fingerprint(config, meta, "train", teacher_sha, dims, teacher_config.vocab_size, layers)
    check_objective(config, fingerprint)
    objective = build_objective(config, requirements["cached_layers"])
    return RunInputs(teacher_config, dims.num_layers, splits, meta, teacher_sha, requirements, fingerprint, objective)


@contextmanager
def released(engine: Any) -> Iterator[Any]:
    """Destroy `engine` when the run ends, however it ends. DeepSpeed's hooks (the ZeRO optimizer's backward hooks
    refer back to the engine) keep an engine, its model and its optimizer state alive after the last reference to
    it is gone, so without this every run in one process (`distill run`'s variants, the quality study, notebooks)
    would keep all earlier runs' weights and Adam state in memory."""
    try:
        yield engine
    finally:
        engine.destroy()


def build_engine(
    config: Config, teacher_config: Any, ds_config: dict[str, Any], *, resuming: bool, alpha_stats: dict | None
) -> Any:
    """The student (same seed on every rank; scratch, pretrained or carved from the teacher, with LoRA adapters where
    configured) wrapped by DeepSpeed with the config's LR schedule. `resuming`: only the student's structure is built
    (the checkpoint's weights replace it, so no carve runs); `alpha_stats` (the train cache's) drive a `merge` carve.

    The student is built whole on every rank and partitioned by `deepspeed.initialize` (ZeRO-3 included): students
    are small next to their teachers. A student too large for one device would need `deepspeed.zero.Init` here.
    Only parameters that require grad (the adapters alone under LoRA) reach the optimizer.
    """
    import deepspeed

    from pipeline.students import build_student_model

    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    student = build_student_model(config, teacher_config, structure_only=resuming, alpha_stats=alpha_stats)
    student.config.use_cache = False
    if config.train.gradient_checkpointing:
        # Activation checkpointing (transformers' current name for it); the loop runs backward inside the capture.
        student.activation_checkpointing_enable({"use_reentrant": False})
    engine, _, _, _ = deepspeed.initialize(
        model=student,
        model_parameters=[param for param in student.parameters() if param.requires_grad],
        config=ds_config,
        lr_scheduler=partial(make_scheduler, config=config),
    )
    return engine


def load_resume_point(engine: Any, resume: ResumePoint, fresh: TrainState) -> TrainState:
    """Load `resume` into `engine` and restore this rank's RNG; the state continues with `fresh`'s layout."""
    load_path, client_state = engine.load_checkpoint(str(resume.save_dir), tag=resume.load_tag)
    if load_path is None:
        raise TrainError(f"{resume.save_dir / resume.load_tag}: DeepSpeed found no checkpoint to load")
    saved = TrainState(**client_state["trainer"])
    restore_rng(client_state.get("rng_states", []), dist.rank())
    logger.info(
        "resumed %s: step %d, sample position %d (saved on %d ranks, now %d)",
        resume.save_dir / resume.load_tag,
        saved.step,
        saved.position,
        saved.world_size,
        fresh.world_size,
    )
    return dataclasses.replace(fresh, step=saved.step, position=saved.position, mlflow_run_id=saved.mlflow_run_id)


def training_batches(config: Config, inputs: RunInputs, state: TrainState, teacher: nn.Module | None) -> Iterator:
    """This rank's micro-batches from `state.position` on: the cache through a DataLoader, or the live teacher."""
    from pipeline.targets.reader import TargetStream

    train_cfg = config.train
    if train_cfg.mode == "cached":
        stream = TargetStream(
            directory=Path(config.cache.output_dir) / "train",
            request=inputs.objective.request(),
            batch_size=train_cfg.micro_batch_size,
            rank=dist.rank(),
            world_size=dist.world_size(),
            seed=train_cfg.seed,
            start_position=state.position,
            expected=inputs.requirements,
        )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=train_cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=train_cfg.num_workers > 0,
        )
        return iter(loader)
    from pipeline.targets.online import OnlineTargets, online_settings

    rows = inputs.splits["train"]
    if config.cache.max_samples is not None and len(rows) > config.cache.max_samples:
        rows = rows.select(range(config.cache.max_samples))  # the rows `distill cache` would cache
    request = inputs.objective.request()
    online = OnlineTargets(
        teacher,
        rows.with_format("torch", columns=["sample_id", "input_ids"]),
        online_settings(config, inputs.teacher_layers, request, teacher, inputs.splits["train"]),
        request,
        batch_size=train_cfg.micro_batch_size,
        shard_size=config.cache.shard_size,
        seed=train_cfg.seed,
        rank=dist.rank(),
        world_size=dist.world_size(),
        start_position=state.position,
    )
    return iter(online)


def _train(config: Config, overwrite: bool) -> dict[str, float]:
    from pipeline.infra.runtime import default_device, resolve_dtype
    from pipeline.models.loading import load_teacher
    from pipeline.training.deepspeed_config import deepspeed_config, zero_stage
    from pipeline.training.evaluate import Evaluator

    dist.init_distributed()
    train_cfg = config.train
    output_dir = Path(train_cfg.output_dir)
    teacher_dir = Path(config.teacher.path)
    device = default_device()
    dtype = resolve_dtype(train_cfg.precision, device)
    inputs = check_inputs(config)

    # Online mode: the teacher is built before DeepSpeed exists, so no ZeRO-3 machinery can partition it.
    teacher = None
    if train_cfg.mode == "online":
        teacher = load_teacher(teacher_dir, dtype=resolve_dtype(config.teacher.dtype, device), device=device)

    state = TrainState(
        world_size=dist.world_size(),
        zero_stage=zero_stage(config),
        bf16=dtype == torch.bfloat16,
        student=asdict(config.student),
    )
    resume = plan_resume(config, state.world_size, state.zero_stage, state.bf16, overwrite=overwrite)
    if resume is not None and resume.state.step >= train_cfg.max_steps and (output_dir / STUDENT).is_dir():
        logger.info("already trained: step %d of train.max_steps %d", resume.state.step, train_cfg.max_steps)
        return {}
    if resume is not None and resume.universal:
        if dist.is_main():
            convert_to_universal(resume.save_dir, resume.tag)
        dist.barrier()
    ds_config = deepspeed_config(config, dtype, load_universal=resume is not None and resume.universal)
    if dist.is_main():
        logger.info("DeepSpeed config (world size %d):\n%s", state.world_size, json.dumps(ds_config, indent=2))
        logger.info(
            "loss terms: %s",
            ", ".join(f"{term.name} (w {term.weight:g})" for term in inputs.objective.terms),
        )
    alpha_stats = None
    if train_cfg.mode == "cached":
        from pipeline.targets.manifest import read_manifest

        alpha_stats = read_manifest(Path(config.cache.output_dir) / "train").alpha_stats
    engine = build_engine(
        config, inputs.teacher_config, ds_config, resuming=resume is not None, alpha_stats=alpha_stats
    )
    with released(engine):
        if resume is not None:
            state = load_resume_point(engine, resume, state)
        elif dist.is_main() and (output_dir / METRICS_LOG).exists():
            (output_dir / METRICS_LOG).unlink()  # a fresh run's log must not continue an earlier run's
        if state.step >= train_cfg.max_steps:  # trained, but the export is missing
            export_student(engine.module, state.zero_stage, teacher_dir, output_dir / STUDENT)
            return {}

        run_id = state.mlflow_run_id or (_run_id_from_file(output_dir) if resume else None)
        tracker = create_tracker(config, rank=dist.rank(), run_id=run_id)
        # The run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, or SIGTERM from a scheduler or the launcher).
        with sigterm_as_keyboard_interrupt(), tracker.running():
            state.mlflow_run_id = dist.broadcast_value(tracker.run_id)
            if dist.is_main():
                output_dir.mkdir(parents=True, exist_ok=True)
                if state.mlflow_run_id:
                    (output_dir / RUN_ID_FILE).write_text(state.mlflow_run_id + "\n")
            manifest_dir = Path(config.cache.output_dir) / "train" if train_cfg.mode == "cached" else None
            _log_run_inputs(tracker, config, ds_config, inputs.fingerprint, manifest_dir)
            precision = str(dtype).removeprefix("torch.")
            tracker.set_tags({"world_size": state.world_size, "precision": precision, "zero_stage": state.zero_stage})
            batches = training_batches(config, inputs, state, teacher)
            evaluator = Evaluator.from_config(
                config, inputs.teacher_layers, inputs.meta, inputs.teacher_sha, inputs.num_teacher_layers
            )
            trainer = Trainer(
                config, engine, inputs.objective, batches, state, tracker, evaluator, inputs.teacher_layers
            )
            metrics = trainer.run()
            export_student(engine.module, state.zero_stage, teacher_dir, output_dir / STUDENT)
        return metrics
