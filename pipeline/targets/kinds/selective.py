"""`selective` targets: the H_s teacher heads with the largest output share, each matched to one student head (the
SHD paper's "hard head selection" baseline).

The heads are chosen once per cache (`prepare`, on the first train samples: every rank and the online source choose
the same) by mean output share ‖A_h X_h‖_F / Σ_h ‖A_h X_h‖_F and recorded in the manifest (`selected_heads`, with
every head's share in `head_importance`); `attn.L<layer>.H<heads>.selective` stores their maps in head order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.ops.shd import head_importance, select_heads
from pipeline.targets.kinds.base import (
    MapSpec,
    TargetKind,
    TargetSettings,
    TeacherPass,
    layer_key,
    student_heads_problem,
)

SELECTION_SAMPLES = 16
"""Train samples on which the teacher heads are chosen (by mean output share), once per cache."""


class SelectionError(PipelineError):
    """The selective targets cannot be made for the configured head counts; the message names the key."""


class SelectiveKind(TargetKind):
    name = "selective"
    description = "the H_s teacher heads with the largest output share, each ↔ one student head"
    capture = frozenset({"circuits"})
    calibration_samples = SELECTION_SAMPLES

    def variants(self, settings: TargetSettings) -> tuple[int | None, ...]:
        return settings.head_counts

    def maps(self, layer: int, variant: int | None) -> tuple[MapSpec, ...]:
        return (MapSpec(f"attn.L{layer}.H{variant}.selective", int(variant), layer),)

    def compute(
        self, teacher_pass: TeacherPass, layer: int, variant: int | None, settings: TargetSettings
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        chosen = (settings.selected_heads or {})[layer_key(layer, int(variant))]
        (spec,) = self.maps(layer, variant)
        return {spec.name: teacher_pass.maps[layer][:, chosen]}, {}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        return student_heads_problem(variant, fingerprint)

    @torch.no_grad()
    def prepare(
        self, teacher: nn.Module, calibration_ids: Tensor, layers: tuple[int, ...], head_counts: tuple[int, ...]
    ) -> dict[str, Any]:
        """{"selected_heads": `L<layer>.H<heads>` → heads sorted by index, "head_importance": `L<layer>` → mean
        output share per teacher head} over `calibration_ids` [N, T] (every rank passes the same)."""
        num_heads = teacher.config.num_attention_heads
        too_many = [heads for heads in head_counts if heads > num_heads]
        if too_many:
            raise SelectionError(
                f"cache.head_counts / student.num_heads: selective targets pick {too_many[0]} of the teacher's "
                f"{num_heads} heads; use at most {num_heads} student heads with distill.attn.match: selective (or "
                "leave 'selective' out of cache.attn_targets)"
            )
        # transformers (through the capture) is heavy; only the cache stage and online runs choose heads.
        from pipeline.models.capture import AttentionCapture

        device = next(teacher.parameters()).device
        with AttentionCapture(teacher, layers, circuits=True) as capture:
            teacher(input_ids=calibration_ids.to(device))
        selected, importance = {}, {}
        for layer in layers:
            shares = head_importance(capture.maps[layer], capture.circuits[layer]).double().mean(0).cpu()
            importance[f"L{layer}"] = [round(value, 6) for value in shares.tolist()]
            for heads in head_counts:
                selected[layer_key(layer, heads)] = select_heads(shares, heads)
        return {"selected_heads": selected, "head_importance": importance}


KINDS = (SelectiveKind(),)
