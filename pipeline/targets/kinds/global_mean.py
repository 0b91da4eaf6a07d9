"""`global` targets: the mean of all teacher heads of a layer, one map whatever the student's head count (matched
against the mean of the student's heads)."""

from __future__ import annotations

from torch import Tensor

from pipeline.targets.kinds.base import MapSpec, TargetKind, TargetSettings, TeacherPass


class GlobalKind(TargetKind):
    name = "global"
    per_student_heads = False
    description = "the mean of all teacher heads ↔ the mean of all student heads, one map per layer"

    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        return (None,)

    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        return (MapSpec(f"attn.L{layer}.global", 1, layer),)

    def compute(
        self, teacher_pass: TeacherPass, layer: int, variant: int | None, settings: TargetSettings
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        (spec,) = self.maps(layer, variant)
        return {spec.name: teacher_pass.maps[layer].mean(1, keepdim=True)}, {}


KINDS = (GlobalKind(),)
