"""A teacher's own targets as the trainer's batch, for tests of the objective: dense attention and relation maps of
teacher layers 1 and 3 (the tiny teacher's) and its top-16 logits, beside the capture the float64 references read."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.capture import AttentionCapture
from pipeline.ops.kd import IGNORE_INDEX, topk_targets
from pipeline.ops.map_losses import DenseTarget
from pipeline.targets.encoding import pack_triangle
from tests.reference_maps import relation_maps

TEACHER_LAYERS = (1, 3)


def teacher_batch(
    teacher: nn.Module, objective: Any, input_ids: torch.Tensor, *, head_mean: bool = False
) -> tuple[dict[str, Any], AttentionCapture]:
    """(the batch of `objective`'s terms: tokens, next-token labels, top-k logits, the attention term's maps — every
    other teacher head, or the mean of all with `head_mean` — and 4-head relation maps; the teacher's capture)."""
    with torch.no_grad(), AttentionCapture(teacher, list(TEACHER_LAYERS), qkv=True) as capture:
        teacher_logits = teacher(input_ids=input_ids).logits
    values, indices, tails = topk_targets(teacher_logits, 16)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    maps = {}
    for student_layer, teacher_layer in enumerate(TEACHER_LAYERS):
        teacher_maps = capture.maps[teacher_layer]
        target = teacher_maps.mean(1, keepdim=True) if head_mean else teacher_maps[:, ::2]
        maps[objective.terms[2].targets[student_layer]] = DenseTarget(pack_triangle(target))
        for relation, states in zip("qkv", capture.qkv[teacher_layer], strict=True):
            maps[f"rel.L{teacher_layer}.R4.{relation}"] = DenseTarget(pack_triangle(relation_maps(states, 4)))
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "topk_values": values,
        "topk_indices": indices,
        "topk_tail": tails[..., 0],
        "maps": maps,
    }
    return batch, capture
