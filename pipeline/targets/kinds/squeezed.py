"""Headwise targets: each teacher layer's H_t heads squeezed into one map per student head (SHD).

Three kinds share this module, one per squeeze (`pipeline.ops.shd`): `shd` (α solved exactly per group from the
value–output circuits), `shd_pairwise` (the paper's progressive pairwise merge) and `uniform` (α = 1/r, the
constant-merge baseline). α comes from statistics of every query row (`solve`), then every stored row is the α-weighted
sum of its group's teacher rows. Each stores `attn.L<layer>.H<heads>.<squeeze>` (H student heads) and the α behind
it, `alpha.L<layer>.H<heads>.<squeeze>` [N, H_t]: each teacher head's weight inside its group.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pipeline.ops.matching import squeeze_groups
from pipeline.ops.shd import GroupStats, squeeze_alphas, squeeze_weights
from pipeline.targets.kinds.base import (
    ExtraSpec,
    HeadGroup,
    LayerPass,
    MapSpec,
    TargetKind,
    TargetSettings,
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

    def _groups(self, variant: int | None, num_heads: int) -> list[list[int]]:
        return squeeze_groups(num_heads, int(variant), self.name)

    def stats_groups(self, variant: int | None, num_heads: int) -> tuple[HeadGroup, ...]:
        if self.name == "uniform" or int(variant) >= num_heads:
            return ()
        return tuple(tuple(group) for group in self._groups(variant, num_heads))

    def overlap_groups(self, variant: int | None, num_heads: int) -> tuple[HeadGroup, ...]:
        """The pair α reads the overlaps: every group of the pairwise merge, and the groups of two of `shd`."""
        groups = self.stats_groups(variant, num_heads)
        return groups if self.name == "shd_pairwise" else tuple(group for group in groups if len(group) == 2)

    def solve(
        self,
        layer_pass: LayerPass,
        layer: int,
        variant: int | None,
        stats: dict[HeadGroup, tuple[GroupStats, Tensor]],
        settings: TargetSettings,
    ) -> Any:
        """(the squeeze's groups, α [B, H_t]) from the groups' statistics over every row."""
        num_heads, batch = layer_pass.num_heads, layer_pass.query.shape[0]
        groups = self._groups(variant, num_heads)
        needed = self.stats_groups(variant, num_heads)
        group_stats = [stats[group][0] for group in needed] or None
        outputs = [stats[group][1] for group in needed] or None
        return groups, squeeze_alphas(group_stats, outputs, groups, num_heads, self.name, batch)

    def head_weights(self, layer_pass: LayerPass, layer: int, variant: int | None, state: Any) -> dict[str, Tensor]:
        groups, alphas = state
        (spec,) = self.maps(layer, variant)
        return {spec.name: squeeze_weights(alphas.to(layer_pass.query.device), groups, layer_pass.num_heads)}

    def extra_values(self, layer: int, variant: int | None, state: Any) -> dict[str, Tensor]:
        (alpha,) = self.extras(layer, variant, state[1].shape[1])
        return {alpha.name: state[1].float()}

    def variant_problem(self, variant: int | None, fingerprint: dict[str, Any]) -> str | None:
        return student_heads_problem(variant, fingerprint)


KINDS = (
    SqueezedKind(
        "shd", "headwise, SHD α solved exactly per group from the value–output circuits", frozenset({"circuits"})
    ),
    SqueezedKind("shd_pairwise", "headwise, the SHD paper's progressive pairwise merge", frozenset({"circuits"})),
    SqueezedKind("uniform", "headwise, α = 1/r (the constant-merge baseline)", frozenset()),
)
