"""MiniLMv2 self-attention relation distillation: the baseline SHD is compared against.

MiniLMv2 sidesteps head-count mismatch differently from SHD: it concatenates all heads' queries (keys, values) into
one ``[T, H·dh]`` matrix, re-splits it into R *relation heads* chosen independently of both models' head counts, and
matches the scaled dot-product self-relations ``softmax(X_r X_rᵀ / √d_r)`` of teacher and student with a KL.
"""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


def _relation_log_probs(states: Tensor, num_relation_heads: int, key_mask: Tensor) -> Tensor:
    """Log relation distributions ``[B, R, T, T]`` (fp32) of per-head states ``[B, H, T, dh]``.

    Heads are concatenated to ``[B, T, H·dh]`` then split into R relation heads of width ``d_r = H·dh / R``;
    ``key_mask`` ``[B, 1, T, T]`` (True = may attend) applies causality and padding. Masked logits use finfo.min
    rather than -inf so that fully masked (padding) rows stay finite.
    """
    batch, heads, length, head_dim = states.shape
    width = heads * head_dim
    if width % num_relation_heads != 0:
        raise ValueError(
            f"num_relation_heads={num_relation_heads} does not divide the concatenated head width "
            f"{heads}×{head_dim}={width}"
        )
    relation_dim = width // num_relation_heads
    concatenated = states.float().transpose(1, 2).reshape(batch, length, num_relation_heads, relation_dim)
    relation_states = concatenated.transpose(1, 2)
    logits = torch.matmul(relation_states, relation_states.transpose(-1, -2)) * relation_dim**-0.5
    logits = logits.masked_fill(~key_mask, torch.finfo(torch.float32).min)
    return torch.log_softmax(logits, dim=-1)


def relation_loss(
    student_qkv: Sequence[Tensor],
    teacher_qkv: Sequence[Tensor],
    num_relation_heads: int,
    query_mask: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """MiniLMv2 Q-Q, K-K and V-V relation loss between a student and a teacher layer.

    Args:
        student_qkv: (queries, keys, values), each ``[B, H_s, T, dh_s]`` (e.g. ``AttentionCapture.qkv[layer]``).
        teacher_qkv: (queries, keys, values), each ``[B, H_t, T, dh_t]``; pass tensors without grad.
        num_relation_heads: R; must divide ``H_t·dh_t`` and ``H_s·dh_s`` for each of q, k, v.
        query_mask: ``[B, T]``, nonzero for real tokens. Padding tokens are masked as keys and their query rows
            contribute exactly 0. None means every token is real.
        reduction: ``mean`` over valid query rows, or ``sum`` over them.

    Returns:
        Scalar fp32: per query row, ``KL(teacher relation ‖ student relation)`` summed over keys (causal: a row sees
        itself and earlier tokens), averaged over the R relation heads and the three relations; then reduced.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError("student_qkv and teacher_qkv must each hold (queries, keys, values)")
    batch, _, length, _ = teacher_qkv[0].shape
    device = teacher_qkv[0].device
    for name, student, teacher in zip(("queries", "keys", "values"), student_qkv, teacher_qkv, strict=True):
        if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2] or teacher.shape[2] != length:
            raise ValueError(
                f"student {name} {tuple(student.shape)} and teacher {name} {tuple(teacher.shape)} must share batch "
                f"and sequence length ([B, H, T, dh])"
            )
    valid = torch.ones(batch, length, dtype=torch.bool, device=device) if query_mask is None else query_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    key_mask = (causal[None] & valid[:, None, :])[:, None]
    per_row = torch.zeros(batch, length, device=device)
    for student, teacher in zip(student_qkv, teacher_qkv, strict=True):
        student_log_probs = _relation_log_probs(student, num_relation_heads, key_mask)
        teacher_log_probs = _relation_log_probs(teacher, num_relation_heads, key_mask)
        # Zero masked entries before the product: p_t is 0 there, but their log-probs are ~finfo.min.
        log_ratio = torch.where(key_mask, teacher_log_probs - student_log_probs, 0.0)
        per_row = per_row + (teacher_log_probs.exp() * log_ratio).sum(-1).mean(1)
    per_row = torch.where(valid, per_row / len(student_qkv), 0.0)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / valid.sum().clamp(min=1)
