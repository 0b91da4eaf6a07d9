"""Linear fill of the dropped layers (ReplaceMe-style, training-free): after the carve, each kept layer that stands
for dropped teacher layers gets a ridge-fitted linear map, fused into its MLP's output projection, so that its output
approximates the teacher's hidden state where its segment ends. Optional (`student.carve.fill: linear`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipeline.students.blocks import attached_hooks, decoder_layers, mlp_output_projection
from pipeline.students.carve import CarveError, CarvePlan


@dataclass(frozen=True)
class SegmentFill:
    """The linear map fitted into one student layer that stands for several teacher layers."""

    student_layer: int
    teacher_layers: tuple[int, int]
    """First and last teacher layer the student layer stands for (its own and the dropped ones after it)."""
    error_before: float
    """‖block output − teacher hidden state‖ / ‖teacher hidden state‖ on the calibration batches, before the fill."""
    error_after: float

    def describe(self) -> dict[str, Any]:
        return {
            "student_layer": self.student_layer,
            "teacher_layers": list(self.teacher_layers),
            "relative_error": [round(self.error_before, 6), round(self.error_after, 6)],
        }


def segment_ends(layers: list[int], num_teacher_layers: int) -> list[int]:
    """For each kept teacher layer, the teacher layer where its segment ends (exclusive): the next kept layer, the
    teacher's depth for the last one. Kept layers must increase: a segment is a run of consecutive teacher layers."""
    if any(later <= earlier for earlier, later in itertools.pairwise(layers)):
        raise CarveError(
            f"student.carve.fill: linear replaces the teacher layers between kept ones, so the kept teacher layers "
            f"must increase; got {layers}"
        )
    return [*layers[1:], num_teacher_layers]


def ridge_map(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """argmin_T ‖M T − D‖² + ρ̄ ‖T − I‖² = (MᵀM + ρ̄ I)⁻¹ (MᵀD + ρ̄ I), from `gram` MᵀM and `cross` MᵀD (float64),
    with ρ̄ = `ridge` · tr(MᵀM) / d: the shrinkage is toward the identity (no change) and scale-free."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    strength = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + strength * eye, cross + strength * eye)


def _apply_output_map(projection: nn.Module, transform: Tensor) -> None:
    """Make the MLP output projection write y T instead of y (LLaMA nn.Linear [d, I], GPT-2 Conv1D [I, d])."""
    weight = projection.weight
    transform = transform.to(device=weight.device)
    if isinstance(projection, nn.Linear):
        weight.copy_((transform.T @ weight.double()).to(weight.dtype))
    else:
        weight.copy_((weight.double() @ transform).to(weight.dtype))
    if getattr(projection, "bias", None) is not None:
        projection.bias.copy_((projection.bias.double() @ transform).to(projection.bias.dtype))


@torch.no_grad()
def fill_dropped_layers(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    plan: CarvePlan,
    input_ids: Tensor,
    batch_size: int,
    ridge: float,
) -> list[SegmentFill]:
    """Fit, in place, each carved layer that stands for dropped teacher layers so that its output approximates the
    teacher's hidden state where its segment ends (ReplaceMe, Shopkhoev et al. 2025: a linear map estimated on
    calibration data replaces the pruned blocks, fused into the preceding MLP's output projection).

    Student layer j copies teacher layer m(j); the teacher layers after it up to the next kept one are gone. With
    M its MLP output, R the rest of its output (residual + attention) and Y the teacher's hidden state after its last
    dropped layer (the kept hidden channels), T = `ridge_map` of ‖M T + R − Y‖², then W_out ← W_out T. Layers are
    fitted in order on the student's own activations, so each map sees what the earlier fills made. A layer whose
    segment is itself alone is left as carved (a carve that keeps every layer stays exact).
    """
    teacher_layers, student_layers = decoder_layers(teacher), decoder_layers(student)
    ends = segment_ends(plan.layers, len(teacher_layers))
    fitted = [j for j, (start, end) in enumerate(zip(plan.layers, ends, strict=True)) if end - start > 1]
    if not fitted:
        return []
    teacher_device = next(teacher.parameters()).device
    student_device = next(student.parameters()).device
    was_training = student.training
    student.eval().to(teacher_device)
    hidden = plan.hidden.to(teacher_device)
    batches = [
        input_ids[start : start + batch_size].to(device=teacher_device, dtype=torch.long)
        for start in range(0, len(input_ids), batch_size)
    ]
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    # The teacher's states at the segment ends, kept in fp32 (exact for a bf16 teacher, half of fp64's memory).
    targets: dict[int, list[Tensor]] = {j: [] for j in fitted}
    handles = [teacher_layers[ends[j] - 1].register_forward_hook(keep(f"teacher{j}")) for j in fitted]
    with attached_hooks(handles):
        for batch in batches:
            teacher(input_ids=batch, use_cache=False)
            for j in fitted:
                targets[j].append(captured.pop(f"teacher{j}").index_select(-1, hidden).float())
    fills = []
    for j in fitted:
        projection = mlp_output_projection(student_layers[j])
        handles = [
            projection.register_forward_hook(keep("mlp")),
            student_layers[j].register_forward_hook(keep("block")),
        ]
        width = hidden.numel()
        gram = torch.zeros(width, width, dtype=torch.float64, device=teacher_device)
        cross = torch.zeros_like(gram)
        sums = torch.zeros(3, dtype=torch.float64, device=teacher_device)  # ‖D‖², ‖Y‖², ‖M − D‖² (the carve's error)
        with attached_hooks(handles):
            for batch, stored in zip(batches, targets[j], strict=True):
                student(input_ids=batch, use_cache=False)
                mlp = captured.pop("mlp").double().reshape(-1, width)
                rest = captured.pop("block").double().reshape(-1, width) - mlp
                target = stored.double().reshape(-1, width)
                wanted = target - rest
                gram += mlp.T @ mlp
                cross += mlp.T @ wanted
                sums += torch.stack([wanted.square().sum(), target.square().sum(), (mlp - wanted).square().sum()])
        transform = ridge_map(gram, cross, ridge)
        # ‖M T − D‖² = tr(Tᵀ G T) − 2 tr(Tᵀ C) + ‖D‖², with G = MᵀM, C = MᵀD.
        residual = (transform * (gram @ transform)).sum() - 2 * (transform * cross).sum() + sums[0]
        scale = sums[1].sqrt()
        before = (sums[2].sqrt() / scale).item()
        after = (residual.clamp_min(0).sqrt() / scale).item()
        _apply_output_map(projection, transform)
        fills.append(SegmentFill(j, (plan.layers[j], ends[j] - 1), before, after))
    student.to(student_device)
    student.train(was_training)
    return fills
