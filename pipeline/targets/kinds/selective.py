"""`selective` targets: the H_s teacher heads with the largest output share, each matched to one student head (the
SHD paper's "hard head selection" baseline).

The heads are chosen once per cache (`prepare`, on the first train samples: every rank and the online source choose
the same) by mean output share ‖A_h X_h‖_F / Σ_h ‖A_h X_h‖_F and recorded in the manifest (`selected_heads`, with
every head's share in `head_importance`); `attn.L<layer>.H<heads>.selective` stores their maps in head order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.ops.matching import select_heads
from pipeline.ops.shd import importance_from_stats
from pipeline.targets.kinds.base import (
    LayerPass,
    MapSpec,
    TargetKind,
    TargetSettings,
    layer_key,
    single_heads,
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

    def solve(
        self, layer_pass: LayerPass, layer: int, variant: int | None, stats: dict, settings: TargetSettings
    ) -> Any:
        """The teacher heads chosen for `variant` student heads (`prepare`, through the settings)."""
        return (settings.selected_heads or {})[layer_key(layer, int(variant))]

    def head_weights(self, layer_pass: LayerPass, layer: int, variant: int | None, state: Any) -> dict[str, Tensor]:
        (spec,) = self.maps(layer, variant)
        batch, heads = layer_pass.query.shape[:2]
        weights = torch.zeros(batch, len(state), heads, device=layer_pass.query.device)
        weights[:, torch.arange(len(state)), torch.tensor(state)] = 1.0
        return {spec.name: weights}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        return student_heads_problem(variant, fingerprint)

    def prepare(
        self, passes: Iterable[dict[int, LayerPass]], layers: tuple[int, ...], head_counts: tuple[int, ...]
    ) -> dict[str, Any]:
        """{"selected_heads": `L<layer>.H<heads>` → heads sorted by index, "head_importance": `L<layer>` → mean
        output share per teacher head} over the calibration passes (every rank passes the same samples)."""
        shares: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for teacher_pass in passes:
            for layer in layers:
                layer_pass = teacher_pass[layer]
                too_many = [heads for heads in head_counts if heads > layer_pass.num_heads]
                if too_many:
                    raise SelectionError(
                        f"cache.head_counts / student.num_heads: selective targets pick {too_many[0]} of the "
                        f"teacher's {layer_pass.num_heads} heads; use at most {layer_pass.num_heads} student heads "
                        "with distill.attn.match: selective (or leave 'selective' out of cache.attn_targets)"
                    )
                groups = single_heads(layer_pass.num_heads)
                stats = layer_pass.statistics(groups)
                parts = [stats[group] for group in groups]
                shares[layer].append(importance_from_stats([p[0] for p in parts], [p[1] for p in parts]))
        selected, importance = {}, {}
        for layer in layers:
            mean = torch.cat(shares[layer]).double().mean(0)
            importance[f"L{layer}"] = [round(value, 6) for value in mean.tolist()]
            for heads in head_counts:
                selected[layer_key(layer, heads)] = select_heads(mean, heads)
        return {"selected_heads": selected, "head_importance": importance}


KINDS = (SelectiveKind(),)
