"""SHD on whole maps [B, H, T, T]: α, the importance and the squeeze of maps that exist in memory — how the paper
states it, what an analysis of a few samples holds (`benchmarks/squeeze_error.py`), and the reference the
row-block path of the cache stage (`pipeline.ops.shd`, statistics accumulated without a map) is checked against.
The solves are the same functions: the whole maps are one block of every row.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.ops.matching import SqueezeMethod, head_groups, squeeze_groups
from pipeline.ops.shd import (
    MAX_EXACT_GROUP_SIZE,
    Circuits,
    GroupStats,
    accumulate_group_stats,
    group_alphas_from_stats,
    importance_from_stats,
    new_group_stats,
    pairwise_alphas_from_stats,
    squeeze_alphas,
    squeeze_rows,
)


def _whole_map_stats(maps: Tensor, circuits: Circuits, heads: Sequence[int]) -> tuple[GroupStats, Tensor]:
    """(statistics, output maps) of teacher heads `heads` over whole maps [B, H, T, T]: one block of every row."""
    group = circuits.group(heads)
    stats = accumulate_group_stats(new_group_stats(group, len(heads)), maps[:, list(heads)], group.values)
    return stats, group.outputs


def as_circuits(circuits: Tensor | Circuits, maps: Tensor) -> Circuits:
    """`circuits` (dense [B, H, T, d] or factored) as `Circuits`, checked against `maps` [B, H, T, T]."""
    batch, heads, seq = maps.shape[:3]
    if isinstance(circuits, Tensor):
        if circuits.dim() != 4 or circuits.shape[:3] != maps.shape[:3]:
            raise ValueError(f"circuits {tuple(circuits.shape)}: expected [{batch}, {heads}, {seq}, d] like the maps")
        return Circuits.from_dense(circuits)
    values, output, kv_heads = circuits
    if (
        values.dim() != 4
        or (values.shape[0], values.shape[2]) != (batch, seq)
        or output.dim() != 3
        or output.shape[:2] != (heads, values.shape[3])
        or len(kv_heads) != heads
        or not all(0 <= kv < values.shape[1] for kv in kv_heads)
    ):
        raise ValueError(
            f"circuits with values {tuple(values.shape)}, output {tuple(output.shape)}, {len(kv_heads)} kv_heads: "
            f"expected values [{batch}, H_kv, {seq}, dh], output [{heads}, dh, d] and {heads} kv_heads in [0, H_kv)"
        )
    return circuits


def _check_maps(maps: Tensor) -> None:
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps {tuple(maps.shape)}: expected [B, H, T, T]")


def group_alphas(maps: Tensor, circuits: Tensor | Circuits, max_exact_group_size: int = MAX_EXACT_GROUP_SIZE) -> Tensor:
    """`group_alphas_from_stats` of whole maps [B, r, T, T] with circuits (dense [B, r, T, d] or `Circuits`)."""
    _check_maps(maps)
    stats, outputs = _whole_map_stats(maps.float(), as_circuits(circuits, maps), range(maps.shape[1]))
    return group_alphas_from_stats(stats, outputs, max_exact_group_size)


def pairwise_alphas(maps: Tensor, circuits: Tensor | Circuits, num_student_heads: int) -> Tensor:
    """`pairwise_alphas_from_stats` of whole maps [B, H_t, T, T] with circuits → α [B, H_t]."""
    _check_maps(maps)
    circuits = as_circuits(circuits, maps)
    groups = squeeze_groups(maps.shape[1], num_student_heads, "shd_pairwise")
    parts = [_whole_map_stats(maps.float(), circuits, group) for group in groups]
    return pairwise_alphas_from_stats([stats for stats, _ in parts], [out for _, out in parts], groups, maps.shape[1])


def head_importance(maps: Tensor, circuits: Tensor | Circuits) -> Tensor:
    """`importance_from_stats` of whole maps [B, H, T, T] with circuits → [B, H]: what the `selective` targets and
    carving a student from the teacher rank heads by."""
    _check_maps(maps)
    circuits = as_circuits(circuits, maps)
    parts = [_whole_map_stats(maps.float(), circuits, [head]) for head in range(maps.shape[1])]
    return importance_from_stats([stats for stats, _ in parts], [out for _, out in parts])


def squeeze_heads(
    maps: Tensor, circuits: Tensor | Circuits | None, num_student_heads: int, method: SqueezeMethod = "shd"
) -> tuple[Tensor, Tensor]:
    """Squeeze whole teacher maps [B, H_t, T, T] into student targets [B, H_s, T, T] along
    `matching.squeeze_groups` → (squeezed fp32, α [B, H_t] fp32: the weight of each teacher head inside its group,
    summing to 1 over each group; all ones when H_s >= H_t). "shd" and "shd_pairwise" need `circuits`."""
    _check_maps(maps)
    num_teacher_heads = maps.shape[1]
    groups = squeeze_groups(num_teacher_heads, num_student_heads, method)
    stats = outputs = None
    if method != "uniform" and num_student_heads < num_teacher_heads:
        if circuits is None:
            raise ValueError(
                f"method={method!r} squeezing {num_teacher_heads} -> {num_student_heads} heads needs the "
                "value-output circuits [B, H_t, T, d]; pass circuits or use method='uniform'"
            )
        circuits = as_circuits(circuits, maps)
        parts = [_whole_map_stats(maps.float(), circuits, group) for group in groups]
        stats, outputs = [part[0] for part in parts], [part[1] for part in parts]
    alphas = squeeze_alphas(stats, outputs, groups, num_teacher_heads, method, maps.shape[0])
    return squeeze_rows(maps, alphas, groups), alphas


def reconstruction_error(
    maps: Tensor,
    circuits: Tensor | Circuits,
    num_student_heads: int,
    alphas: Tensor,
    groups: list[list[int]] | None = None,
) -> Tensor:
    """SHD objective summed over groups: Σ_g ‖Σ_{i∈g} A_i X_i − (Σ_{i∈g} α_i A_i) Σ_{i∈g} X_i‖_F².

    `maps` [B, H_t, T, T], `circuits` [B, H_t, T, d] (a `Circuits` is made dense), `alphas` [B, H_t] as returned by
    `squeeze_heads` → [B] fp64 (for logging and for comparing α choices). `groups`: the grouping the α belong to
    (default `head_groups`). Computed directly from the dense circuits: the reference the statistics are checked
    against.
    """
    num_teacher_heads = maps.shape[1]
    if groups is None:
        groups = head_groups(num_teacher_heads, num_student_heads)
    elif len(groups) != num_student_heads or not all(
        group and all(0 <= head < num_teacher_heads for head in group) for group in groups
    ):
        raise ValueError(
            f"groups {groups}: expected {num_student_heads} non-empty lists of teacher heads in "
            f"[0, {num_teacher_heads})"
        )
    if isinstance(circuits, Circuits):
        circuits = circuits.dense()
    maps, circuits, alphas = maps.float(), circuits.float(), alphas.float()
    error = maps.new_zeros(maps.shape[0], dtype=torch.float64)
    for group in groups:
        group_maps, group_circuits = maps[:, group], circuits[:, group]
        target = (group_maps @ group_circuits).sum(1)
        merged = torch.einsum("br,brqk->bqk", alphas[:, group], group_maps)
        residual = target - merged @ group_circuits.sum(1)
        error = error + residual.square().sum((-2, -1), dtype=torch.float64)
    return error
