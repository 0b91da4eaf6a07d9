"""Reference logit distillation for tests: the full-vocabulary KD by the book, against which the pipeline's top-k
KD (`pipeline.ops.kd.logit_losses`) is checked."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) over the full vocabulary, 0·log 0 = 0 on the teacher side.

    `student_logits`, `teacher_logits` [B, T, V]; `mask` [B, T] bool (True = distil this position). Reduced over the
    masked positions: their sum (`"sum"`) or mean (`"mean"`, 0 without any).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    probs = teacher.exp()
    present = probs > 0
    student = torch.where(torch.isneginf(student), math.log(torch.finfo(torch.float32).tiny), student)
    terms = torch.where(present, probs * (torch.where(present, teacher, 0.0) - student), 0.0)
    per_position = terms.sum(-1) * temperature**2
    total = torch.where(mask, per_position, 0.0).sum()
    return total if reduction == "sum" else total / mask.sum().clamp_min(1)
