"""The distillation loss: the configured terms (`pipeline.objective.terms`) in a fixed order, their weights over
the optimizer steps, one student forward shared by all of them, and what they need of the teacher's targets.

    loss = Σ_terms w_term(step) · (Σ_units loss) / (global unit count)

Each term returns the SUM of its loss over the units of one batch (CE: labels ≠ -100; KD: positions; attention and
relations: query rows, each row already averaged over heads and matched layers). The trainer divides each sum once
by the unit count of all micro-batches of all ranks (`infra.dist.term_means`), so the loss and gradient do not
depend on how a global batch is split. The student runs with SDPA; its matched layers record their post-RoPE queries
and keys (`AttentionCapture(eager=False)`) and the map terms recompute scores from them in row blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.models.capture import AttentionCapture
from pipeline.objective.terms import StudentForward, Term, TermContext, specs
from pipeline.objective.terms.attention import YARDSTICK, AttentionKD
from pipeline.ops.shd import layer_map
from pipeline.targets.needs import TargetNeeds


@dataclass
class WeightSchedule:
    """Weights of the attention-transfer terms over optimizer steps: constant, or linear decay to 0."""

    kind: str = "constant"
    decay_steps: int = 1
    scheduled: tuple[str, ...] = ()
    """Names of the terms whose weight follows the schedule."""

    def varies(self, name: str) -> bool:
        """Whether term `name`'s weight changes over the steps (then the trainer logs it as `train/w_<name>`)."""
        return self.kind != "constant" and name in self.scheduled

    def factor(self, name: str, step: int) -> float:
        """Multiplier of term `name`'s weight at the optimizer step with 0-based index `step`."""
        if not self.varies(name):
            return 1.0
        return max(0.0, 1.0 - step / self.decay_steps)


class Objective:
    """The configured terms, in a fixed order; every per-term tensor below is in this order."""

    def __init__(self, terms: Sequence[Term], schedule: WeightSchedule | None = None) -> None:
        if not terms:
            raise ValueError("an objective needs at least one term")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be distinct, got {names}")
        self.terms = list(terms)
        self.schedule = schedule or WeightSchedule()
        self.kd_temperature = self.needs().kd_temperature

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def capture_layers(self) -> list[int]:
        """Student layers whose score inputs the terms read."""
        return sorted(set().union(*(term.capture_layers() for term in self.terms)))

    def needs(self) -> TargetNeeds:
        """What the terms read of the teacher's targets: their maps, and the logits at the KD term's temperature."""
        maps = tuple(dict.fromkeys(need for term in self.terms for need in term.needs()))
        temperature, top_k = next((needs for term in self.terms if (needs := term.logit_needs()) is not None), (1.0, 0))
        keys = tuple(pair for term in self.terms for pair in term.temperature_keys())
        return TargetNeeds(maps, temperature, top_k, keys)

    def cache_problem(self, fingerprint: dict[str, Any]) -> str | None:
        """The first reason a term cannot use targets with `fingerprint` beyond their content (None: none)."""
        return next((problem for term in self.terms if (problem := term.cache_problem(fingerprint))), None)

    def weights(self, step: int) -> Tensor:
        """[n_terms] float64 weights at the optimizer step with 0-based index `step`."""
        return torch.tensor(
            [term.weight * self.schedule.factor(term.name, step) for term in self.terms], dtype=torch.float64
        )

    def counts(self, batch: dict[str, Any]) -> Tensor:
        """[n_terms] float64 unit counts of one batch."""
        return torch.tensor([term.count(batch) for term in self.terms], dtype=torch.float64)

    @contextlib.contextmanager
    def forward(self, model: nn.Module, module: nn.Module, batch: dict[str, Any]) -> Iterator[StudentForward]:
        """Run the student on `batch` (already on its device) and yield what the terms need; `model` is what is
        called (a DeepSpeed engine or the module), `module` the bare model whose attention is captured. With
        activation checkpointing, run the backward inside the block: the recomputed forward must record again."""
        with AttentionCapture(module, self.capture_layers(), eager=False) as capture:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            yield StudentForward(logits, capture.inputs, batch, self.kd_temperature)

    def sums(self, forward: StudentForward) -> Tensor:
        """[n_terms] fp32 sums of one batch, with autograd graph."""
        return torch.stack([term.loss_sum(forward).float() for term in self.terms])


def build_objective(config: Config, teacher_layers: Sequence[int], *, evaluation: bool = False) -> Objective:
    """The terms of `config.distill` for a student whose layer j matches teacher layer `teacher_layers[j]`.

    Training keeps the terms each term's builder keeps (CE and KD always: their fused pass costs one vocabulary pass
    whatever their weights; the others when weighted). `evaluation=True` keeps every term whose targets a run is
    guaranteed to have (CE, KD, attention; relations when configured), weights left as set.
    """
    context = TermContext(tuple(teacher_layers), config.student.num_heads, evaluation)
    terms = [term for spec in specs() if (term := spec.build(getattr(config.distill, spec.name), context))]
    decay = config.distill.decay_steps or config.train.max_steps
    scheduled = tuple(spec.name for spec in specs() if spec.scheduled)
    return Objective(terms, WeightSchedule(config.distill.schedule, decay, scheduled))


def evaluation_objective(config: Config, teacher_layers: Sequence[int]) -> Objective:
    """Every term of the run at its configured settings, plus the τ = 1 attention-KL yardstick where the attention
    term is not already exactly that."""
    objective = build_objective(config, teacher_layers, evaluation=True)
    attention = next(term for term in objective.terms if isinstance(term, AttentionKD))
    if attention.is_yardstick():
        return objective
    return Objective([*objective.terms, attention.yardstick()], objective.schedule)


def attention_term(objective: Objective) -> AttentionKD:
    """The objective's attention term (an evaluation objective always has one)."""
    return next(term for term in objective.terms if isinstance(term, AttentionKD))


def matched_layers(config: Config, num_teacher_layers: int) -> list[int]:
    """The teacher layer each student layer is matched to (`distill.layer_map` for the resolved student)."""
    try:
        return layer_map(config.student.num_layers, num_teacher_layers, config.distill.layer_map)
    except ValueError as error:
        raise ConfigError(f"distill.layer_map: {error} (the teacher has {num_teacher_layers} layers)") from None


def run_needs(config: Config, teacher_layers: Sequence[int]) -> TargetNeeds:
    """What a run needs of its targets, computed once: the evaluation objective's needs (a superset of training's:
    every run reports its attention KL)."""
    return evaluation_objective(config, teacher_layers).needs()


__all__ = [
    "YARDSTICK",
    "Objective",
    "WeightSchedule",
    "attention_term",
    "build_objective",
    "evaluation_objective",
    "matched_layers",
    "run_needs",
]
