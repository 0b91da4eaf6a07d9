"""`rel`: MiniLMv2 self-relation distillation (`distill.rel`). Per student layer j, KL between the teacher's cached
Q-Q, K-K and V-V relation maps of teacher layer m(j) and the student's, over R relation heads (τ = 1), averaged over
the three relations and matched layers; summed over query rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.errors import require
from pipeline.objective.terms.base import StudentForward, Term, TermContext, TermSpec
from pipeline.ops.relations import relation_loss_sum, states_for_relations
from pipeline.targets.needs import MapNeed


@dataclass
class RelationSection:
    """MiniLMv2 Q-Q/K-K/V-V relations (`rel`); its teacher maps are cached like attention."""

    weight: float = 0.0
    """Weight of the relation term (0: off)."""
    heads: int = 4
    """Relation heads R: must divide the teacher's and the student's H·head_dim."""

    def validate(self, key: str) -> None:
        require(self.weight >= 0, f"{key}.weight", self.weight, "a loss weight ≥ 0")
        require(self.heads >= 1, f"{key}.heads", self.heads, "an integer ≥ 1")


@dataclass
class RelationKD(Term):
    """MiniLMv2 relations over R relation heads (τ = 1), averaged over relations and matched layers; summed over
    query rows."""

    weight: float
    needed: tuple[MapNeed, ...]
    """The relation maps of each student layer j (one need each: its q, k and v maps)."""
    relation_heads: int
    name: str = "rel"

    @property
    def targets(self) -> tuple[tuple[str, ...], ...]:
        """(q, k, v) relation map names of each student layer."""
        return tuple(tuple(spec.name for spec in need.specs()) for need in self.needed)

    def capture_layers(self) -> set[int]:
        return set(range(len(self.needed)))

    def needs(self) -> list[MapNeed]:
        return list(self.needed)

    def count(self, batch: dict[str, Any]) -> float:
        return float(batch["input_ids"].numel())

    def loss_sum(self, forward: StudentForward) -> Tensor:
        total = None
        for layer, names in enumerate(self.targets):
            inputs = forward.inputs[layer]
            states = states_for_relations(inputs.query, inputs.key, inputs.value)
            targets = [forward.batch["maps"][name] for name in names]
            part = relation_loss_sum(states, targets, self.relation_heads)
            total = part if total is None else total + part
        return total / len(self.targets)


def build(section: RelationSection, context: TermContext) -> Term | None:
    """On when weighted (a run without relation targets cannot evaluate them)."""
    if section.weight <= 0:
        return None
    needed = tuple(MapNeed("relations", layer, section.heads, 1.0) for layer in context.teacher_layers)
    return RelationKD(section.weight, needed, section.heads)


SPEC = TermSpec(
    "rel",
    RelationSection,
    build,
    order=3,
    scheduled=True,
    aliases={"w_rel": "weight", "rel_heads": "heads"},
)
