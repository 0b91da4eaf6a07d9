"""`ce`: the task cross-entropy of the next token, summed over labels ≠ -100 at the trained positions (`distill.ce`;
of chat data, the reply tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.errors import require
from pipeline.objective.terms.base import StudentForward, Term, TermContext, TermSpec
from pipeline.ops.kd import IGNORE_INDEX
from pipeline.targets.logits import trained_labels


@dataclass
class CrossEntropySection:
    """The task cross-entropy (`ce`)."""

    weight: float = 1.0
    """Weight of the task cross-entropy."""

    def validate(self, key: str) -> None:
        require(self.weight >= 0, f"{key}.weight", self.weight, "a loss weight ≥ 0")


@dataclass
class CrossEntropy(Term):
    """Task cross-entropy of the next token, summed over labels ≠ -100."""

    weight: float
    name: str = "ce"

    def count(self, batch: dict[str, Any]) -> float:
        return float((trained_labels(batch) != IGNORE_INDEX).sum())

    def loss_sum(self, forward: StudentForward) -> Tensor:
        return forward.logit_sums()[0]


def build(section: CrossEntropySection, context: TermContext) -> Term:
    """Always built: CE and KD share one pass over the vocabulary whatever their weights."""
    return CrossEntropy(section.weight)


SPEC = TermSpec("ce", CrossEntropySection, build, order=0, aliases={"w_ce": "weight"})
