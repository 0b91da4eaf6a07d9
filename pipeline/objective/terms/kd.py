"""`kd`: logit distillation, τ² · KL over the teacher's top k tokens plus one tail bucket, exact at every cached τ
(`distill.kd`); summed over the trained positions (every position of text data; of chat data those that predict a
reply token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.errors import require
from pipeline.objective.terms.base import StudentForward, Term, TermContext, TermSpec
from pipeline.targets.logits import loss_mask


@dataclass
class LogitKDSection:
    """Logit distillation (`kd`) and the teacher logits every cache keeps."""

    weight: float = 1.0
    """Weight of the logit KD term."""
    temperature: float = 1.0
    """Temperature of the logit KD term, scaled by τ²; must be in `cache.temperatures` (the cached tail sums)."""
    top_k: int = 64
    """Teacher logits kept per token (top-k log-probs plus the tail sums)."""

    def validate(self, key: str) -> None:
        require(self.weight >= 0, f"{key}.weight", self.weight, "a loss weight ≥ 0")
        require(self.temperature > 0, f"{key}.temperature", self.temperature, "a temperature > 0")
        require(self.top_k >= 1, f"{key}.top_k", self.top_k, "an integer ≥ 1")


@dataclass
class LogitKD(Term):
    """τ² · KL over the teacher's top k + one tail bucket; summed over positions."""

    weight: float
    temperature: float
    top_k: int
    name: str = "kd"

    def logit_needs(self) -> tuple[float, int] | None:
        return self.temperature, self.top_k

    def temperature_keys(self) -> list[tuple[str, float]]:
        return [("distill.kd.temperature", self.temperature)]

    def count(self, batch: dict[str, Any]) -> float:
        return float(loss_mask(batch).sum())

    def loss_sum(self, forward: StudentForward) -> Tensor:
        return forward.logit_sums()[1]


def build(section: LogitKDSection, context: TermContext) -> Term:
    """Always built (its pass is shared with CE; eval reports it whatever the weight)."""
    return LogitKD(section.weight, section.temperature, section.top_k)


SPEC = TermSpec(
    "kd",
    LogitKDSection,
    build,
    order=1,
    aliases={"w_kd": "weight", "kd_temperature": "temperature", "top_k": "top_k"},
)
