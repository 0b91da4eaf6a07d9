"""Evaluation against cached validation targets: during training (`Evaluator`) and as `distill eval`.

Metrics, each a global mean over every rank's share of the validation cache:
- `eval/ppl`: exp of the next-token cross-entropy (labels ≠ -100);
- `eval/loss_ce`, `eval/loss_kd`: the training terms (KD at `distill.kd_temperature`);
- `eval/top1_agreement`: share of positions where the student's argmax is the teacher's top-1 token
  (`topk_indices[..., 0]` of the cache);
- `eval/attn_kl`: KL(squeezed teacher ‖ student) per query row at τ = 1, averaged over heads and matched layers —
  a fixed yardstick, whatever attention loss and temperature the run trained with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import dist
from pipeline.checkpoints import (
    CHECKPOINTS,
    STUDENT,
    TRAINER_STATE,
    find_checkpoint,
    load_checkpoint_weights,
    read_trainer_state,
)
from pipeline.config import Config
from pipeline.targets.reader import SparseAttention
from pipeline.train import (
    RUN_ID_FILE,
    LossPlan,
    TrainError,
    all_reduce,
    student_pass,
    to_device,
    unit_counts,
)

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


@dataclass
class EvalResult:
    """Global metrics, and on rank 0 the heat-map sample: (student maps, targets), each student layer → [H, T, T]."""

    metrics: dict[str, float]
    heatmap: tuple[dict[int, Tensor], dict[int, Tensor]] | None = None


def dense_target(target: Tensor | SparseAttention) -> Tensor:
    """A target map of one sample as dense [H, T, T] (top-m targets scattered back, the tail left out)."""
    if isinstance(target, SparseAttention):
        maps = target.values.new_zeros(*target.values.shape[:-1], target.values.shape[-2])
        return maps.scatter(-1, target.indices, target.values)
    return target


class Evaluator:
    """Evaluates a student on the cached validation split; every rank calls `run` (ZeRO-3 gathers in lock-step)."""

    def __init__(
        self,
        directory: Path,
        plan: LossPlan,
        *,
        heads: int,
        batch_size: int,
        max_batches: int | None,
        expected: dict[str, Any],
    ) -> None:
        self.directory = directory
        # Fixed yardstick: attention KL at τ = 1, every term computed whatever its training weight.
        self.plan = dataclasses.replace(plan, weights=(1.0, 1.0, 1.0), attn_kind="kl", attn_temperature=1.0)
        self.heads = heads
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.expected = expected

    @classmethod
    def from_config(
        cls,
        config: Config,
        plan: LossPlan,
        meta: dict[str, Any],
        teacher_sha: str,
        num_teacher_layers: int,
        max_batches: int | None = -1,
    ) -> Evaluator | None:
        """The evaluator of `cache.output_dir/validation` (None, with a warning, when that cache is missing).

        `max_batches=-1` means `train.eval_batches`; None means the whole split.
        """
        from pipeline.targets.fingerprint import training_requirements
        from pipeline.targets.manifest import MANIFEST_NAME
        from pipeline.targets.reader import open_cache

        directory = Path(config.cache.output_dir) / "validation"
        if not (directory / MANIFEST_NAME).is_file():
            logger.warning("%s: no validation cache; evaluation is skipped", directory)
            return None
        expected = training_requirements(config, meta, "validation", teacher_sha, num_teacher_layers)
        open_cache(directory, expected)  # refuse an incompatible validation cache now, not at the first evaluation
        return cls(
            directory,
            plan,
            heads=config.student.num_heads,
            batch_size=config.train.micro_batch_size,
            max_batches=config.train.eval_batches if max_batches == -1 else max_batches,
            expected=expected,
        )

    def run(
        self, model: nn.Module, module: nn.Module, *, heatmap: bool = False, device: torch.device | None = None
    ) -> EvalResult:
        """Evaluate `model` (a DeepSpeed engine or the module itself; `module` is the bare model for capture).

        Ranks may hold different numbers of validation batches; the shorter ones run dummy forwards so that every
        rank makes the same number of forward calls (ZeRO-3 gathers parameters collectively in each).
        """
        from pipeline.attention import AttentionCapture
        from pipeline.targets.reader import TargetStream

        device = device or next(module.parameters()).device
        stream = TargetStream(
            directory=self.directory,
            layers=sorted(set(self.plan.teacher_layers)),
            heads=self.heads,
            batch_size=self.batch_size,
            rank=dist.rank(),
            world_size=dist.world_size(),
            shuffle=False,
            one_pass=True,
            num_batches=self.max_batches,
            expected=self.expected,
            prefetch=False,
        )
        num_calls = int(all_reduce(torch.tensor([len(stream)], dtype=torch.float64), op="max").item())
        student_layers = list(range(len(self.plan.teacher_layers)))
        sums = torch.zeros(8, dtype=torch.float64)  # ce, n_ce, kd, n_kd, agree, n_positions, attn_kl, n_rows
        sample = None
        batches = iter(stream)
        was_training = module.training
        model.eval()
        with torch.no_grad():
            for _ in range(num_calls):
                batch = next(batches, None)
                if batch is None:
                    model(input_ids=torch.zeros(1, self.plan.seq_len, dtype=torch.long, device=device), use_cache=False)
                    continue
                batch = to_device(batch, device)
                with AttentionCapture(module, student_layers) as capture:
                    result = student_pass(model, batch, self.plan, capture)
                counts = unit_counts(batch)
                agree = (result.logits.argmax(-1) == batch["topk_indices"][..., 0]).sum().item()
                ce, kd, attn = result.sums.double().cpu().tolist()
                sums += torch.tensor([ce, counts[0], kd, counts[1], agree, counts[1], attn, counts[2]])
                if heatmap and sample is None and dist.is_main():
                    sample = (
                        {layer: capture.maps[layer][0].cpu() for layer in student_layers},
                        {
                            layer: dense_target(_first(result.targets[self.plan.teacher_layers[layer]])).cpu()
                            for layer in student_layers
                        },
                    )
        if was_training:
            model.train()
        total = all_reduce(sums)
        ce, n_ce, kd, n_kd, agree, n_positions, attn, n_rows = total.tolist()
        metrics = {
            "eval/ppl": math.exp(ce / max(n_ce, 1)),
            "eval/loss_ce": ce / max(n_ce, 1),
            "eval/loss_kd": kd / max(n_kd, 1),
            "eval/top1_agreement": agree / max(n_positions, 1),
            "eval/attn_kl": attn / max(n_rows, 1),
        }
        return EvalResult(metrics, sample)


def _first(target: Tensor | SparseAttention) -> Tensor | SparseAttention:
    """Sample 0 of a batch of targets."""
    if isinstance(target, SparseAttention):
        return SparseAttention(*(part[0] for part in target))
    return target[0]


# --------------------------------------------------------------------------------------------------------------------
# `distill eval`


def load_student_for_eval(config: Config, model_dir: Path | None, checkpoint: Path | None) -> tuple[nn.Module, int]:
    """(student in eval mode on the default device, the step it was trained for) from an exported HF directory
    (`model_dir`, default `train.output_dir/student`) or a training checkpoint (`checkpoint`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.attention import CAPTURE_ATTENTION
    from pipeline.models import build_student
    from pipeline.runtime import default_device

    output_dir = Path(config.train.output_dir)
    device = default_device()
    if checkpoint is not None:
        found = find_checkpoint(
            dataclasses.replace(config, train=dataclasses.replace(config.train, resume=str(checkpoint)))
        )
        save_dir, tag = found
        student = build_student(
            AutoConfig.from_pretrained(config.teacher.path, local_files_only=True),
            num_layers=config.student.num_layers,
            hidden_size=config.student.hidden_size,
            num_heads=config.student.num_heads,
            num_kv_heads=config.student.num_kv_heads,
            intermediate_size=config.student.intermediate_size,
        )
        missing, unexpected = student.load_state_dict(load_checkpoint_weights(save_dir, tag), strict=False)
        tied = {"lm_head.weight"} if student.config.tie_word_embeddings else set()
        missing = [key for key in missing if key not in tied]
        if missing or unexpected:
            raise TrainError(
                f"{save_dir / tag}: weights do not fit the configured student (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); check student.* against the run that wrote the checkpoint"
            )
        student.tie_weights()
        step = read_trainer_state(save_dir, tag).step
    else:
        directory = Path(model_dir) if model_dir is not None else output_dir / STUDENT
        if not (directory / "config.json").is_file():
            raise TrainError(f"{directory}: no exported student here (run `distill train`, or pass --checkpoint)")
        student = AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation=CAPTURE_ATTENTION, local_files_only=True
        )
        heads = student.config.num_attention_heads
        if heads != config.student.num_heads:
            raise TrainError(
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


def evaluate_stage(config: Config, model_dir: Path | None = None, checkpoint: Path | None = None) -> dict[str, float]:
    """`distill eval`: metrics of a trained student on the whole cached validation split (every rank's share).

    Rank 0 prints them as a markdown table, writes `train.output_dir/eval.json` and logs them with a heat map to
    MLflow — into the training run when `train.output_dir` names one, else into a new run.
    """
    from transformers import AutoConfig

    from pipeline.attention import attention_dims
    from pipeline.data import load_prepared
    from pipeline.figures import attention_heatmap_figure
    from pipeline.targets.fingerprint import training_requirements
    from pipeline.targets.manifest import read_manifest
    from pipeline.tracking import create_tracker, default_run_name
    from pipeline.train import teacher_sha256

    dist.init_cpu_group()
    teacher_config = AutoConfig.from_pretrained(config.teacher.path, local_files_only=True)
    dims = attention_dims(teacher_config)
    _, meta = load_prepared(Path(config.data.output_dir))
    teacher_sha = teacher_sha256(Path(config.teacher.path))
    requirements = training_requirements(config, meta, "validation", teacher_sha, dims.num_layers)
    directory = Path(config.cache.output_dir) / "validation"
    encoding = read_manifest(directory).fingerprint["encoding"]
    plan = LossPlan.from_config(config, list(requirements["cached_layers"]), encoding, meta["seq_len"])
    evaluator = Evaluator.from_config(config, plan, meta, teacher_sha, dims.num_layers, max_batches=None)
    if evaluator is None:
        raise TrainError(f"{directory}: no validation cache to evaluate on (run `distill cache`)")
    model, step = load_student_for_eval(config, model_dir, checkpoint)
    result = evaluator.run(model, model, heatmap=True)
    if dist.is_main():
        output_dir = Path(config.train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / EVAL_FILE).write_text(json.dumps({"step": step, **result.metrics}, indent=2) + "\n")
        print("| metric | value |\n|---|---|")
        for key, value in result.metrics.items():
            print(f"| {key} | {value:.6g} |")
        run_id_path = output_dir / RUN_ID_FILE
        run_id = run_id_path.read_text().strip() if run_id_path.is_file() and model_dir is None else None
        try:
            tracker = create_tracker(config, rank=0, run_id=run_id, run_name=f"{default_run_name(config)}-eval")
        except Exception as error:  # the training run's store is gone: a new run
            logger.warning("MLflow: cannot continue run %s (%s); logging to a new run", run_id, error)
            tracker = create_tracker(config, rank=0, run_name=f"{default_run_name(config)}-eval")
        tracker.log_metrics(result.metrics, step=step)
        if result.heatmap is not None:
            figure = attention_heatmap_figure(*result.heatmap, dict(enumerate(plan.teacher_layers)))
            tracker.log_figure(figure, f"heatmaps/eval-step-{step:08d}.png")
        tracker.finish()
    dist.barrier()
    return result.metrics
