"""`relations` targets: MiniLMv2's Q-Q, K-K and V-V self-relation maps of a layer over R relation heads
(`pipeline.ops.relations`), stored as `rel.L<layer>.R<R>.q|k|v` (R heads each); R is `distill.rel.heads`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pipeline.ops.relations import RELATIONS, relation_maps
from pipeline.targets.kinds.base import MapSpec, TargetKind, TargetSettings, TeacherPass


class RelationsKind(TargetKind):
    name = "relations"
    per_student_heads = False
    description = "MiniLMv2 Q-Q/K-K/V-V relation maps over R relation heads"
    capture = frozenset({"qkv"})

    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        return (settings.rel_heads,)

    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        return tuple(MapSpec(f"rel.L{layer}.R{variant}.{relation}", int(variant), layer) for relation in RELATIONS)

    def compute(
        self, teacher_pass: TeacherPass, layer: int, variant: int | None, settings: TargetSettings
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        states = teacher_pass.qkv[layer]
        specs = self.maps(layer, variant)
        return {spec.name: relation_maps(state, int(variant)) for spec, state in zip(specs, states, strict=True)}, {}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        if fingerprint.get("rel_heads") == variant:
            return None
        return (
            f"fingerprint field 'rel_heads' is {fingerprint.get('rel_heads')!r}, the run needs relation maps over "
            f"{variant} relation heads (distill.rel.heads); re-run `distill cache` into a new cache.output_dir"
        )


KINDS = (RelationsKind(),)
