"""Headwise targets: each teacher layer's H_t heads squeezed into one map per student head (SHD).

Three kinds share this module, one per squeeze (`pipeline.ops.shd.squeeze_heads`): `shd` (α solved exactly per
group from the value–output circuits), `shd_pairwise` (the paper's progressive pairwise merge) and `uniform` (α =
1/r, the constant-merge baseline). Each stores `attn.L<layer>.H<heads>.<squeeze>` (H student heads) and the α behind
it, `alpha.L<layer>.H<heads>.<squeeze>` [N, H_t]: each teacher head's weight inside its group.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pipeline.ops.shd import squeeze_heads
from pipeline.targets.kinds.base import (
    ExtraSpec,
    MapSpec,
    TargetKind,
    TargetSettings,
    TeacherPass,
    layer_key,
    student_heads_problem,
)


class SqueezedKind(TargetKind):
    """The teacher's heads squeezed into the student's with one squeeze method (the kind's name)."""

    def __init__(self, name: str, description: str, capture: frozenset[str]) -> None:
        self.name = name
        self.description = description
        self.capture = capture

    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        return settings.head_counts

    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        return (MapSpec(f"attn.L{layer}.H{variant}.{self.name}", int(variant), layer),)

    def extras(self, layer: int, variant: int | None, teacher_heads: int) -> tuple[ExtraSpec, ...]:
        key = f"{layer_key(layer, int(variant))}.{self.name}"
        return (ExtraSpec(f"alpha.{key}", teacher_heads, layer, "alpha", key),)

    def compute(
        self, teacher_pass: TeacherPass, layer: int, variant: int | None, settings: TargetSettings
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        circuits = teacher_pass.circuits.get(layer)
        squeezed, alphas = squeeze_heads(teacher_pass.maps[layer], circuits, int(variant), method=self.name)
        (spec,) = self.maps(layer, variant)
        (alpha,) = self.extras(layer, variant, alphas.shape[1])
        return {spec.name: squeezed}, {alpha.name: alphas.float()}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        return student_heads_problem(variant, fingerprint)


KINDS = (
    SqueezedKind(
        "shd", "headwise, SHD α solved exactly per group from the value–output circuits", frozenset({"circuits"})
    ),
    SqueezedKind("shd_pairwise", "headwise, the SHD paper's progressive pairwise merge", frozenset({"circuits"})),
    SqueezedKind("uniform", "headwise, α = 1/r (the constant-merge baseline)", frozenset()),
)
