"""`distill train`: the DeepSpeed student loop over cached (or live) teacher targets.

One process, or one process per rank under the DeepSpeed launcher. `train()` reads like a table of contents:
set up ranks → check the cache → build teacher (online) and student → DeepSpeed engine → resume → loop → export.

Normalisation. Each loss term is a SUM over its valid units — CE over labels ≠ -100, KD over every position, the
attention term over query rows (per row averaged over heads and matched layers) — divided once by the GLOBAL count of
those units in the optimizer step (all micro-batches of all ranks, all-reduced before the first backward). DeepSpeed
averages gradients over ranks and divides the loss by the accumulation steps, so each micro-batch's loss is scaled
by world_size · grad_accum / global_count before `engine.backward`. The gradient is then that of the global mean,
for any split of the global batch into ranks and micro-batches; the logged values are the same global means.

Checkpoints, resuming (also at another world size) and the export: `pipeline.checkpoints`. Online targets:
`pipeline.online`. Evaluation: `pipeline.evaluate`.

Outputs in `train.output_dir`: `checkpoints/`, `student/` (the exported HF model), `metrics.jsonl` (rank 0: one line
per step with the train metrics and `position`, the global sample position the step started at; one per evaluation
with the eval metrics and the position reached) and `mlflow_run_id` (the run a resumed job continues).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from pipeline import dist
from pipeline.checkpoints import (
    CHECKPOINTS,
    STUDENT,
    ResumePoint,
    TrainState,
    convert_to_universal,
    export_student,
    plan_resume,
    restore_rng,
    save_checkpoint,
)
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.kd import logit_losses
from pipeline.shd import attention_kl_topk, attention_loss
from pipeline.targets.reader import IGNORE_INDEX, SparseAttention, unpack_attention

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
TERMS = ("ce", "kd", "attn")
"""The loss terms, in the order of every [3] tensor below (sums, counts, weights)."""


class TrainError(PipelineError):
    """A run cannot start or resume as configured; the message names the key, file or field."""


# --------------------------------------------------------------------------------------------------------------------
# Losses


@dataclass(frozen=True)
class LossPlan:
    """What the loss needs to know besides the tensors: layer matching, weights, temperatures, target encoding."""

    teacher_layers: tuple[int, ...]
    """m(j): the teacher layer matched by student layer j."""
    weights: tuple[float, float, float]
    """(w_ce, w_kd, w_attn)."""
    kd_temperature: float
    attn_kind: str
    attn_temperature: float
    encoding: str
    seq_len: int

    @classmethod
    def from_config(cls, config: Config, teacher_layers: list[int], encoding: str, seq_len: int) -> LossPlan:
        distill = config.distill
        if encoding == "topk" and distill.attn_loss != "kl":
            raise TrainError(
                f"distill.attn_loss: got {distill.attn_loss!r}, but the cache stores top-m attention targets "
                "(cache.encoding: topk), which only the 'kl' loss can use; use 'kl' or a dense cache"
            )
        return cls(
            teacher_layers=tuple(teacher_layers),
            weights=(distill.w_ce, distill.w_kd, distill.w_attn),
            kd_temperature=distill.kd_temperature,
            attn_kind=distill.attn_loss,
            attn_temperature=distill.attn_temperature,
            encoding=encoding,
            seq_len=seq_len,
        )

    @property
    def student_layers(self) -> list[int]:
        """Student layers whose attention is captured (all of them, when the attention term is on)."""
        return list(range(len(self.teacher_layers))) if self.weights[2] > 0 else []


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A reader batch with every tensor (including `attn` targets) moved to `device`."""

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, SparseAttention):
            return SparseAttention(*(move(part) for part in value))
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        return value

    return move(batch)


def unit_counts(batch: dict[str, Any]) -> Tensor:
    """[3] float64 counts of (CE tokens = labels ≠ -100, KD positions, attention query rows) of a batch.

    Packed sequences have no padding: every position is a KD position and a query row.
    """
    labels = batch["labels"]
    positions = labels.numel()
    return torch.tensor([(labels != IGNORE_INDEX).sum().item(), positions, positions], dtype=torch.float64)


def attention_sum(
    student_maps: dict[int, Tensor],
    targets: dict[int, Tensor | SparseAttention],
    teacher_layers: tuple[int, ...],
    kind: str,
    temperature: float,
) -> Tensor:
    """Σ over query rows of the attention loss, each row averaged over heads and matched layers → scalar fp32.

    `student_maps[j]` [B, H, T, T] for every student layer j; `targets[m(j)]` dense maps [B, H, T, T] or a
    `SparseAttention` of the teacher layer matched to j.
    """
    total = None
    for student_layer, teacher_layer in enumerate(teacher_layers):
        maps, target = student_maps[student_layer], targets[teacher_layer]
        if isinstance(target, SparseAttention):
            layer_sum = attention_kl_topk(
                maps, target.values, target.indices, target.tail, None, temperature=temperature, reduction="sum"
            )
        else:
            layer_sum = attention_loss(maps, target, None, kind=kind, temperature=temperature, reduction="sum")
        total = layer_sum if total is None else total + layer_sum
    return total / len(teacher_layers)


@dataclass
class StudentPass:
    """One student forward on one batch: per-term loss sums (with autograd graph), logits and unpacked targets."""

    sums: Tensor
    """[3] fp32: CE, KD and attention sums (see `unit_counts` for their units)."""
    logits: Tensor
    targets: dict[int, Tensor | SparseAttention]


def student_pass(model: nn.Module, batch: dict[str, Any], plan: LossPlan, capture: Any) -> StudentPass:
    """Forward `batch` (on the model's device) and sum each loss term; call inside `capture`'s `with` block.

    `capture` is the `AttentionCapture` of `plan.student_layers` (it may capture no layer when w_attn = 0).
    """
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    labels = batch["labels"]
    ce, kd = logit_losses(
        logits,
        labels,
        batch["topk_values"],
        batch["topk_indices"],
        batch["tail_mass"],
        torch.ones_like(labels, dtype=torch.bool),
        temperature=plan.kd_temperature,
        reduction="sum",
    )
    targets: dict[int, Tensor | SparseAttention] = {}
    attn = ce.new_zeros(())  # w_attn = 0: no capture, no T×T targets expanded, the term logged as 0
    if plan.student_layers:
        targets = unpack_attention(batch["attn"], plan.encoding, plan.seq_len)
        attn = attention_sum(capture.maps, targets, plan.teacher_layers, plan.attn_kind, plan.attn_temperature)
    return StudentPass(torch.stack([ce, kd, attn.float()]), logits, targets)


# --------------------------------------------------------------------------------------------------------------------
# Collectives (the only ones the loop needs)


def _reduce_device() -> torch.device:
    """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Tensor, op: str = "sum") -> Tensor:
    """`values` reduced over every rank (a copy; unchanged in a single process). `op`: "sum" or "max"."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return values.detach().clone()
    reduced = values.detach().to(_reduce_device(), copy=True)
    torch_dist.all_reduce(reduced, op=torch_dist.ReduceOp.SUM if op == "sum" else torch_dist.ReduceOp.MAX)
    return reduced.to(values.device)


def broadcast_value(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
# Process group


@contextlib.contextmanager
def launcher_environment() -> Iterator[None]:
    """Outside a launcher, provide the variables DeepSpeed expects for a world of one (restored afterwards)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {key: os.environ.get(key) for key in defaults}
    os.environ.update(defaults)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def init_distributed() -> None:
    """Join the job's process group through DeepSpeed: nccl on GPUs, gloo on CPUs.

    A gloo group left by an earlier stage of `distill run` is replaced when GPUs want nccl.
    """
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch_dist.is_initialized() and torch_dist.get_backend() != backend:
        torch_dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


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
        plan: LossPlan,
        batches: Iterator[dict[str, Any]],
        state: TrainState,
        tracker: Any,
        evaluator: Any,
    ) -> None:
        self.config = config
        self.engine = engine
        self.plan = plan
        self.batches = batches
        self.state = state
        self.tracker = tracker
        self.evaluator = evaluator
        self.device = engine.device
        self.world_size = dist.world_size()
        self.weights = torch.tensor(plan.weights, dtype=torch.float64)
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
        counts = all_reduce(torch.stack([unit_counts(batch) for batch in micro_batches]).sum(0))
        # DeepSpeed averages gradients over ranks and divides by the accumulation steps: undo both, then divide
        # by the global unit count, so the gradient is that of Σ terms / global count.
        factors = (self.weights * self.world_size * accumulation / counts.clamp_min(1)).float().to(self.device)
        sums = torch.zeros(3, dtype=torch.float64)
        lr = self.engine.get_lr()[0]
        grad_norm = None
        from pipeline.attention import AttentionCapture

        self.engine.train()
        for index, batch in enumerate(micro_batches):
            # Backward inside the capture block: with activation checkpointing the recomputed forward must take the
            # same (eager, captured) attention path as the first one.
            with AttentionCapture(self.engine.module, self.plan.student_layers) as capture:
                result = student_pass(self.engine, batch, self.plan, capture)
                self.engine.backward((result.sums * factors).sum())
            sums += result.sums.detach().double().cpu()
            if index == accumulation - 1:
                grad_norm = self._grad_norm_before_step()
            self.engine.step()
            del result, capture
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        reduced = all_reduce(torch.cat([sums, torch.tensor([waited], dtype=torch.float64)]))
        elapsed = time.perf_counter() - started
        terms = reduced[:3] / counts.clamp_min(1)
        values = {
            "train/loss": float((terms * self.weights).sum()),
            **{f"train/loss_{name}": float(terms[index]) for index, name in enumerate(TERMS)},
            "train/lr": lr,
            "train/tokens_per_s": float(counts[1]) / elapsed,
            "train/loader_wait_frac": float(reduced[3]) / self.world_size / elapsed,
            "train/step_time_s": elapsed,
        }
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        metrics = StepMetrics(self.state.step + 1, self.state.position, values)
        self.state.step += 1
        self.state.position += int(counts[1]) // self.plan.seq_len
        values["train/tokens"] = float(self.state.position * self.plan.seq_len)  # tokens seen, for curves by tokens
        return metrics

    def _record(self, metrics: StepMetrics) -> None:
        if dist.is_main():
            with open(self.output_dir / METRICS_LOG, "a") as log:
                log.write(json.dumps({"step": metrics.step, "position": metrics.position, **metrics.values}) + "\n")

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        result = self.evaluator.run(self.engine, self.engine.module, heatmap=True)
        self.tracker.log_metrics(result.metrics, step=self.state.step)
        self._record(StepMetrics(self.state.step, self.state.position, result.metrics))
        if result.heatmap is not None and self.tracker.active:
            from pipeline.figures import attention_heatmap_figure

            figure = attention_heatmap_figure(*result.heatmap, dict(enumerate(self.plan.teacher_layers)))
            self.tracker.log_figure(figure, f"heatmaps/step-{self.state.step:08d}.png")
        logger.info(
            "eval step %d: %s",
            self.state.step,
            " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in result.metrics.items()),
        )
        return result.metrics

    def run(self) -> dict[str, float]:
        """Train to `train.max_steps`, evaluating, logging and checkpointing on schedule; returns the last metrics."""
        from tqdm import tqdm

        train = self.config.train
        last: dict[str, float] = {}
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
                    logger.info(
                        "step %d/%d loss %.4f (ce %.4f kd %.4f attn %.4f) lr %.3g %.0f tok/s loader wait %.0f%%",
                        step,
                        train.max_steps,
                        last["train/loss"],
                        last["train/loss_ce"],
                        last["train/loss_kd"],
                        last["train/loss_attn"],
                        last["train/lr"],
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


def teacher_sha256(teacher_dir: Path) -> str:
    """The teacher's weights digest, hashed once on rank 0 (all of a large teacher's bytes) and broadcast."""
    from pipeline.targets.writer import weights_sha256

    return broadcast_value(weights_sha256(teacher_dir) if dist.is_main() else None)


def _run_id_from_file(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _start_tracker(config: Config, run_id: str | None) -> Any:
    """The run's tracker, continuing `run_id` when possible (a failed continue starts a new run, with a warning)."""
    from pipeline.tracking import create_tracker

    try:
        return create_tracker(config, rank=dist.rank(), run_id=run_id)
    except Exception as error:  # the stored run is gone or belongs to another store
        if run_id is None:
            raise
        logger.warning("MLflow: cannot continue run %s (%s); starting a new run", run_id, error)
        return create_tracker(config, rank=dist.rank())


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
        from pipeline.figures import alpha_figure
        from pipeline.targets.manifest import MANIFEST_NAME, read_manifest

        tracker.log_artifact(manifest_dir / MANIFEST_NAME, "cache")
        tracker.log_figure(alpha_figure(read_manifest(manifest_dir).alpha_stats), "alpha_histograms.png")


def train(config: Config) -> dict[str, float]:
    """`distill train`: train the configured student; returns the final global metrics (on every rank).

    Outside a launcher the process joins a world of one, and keeps that group for its lifetime: DeepSpeed caches
    its process groups, so a second run in the same process (tests, notebooks) must find the same group.
    """
    with launcher_environment():
        return _train(config)


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
    plan: LossPlan

    @property
    def teacher_layers(self) -> list[int]:
        return list(self.requirements["cached_layers"])


def check_inputs(config: Config) -> RunInputs:
    """Read the teacher config, the prepared data's meta and the cache's manifest; refuse a cache that does not fit
    the config (another teacher, tokenizer, data, seq_len, squeeze or top-k, a missing head count or layer) with an
    error naming the field — before any expensive set-up."""
    from transformers import AutoConfig

    from pipeline.attention import attention_dims
    from pipeline.data import load_prepared
    from pipeline.targets.fingerprint import cache_fingerprint, training_requirements
    from pipeline.targets.reader import open_cache

    teacher_dir = Path(config.teacher.path)
    teacher_config = AutoConfig.from_pretrained(teacher_dir, local_files_only=True)
    dims = attention_dims(teacher_config)
    splits, meta = load_prepared(Path(config.data.output_dir))
    teacher_sha = teacher_sha256(teacher_dir)
    requirements = training_requirements(config, meta, "train", teacher_sha, dims.num_layers)
    if config.train.mode == "cached":
        fingerprint = open_cache(Path(config.cache.output_dir) / "train", requirements).fingerprint
    else:
        layers = sorted(set(requirements["cached_layers"]))
        fingerprint = cache_fingerprint(config, meta, "train", teacher_sha, dims, teacher_config.vocab_size, layers)
    plan = LossPlan.from_config(config, requirements["cached_layers"], fingerprint["encoding"], meta["seq_len"])
    return RunInputs(teacher_config, dims.num_layers, splits, meta, teacher_sha, requirements, fingerprint, plan)


def build_engine(config: Config, teacher_config: Any, ds_config: dict[str, Any]) -> Any:
    """The student (same seed on every rank) wrapped by DeepSpeed with the config's LR schedule.

    The student is built whole on every rank and partitioned by `deepspeed.initialize` (ZeRO-3 included): students
    are small next to their teachers. A student too large for one device would need `deepspeed.zero.Init` here.
    """
    import deepspeed

    from pipeline.attention import CAPTURE_ATTENTION
    from pipeline.models import build_student

    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    student = build_student(
        teacher_config,
        num_layers=config.student.num_layers,
        hidden_size=config.student.hidden_size,
        num_heads=config.student.num_heads,
        num_kv_heads=config.student.num_kv_heads,
        intermediate_size=config.student.intermediate_size,
        attn_implementation=CAPTURE_ATTENTION,
        seed=config.train.seed,
    )
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
    layers = sorted(set(inputs.teacher_layers))
    if train_cfg.mode == "cached":
        stream = TargetStream(
            directory=Path(config.cache.output_dir) / "train",
            layers=layers,
            heads=config.student.num_heads,
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
    from pipeline.online import OnlineTargets
    from pipeline.targets.writer import TargetSettings

    rows = inputs.splits["train"]
    if config.cache.max_samples is not None and len(rows) > config.cache.max_samples:
        rows = rows.select(range(config.cache.max_samples))  # the rows `distill cache` would cache
    settings = TargetSettings(
        layers=tuple(layers),
        head_counts=(config.student.num_heads,),
        squeeze=config.distill.squeeze,
        encoding=config.cache.encoding,
        attn_top_m=config.cache.attn_top_m,
        top_k=config.distill.top_k,
        dtype=torch.float32,
    )
    online = OnlineTargets(
        teacher,
        rows.with_format("torch", columns=["sample_id", "input_ids"]),
        settings,
        heads=config.student.num_heads,
        batch_size=train_cfg.micro_batch_size,
        shard_size=config.cache.shard_size,
        seed=train_cfg.seed,
        rank=dist.rank(),
        world_size=dist.world_size(),
        start_position=state.position,
    )
    return iter(online)


def _train(config: Config) -> dict[str, float]:
    from pipeline.deepspeed_config import deepspeed_config, zero_stage
    from pipeline.evaluate import Evaluator
    from pipeline.models import load_teacher
    from pipeline.runtime import default_device, resolve_dtype

    init_distributed()
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
    resume = plan_resume(config, state.world_size, state.zero_stage, state.bf16)
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
    engine = build_engine(config, inputs.teacher_config, ds_config)
    if resume is not None:
        state = load_resume_point(engine, resume, state)
    elif dist.is_main() and (output_dir / METRICS_LOG).exists():
        (output_dir / METRICS_LOG).unlink()  # a fresh run's log must not continue an earlier run's
    if state.step >= train_cfg.max_steps:  # trained, but the export is missing
        export_student(engine.module, state.zero_stage, teacher_dir, output_dir / STUDENT)
        return {}

    tracker = _start_tracker(config, state.mlflow_run_id or (_run_id_from_file(output_dir) if resume else None))
    state.mlflow_run_id = broadcast_value(tracker.run_id)
    if dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        if state.mlflow_run_id:
            (output_dir / RUN_ID_FILE).write_text(state.mlflow_run_id + "\n")
    manifest_dir = Path(config.cache.output_dir) / "train" if train_cfg.mode == "cached" else None
    _log_run_inputs(tracker, config, ds_config, inputs.fingerprint, manifest_dir)
    tracker.set_tags(
        {"world_size": state.world_size, "precision": str(dtype).removeprefix("torch."), "zero_stage": state.zero_stage}
    )

    batches = training_batches(config, inputs, state, teacher)
    evaluator = Evaluator.from_config(config, inputs.plan, inputs.meta, inputs.teacher_sha, inputs.num_teacher_layers)
    trainer = Trainer(config, engine, inputs.plan, batches, state, tracker, evaluator)
    status = "FAILED"
    try:
        metrics = trainer.run()
        export_student(engine.module, state.zero_stage, teacher_dir, output_dir / STUDENT)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return metrics
