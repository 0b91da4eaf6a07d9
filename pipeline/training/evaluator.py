"""Evaluation against cached validation (or held-out test) targets, during training and by `distill eval`.

Metrics, each a global mean over every rank's share of the split's cache, over its trained positions (every position
of text data; of chat data only those that predict a reply token — the response-token metrics):
- `eval/ppl`: exp of the next-token cross-entropy (labels ≠ -100);
- `eval/loss_<term>`: every loss term of the objective (`pipeline.objective`) at its configured kind and
  temperature, whatever its training weight (CE, KD, attention; relations when configured);
- `eval/top1_agreement`: share of positions where the student's argmax is the teacher's top-1 token
  (`topk_indices[..., 0]` of the cache);
- `eval/attn_kl`: KL(teacher target ‖ student) per query row at τ = 1 against the run's own attention targets,
  averaged over heads and matched layers — a fixed yardstick, whatever attention loss and temperature the run
  trained with; over the query rows the validation cache stores (all, or its `cache.attn_row_fraction` sample:
  then an unbiased estimate of the mean over all rows).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.infra import dist
from pipeline.infra.runtime import to_device
from pipeline.objective.loss import YARDSTICK, Objective, attention_term
from pipeline.ops.map_losses import DenseTarget, MapTarget, student_maps
from pipeline.targets.encoding import unpack_triangle
from pipeline.targets.logits import loss_mask
from pipeline.targets.source import CachedTargets

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Global metrics, and on rank 0 the heat-map sample: (student maps, targets), each student layer → [H, T, T]."""

    metrics: dict[str, float]
    heatmap: tuple[dict[int, Tensor], dict[int, Tensor]] | None = None


def dense_target(target: MapTarget, seq_len: int) -> Tensor:
    """The target maps of sample 0 of a batch as dense [H, T, T] (top-m targets scattered back, the tail left out;
    rows the cache does not store are 0)."""
    if isinstance(target, DenseTarget):
        return unpack_triangle(target.packed[0], seq_len)
    values, indices = target.values[0], target.indices[0].clamp_max(seq_len - 1)
    rows = values.new_zeros(*values.shape[:-1], seq_len).scatter_add(-1, indices, values)
    if target.rows is None:
        return rows
    maps = values.new_zeros(values.shape[0], seq_len, seq_len)
    maps[:, target.rows[0]] = rows
    return maps


class Evaluator:
    """Evaluates a student on one cached split (opened and checked once, by its `CachedTargets`); every rank calls
    `run` (ZeRO-3 gathers in lock-step). `max_batches`: per rank (None: every cached sample of the split)."""

    def __init__(
        self, targets: CachedTargets, objective: Objective, *, batch_size: int, max_batches: int | None
    ) -> None:
        self.targets = targets
        self.objective = objective
        self.batch_size = batch_size
        self.max_batches = max_batches

    def _heatmap_sample(self, forward: Any, batch: dict[str, Any]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Student maps and targets of sample 0 per matched student layer, from the attention term's inputs."""
        attention = attention_term(self.objective)
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
        device = device or next(module.parameters()).device
        stream = self.targets.stream(
            batch_size=self.batch_size,
            rank=dist.rank(),
            world_size=dist.world_size(),
            shuffle=False,
            one_pass=True,
            num_batches=self.max_batches,
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
                    trained = loss_mask(batch)
                    agree = ((forward.logits.argmax(-1) == batch["topk_indices"][..., 0]) & trained).sum().item()
                    agreement += torch.tensor([agree, trained.sum().item()], dtype=torch.float64)
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
