"""`rel`: MiniLMv2 self-relation distillation (`distill.rel`). Per student layer j, KL between the teacher's cached
Q-Q, K-K and V-V relation maps of teacher layer m(j) (the `relations` target kind) and the student's, over R relation
heads (τ = 1), averaged over the three relations and matched layers; summed over the trained query rows (of chat
data, those that predict a reply token). The student's relation maps are recomputed from its captured q, k and v in
row blocks (`ops.map_losses.map_loss_sum`), never formed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.errors import require
from pipeline.objective.terms.base import StudentForward, Term, TermContext, TermSpec
from pipeline.ops.map_losses import MapTarget, map_loss_sum
from pipeline.targets.kinds.relations import RELATIONS, relation_scale, relation_states
from pipeline.targets.needs import MapNeed, stored_row_count, trained_rows


def relation_loss_sum(
    student_qkv: Sequence[Tensor],
    targets: Sequence[MapTarget],
    num_relation_heads: int,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Σ over valid query rows of KL(teacher relation ‖ student relation), averaged over the R relation heads and the
    three relations → fp32 scalar with graph into the student states.

    `student_qkv`: (queries, keys, values), each ``[B, H_s, T, dh_s]`` (keys and values repeated per query head);
    `targets`: the teacher's q, k and v relation maps for the same R (dense or top-m, τ = 1; see `relation_maps`).
    R must divide H_s·dh_s (and the teacher's width, which the cache checked).
    """
    if len(student_qkv) != 3 or len(targets) != 3:
        raise ValueError("student_qkv and targets must each hold the (queries, keys, values) relations")
    total = None
    for states, target in zip(student_qkv, targets, strict=True):
        relation = relation_states(states, num_relation_heads)
        part = map_loss_sum(
            relation,
            relation,
            relation_scale(relation),
            target,
            query_mask=query_mask,
            key_mask=key_mask,
        )
        total = part if total is None else total + part
    return total / len(RELATIONS)


def repeat_kv(states: Tensor, num_heads: int) -> Tensor:
    """Keys or values ``[B, H_kv, T, dh]`` repeated per query head → ``[B, H, T, dh]`` (GQA as attention sees it)."""
    return states if states.shape[1] == num_heads else states.repeat_interleave(num_heads // states.shape[1], dim=1)


def states_for_relations(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(queries, keys, values) ``[B, H, T, dh]`` each, keys and values repeated per query head."""
    heads = query.shape[1]
    return query, repeat_kv(key, heads), repeat_kv(value, heads)


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
        return stored_row_count(batch)

    def loss_sum(self, forward: StudentForward) -> Tensor:
        total = None
        for layer, names in enumerate(self.targets):
            inputs = forward.inputs[layer]
            states = states_for_relations(inputs.query, inputs.key, inputs.value)
            targets = [forward.batch["maps"][name] for name in names]
            part = relation_loss_sum(states, targets, self.relation_heads, query_mask=trained_rows(forward.batch))
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
