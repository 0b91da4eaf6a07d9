"""What a loss term is: one component that owns its config section, declares what it needs and returns the sum of
its loss over its units.

A term module defines its config section (a dataclass: `distill.<name>` in the config), a `Term` subclass and a
`TermSpec` named `SPEC` that the registry (`pipeline.objective.terms`) finds. The objective iterates over the terms;
nothing else in the pipeline names them: the trainer and the evaluator log `train|eval/loss_<name>`, the target
needs are the union of the terms' `needs()`, `distill compare` tables whatever metrics the runs logged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from pipeline.ops.kd import logit_losses
from pipeline.ops.map_losses import ScoreInputs
from pipeline.targets.logits import loss_mask, trained_labels
from pipeline.targets.needs import MapNeed


@dataclass
class StudentForward:
    """One student forward on one batch, shared by the terms: logits, the captured score inputs of its matched
    layers, and the fused CE/KD sums (one pass over the vocabulary serves both terms)."""

    logits: Tensor
    inputs: dict[int, ScoreInputs]
    batch: dict[str, Any]
    kd_temperature: float = 1.0
    """The temperature of the logits' tail sums in the batch (`TargetNeeds.kd_temperature`)."""
    _logit_sums: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def logit_sums(self) -> tuple[Tensor, Tensor]:
        """(Σ CE over the trained labels ≠ -100, Σ τ²-scaled top-k KD over the trained positions), computed once."""
        if self._logit_sums is None:
            self._logit_sums = logit_losses(
                self.logits,
                trained_labels(self.batch),
                self.batch["topk_values"],
                self.batch["topk_indices"],
                self.batch["topk_tail"],
                loss_mask(self.batch),
                temperature=self.kd_temperature,
                reduction="sum",
            )
        return self._logit_sums


@dataclass(frozen=True)
class TermContext:
    """What a term is built for: the teacher layer each student layer matches and the student's head count."""

    teacher_layers: tuple[int, ...]
    student_heads: int
    evaluation: bool = False
    """Build for evaluation: keep every term whose targets a run is guaranteed to have, whatever its weight."""


class Term(ABC):
    """One loss term. Subclasses set `name` and `weight` and implement `count` and `loss_sum`."""

    name: str
    weight: float

    def capture_layers(self) -> set[int]:
        """Student layers whose score inputs (q, k, v) this term reads."""
        return set()

    def needs(self) -> list[MapNeed]:
        """The cached target maps this term reads."""
        return []

    def logit_needs(self) -> tuple[float, int] | None:
        """(temperature of the logits' tail sums, top k) when this term reads the logit targets' KD part."""
        return None

    def temperature_keys(self) -> list[tuple[str, float]]:
        """Config key → τ of the temperatures it uses (named when a cache lacks their tail sums)."""
        return []

    def cache_problem(self, fingerprint: dict[str, Any]) -> str | None:
        """Why targets with `fingerprint` cannot serve this term beyond what it `needs` (None: they can)."""
        return None

    @abstractmethod
    def count(self, batch: dict[str, Any]) -> float:
        """The number of units of `batch` the term's sum runs over."""

    @abstractmethod
    def loss_sum(self, forward: StudentForward) -> Tensor:
        """Σ over the batch's units of this term's loss: fp32 scalar with autograd graph."""


@dataclass(frozen=True)
class TermSpec:
    """A term as the registry knows it: its config section and how to build it."""

    name: str
    """Its config section `distill.<name>` and its metric `loss_<name>`."""
    section: type
    """The section's dataclass; every field has a default and a docstring (the config reference shows them)."""
    build: Callable[[Any, TermContext], Term | None]
    """The term of a section (None: the term is off for this run)."""
    order: int
    """Position among the terms (the order of per-term tensors, metrics and sums)."""
    scheduled: bool = False
    """Its weight follows `distill.schedule` (the attention-transfer terms)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Deprecated flat keys of `distill` → the section's key they stand for (accepted with a warning)."""
