"""`global` targets: the mean of all teacher heads of a layer, one map whatever the student's head count (matched
against the mean of the student's heads)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.targets.kinds.base import LayerPass, MapSpec, TargetKind, TargetSettings


class GlobalKind(TargetKind):
    name = "global"
    per_student_heads = False
    description = "the mean of all teacher heads ↔ the mean of all student heads, one map per layer"

    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        return (None,)

    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        return (MapSpec(f"attn.L{layer}.global", 1, layer),)

    def head_weights(self, layer_pass: LayerPass, layer: int, variant: int | None, state: Any) -> dict[str, Tensor]:
        (spec,) = self.maps(layer, variant)
        batch, heads = layer_pass.query.shape[:2]
        return {spec.name: torch.full((batch, 1, heads), 1 / heads, device=layer_pass.query.device)}


KINDS = (GlobalKind(),)
