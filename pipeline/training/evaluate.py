"""Evaluation against cached validation targets: during training (`Evaluator`) and as `distill eval`.

Metrics, each a global mean over every rank's share of the validation cache:
- `eval/ppl`: exp of the next-token cross-entropy (labels ≠ -100);
- `eval/loss_<term>`: every loss term of the objective (`pipeline.objective`) at its configured kind and
  temperature, whatever its training weight (CE, KD, attention; relations when configured);
- `eval/top1_agreement`: share of positions where the student's argmax is the teacher's top-1 token
  (`topk_indices[..., 0]` of the cache);
- `eval/attn_kl`: KL(teacher target ‖ student) per query row at τ = 1 against the run's own attention targets,
  averaged over heads and matched layers — a fixed yardstick, whatever attention loss and temperature the run
  trained with.
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

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.infra import dist
from pipeline.infra.runtime import to_device
from pipeline.objective import AttentionKD, Objective, attention_yardstick, build_objective
from pipeline.ops.map_losses import DenseTarget, MapTarget, student_maps
from pipeline.targets.layout import unpack_triangle
from pipeline.training.checkpoints import (
    CHECKPOINTS,
    RUN_ID_FILE,
    STUDENT,
    TRAINER_STATE,
    find_checkpoint,
    load_checkpoint_weights,
    read_trainer_state,
)

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
YARDSTICK = "attn_kl"


class EvalError(PipelineError):
    """A student or a validation cache cannot be evaluated as configured; the message names the path or key."""


@dataclass
class EvalResult:
    """Global metrics, and on rank 0 the heat-map sample: (student maps, targets), each student layer → [H, T, T]."""

    metrics: dict[str, float]
    heatmap: tuple[dict[int, Tensor], dict[int, Tensor]] | None = None


def dense_target(target: MapTarget, seq_len: int) -> Tensor:
    """The target maps of sample 0 of a batch as dense [H, T, T] (top-m targets scattered back, the tail left out)."""
    if isinstance(target, DenseTarget):
        return unpack_triangle(target.packed[0], seq_len)
    values, indices = target.values[0], target.indices[0]
    return values.new_zeros(*values.shape[:-1], seq_len).scatter(-1, indices, values)


def evaluation_objective(config: Config, teacher_layers: list[int]) -> Objective:
    """Every term of the run at its configured settings, plus the τ = 1 attention-KL yardstick where the attention
    term is not already exactly that."""
    objective = build_objective(config, teacher_layers, evaluation=True)
    attention = next(term for term in objective.terms if isinstance(term, AttentionKD))
    if (attention.kind, attention.temperature, attention.drop_sink) == ("kl", 1.0, False):
        return objective
    return Objective([*objective.terms, attention_yardstick(config, teacher_layers)], objective.schedule)


class Evaluator:
    """Evaluates a student on the cached validation split; every rank calls `run` (ZeRO-3 gathers in lock-step)."""

    def __init__(
        self,
        directory: Path,
        objective: Objective,
        *,
        batch_size: int,
        max_batches: int | None,
        expected: dict[str, Any],
    ) -> None:
        self.directory = directory
        self.objective = objective
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.expected = expected

    @classmethod
    def from_config(
        cls,
        config: Config,
        teacher_layers: list[int],
        meta: dict[str, Any],
        teacher_sha: str,
        num_teacher_layers: int,
        max_batches: int | None = -1,
        split: str = "validation",
    ) -> Evaluator | None:
        """The evaluator of `cache.output_dir/<split>` (None, with a warning, when that cache is missing).

        `max_batches=-1` means `train.eval_batches`; None means every cached sample of the split.
        """
        from pipeline.targets.fingerprint import training_requirements
        from pipeline.targets.manifest import MANIFEST_NAME
        from pipeline.targets.reader import open_cache

        directory = Path(config.cache.output_dir) / split
        if not (directory / MANIFEST_NAME).is_file():
            logger.warning("%s: no %s cache; evaluation is skipped", directory, split)
            return None
        expected = training_requirements(config, meta, split, teacher_sha, num_teacher_layers)
        open_cache(directory, expected)  # refuse an incompatible validation cache now, not at the first evaluation
        return cls(
            directory,
            evaluation_objective(config, teacher_layers),
            batch_size=config.train.micro_batch_size,
            max_batches=config.train.eval_batches if max_batches == -1 else max_batches,
            expected=expected,
        )

    def _heatmap_sample(self, forward: Any, batch: dict[str, Any]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Student maps and targets of sample 0 per matched student layer, from the attention term's inputs."""
        attention = next(term for term in self.objective.terms if isinstance(term, AttentionKD))
        seq_len = batch["input_ids"].shape[1]
        students, targets = {}, {}
        for layer, name in enumerate(attention.targets):
            inputs = forward.inputs[layer]
            query, key = inputs.query[:1].detach().float(), inputs.key[:1].detach().float()
            students[layer] = student_maps(query, key, inputs.scale, head_mean=attention.head_mean)[0].cpu()
            targets[layer] = dense_target(batch["maps"][name], seq_len).cpu()
        return students, targets

    def run(
        self, model: nn.Module, module: nn.Module, *, heatmap: bool = False, device: torch.device | None = None
    ) -> EvalResult:
        """Evaluate `model` (a DeepSpeed engine or the module itself; `module` is the bare model for capture).

        Ranks may hold different numbers of validation batches; the shorter ones run dummy forwards so that every
        rank makes the same number of forward calls (ZeRO-3 gathers parameters collectively in each).
        """
        from pipeline.targets.reader import TargetStream

        device = device or next(module.parameters()).device
        stream = TargetStream(
            directory=self.directory,
            request=self.objective.request(),
            batch_size=self.batch_size,
            rank=dist.rank(),
            world_size=dist.world_size(),
            shuffle=False,
            one_pass=True,
            num_batches=self.max_batches,
            expected=self.expected,
            prefetch=False,
        )
        num_calls = int(dist.all_reduce(torch.tensor([len(stream)], dtype=torch.float64), op="max").item())
        names = self.objective.names
        sums = torch.zeros(len(names), dtype=torch.float64)
        counts = torch.zeros(len(names), dtype=torch.float64)
        agreement = torch.zeros(2, dtype=torch.float64)  # agreeing positions, positions
        sample = None
        batches = iter(stream)
        was_training = module.training
        model.eval()
        with torch.no_grad():
            for _ in range(num_calls):
                batch = next(batches, None)
                if batch is None:
                    model(input_ids=torch.zeros(1, stream.seq_len, dtype=torch.long, device=device), use_cache=False)
                    continue
                batch = to_device(batch, device)
                with self.objective.forward(model, module, batch) as forward:
                    sums += self.objective.sums(forward).double().cpu()
                    counts += self.objective.counts(batch)
                    agree = (forward.logits.argmax(-1) == batch["topk_indices"][..., 0]).sum().item()
                    agreement += torch.tensor([agree, batch["labels"].numel()], dtype=torch.float64)
                    if heatmap and sample is None and dist.is_main():
                        sample = self._heatmap_sample(forward, batch)
        if was_training:
            model.train()
        means = dist.term_means(sums, dist.all_reduce(counts))
        agreed, positions = dist.all_reduce(agreement).tolist()
        by_name = dict(zip(names, means.tolist(), strict=True))
        metrics = {
            "eval/ppl": math.exp(by_name["ce"]),
            **{f"eval/loss_{name}": value for name, value in by_name.items() if name != YARDSTICK},
            "eval/top1_agreement": agreed / max(positions, 1),
            "eval/attn_kl": by_name.get(YARDSTICK, by_name["attn"]),
        }
        return EvalResult(metrics, sample)


# --------------------------------------------------------------------------------------------------------------------
# `distill eval`


def load_student_for_eval(config: Config, model_dir: Path | None, checkpoint: Path | None) -> tuple[nn.Module, int]:
    """(student in eval mode on the default device, the step it was trained for) from an exported HF directory
    (`model_dir`, default `train.output_dir/student`) or a training checkpoint (`checkpoint`)."""
    from transformers import AutoModelForCausalLM

    from pipeline.infra.runtime import default_device
    from pipeline.models.capture import CAPTURE_ATTENTION
    from pipeline.models.loading import load_teacher_config
    from pipeline.students import build_student_model

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
        student = AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation=CAPTURE_ATTENTION, local_files_only=True
        )
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


def evaluate_stage(
    config: Config, model_dir: Path | None = None, checkpoint: Path | None = None, split: str = "validation"
) -> dict[str, float]:
    """`distill eval`: metrics of a trained student on every sample of a cached split — `validation`, or the held-out
    `test` split (`data.test_fraction`) — each rank's share; `cache.max_samples` bounds what was cached.

    Rank 0 prints them as a markdown table, writes `train.output_dir/eval.json` (`eval-test.json` for the test split;
    metric names `eval/…` or `test/…`) and logs them with heat maps to MLflow — into the training run when
    `train.output_dir` names one, else into a new run.
    """
    from pipeline.data.prepare import load_prepared
    from pipeline.infra.tracking import create_tracker, default_run_name
    from pipeline.models.capture import attention_dims
    from pipeline.models.loading import check_seq_len, load_teacher_config
    from pipeline.reports.figures import attention_heatmap_figures
    from pipeline.students import resolve
    from pipeline.targets.fingerprint import student_layers, teacher_weights_digest

    dist.init_cpu_group()
    config = resolve(config)
    teacher_config = load_teacher_config(Path(config.teacher.path))
    dims = attention_dims(teacher_config)
    _, meta = load_prepared(Path(config.data.output_dir))
    check_seq_len(teacher_config, meta["seq_len"])
    teacher_sha = teacher_weights_digest(Path(config.teacher.path))
    teacher_layers = student_layers(config, dims.num_layers)
    if split not in meta["splits"]:
        raise EvalError(
            f"{Path(config.data.output_dir)}: no {split!r} split was prepared (splits: {', '.join(meta['splits'])}); "
            "set data.test_fraction and re-run `distill prepare` and `distill cache` into new directories"
        )
    evaluator = Evaluator.from_config(
        config, teacher_layers, meta, teacher_sha, dims.num_layers, max_batches=None, split=split
    )
    if evaluator is None:
        directory = Path(config.cache.output_dir) / split
        raise EvalError(f"{directory}: no {split} cache to evaluate on (run `distill cache`)")
    model, step = load_student_for_eval(config, model_dir, checkpoint)
    result = evaluator.run(model, model, heatmap=True)
    if split != "validation":
        result = EvalResult(
            {f"{split}/{key.split('/', 1)[1]}": value for key, value in result.metrics.items()}, result.heatmap
        )
    if dist.is_main():
        output_dir = Path(config.train.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        name = EVAL_FILE if split == "validation" else f"eval-{split}.json"
        (output_dir / name).write_text(json.dumps({"step": step, **result.metrics}, indent=2) + "\n")
        print("| metric | value |\n|---|---|")
        for key, value in result.metrics.items():
            print(f"| {key} | {value:.6g} |")
        run_id_path = output_dir / RUN_ID_FILE
        run_id = run_id_path.read_text().strip() if run_id_path.is_file() and model_dir is None else None
        tracker = create_tracker(config, rank=0, run_id=run_id, run_name=f"{default_run_name(config)}-eval")
        with tracker.running():
            tracker.log_metrics(result.metrics, step=step)
            if result.heatmap is not None:
                figures = attention_heatmap_figures(*result.heatmap, dict(enumerate(teacher_layers)))
                for name, figure in figures.items():
                    tracker.log_figure(figure, f"heatmaps/{split}-step-{step:08d}/{name}.png")
    dist.barrier()
    return result.metrics
