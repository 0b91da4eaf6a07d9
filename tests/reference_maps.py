"""Float64 reference formulas of the attention-map losses, written from their definitions on full [B, H, T, T] maps.

Independent of `pipeline.ops.map_losses` (which never forms a map): plain softmax, mean, power and sums, so that a
test comparing against them can fail for the definition itself. The definitions, per query row at temperature τ over
the `visible` keys (causal, minus padding and a dropped sink):

- a target map t (or a student's mean map in global mode) at τ: t restricted to the visible keys, raised to 1/τ and
  renormalised there (`softened`);
- a student head at τ: softmax(q kᵀ · scale / τ) over the visible keys;
- the global student: the mean over heads of the τ = 1 maps over the causal keys, then softened like the target (the
  same operation the cached mean teacher map goes through).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_visibility(seq_len: int, key_mask: Tensor | None = None) -> Tensor:
    """[B|1, 1, T, T] bool: key j visible to query i when j ≤ i and `key_mask[b, j]` (None: every key)."""
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, None]
    return visible if key_mask is None else visible & key_mask.bool()[:, None, None, :]


def masked_softmax(scores: Tensor, visible: Tensor) -> Tensor:
    """softmax over the visible keys of `scores` [..., T, T]; a row with no visible key is all 0."""
    return torch.nan_to_num(torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1))


def softened(maps: Tensor, temperature: float, visible: Tensor | None = None) -> Tensor:
    """Row-stochastic `maps` [..., T, T] restricted to the `visible` keys, raised to 1/τ and renormalised there; rows
    without mass stay 0. Zeros stay exact zeros with a zero gradient (x^{1/τ} has none at 0 for τ > 1)."""
    if visible is not None:
        maps = torch.where(visible, maps, 0.0)
    positive = maps > 0
    powered = torch.where(positive, (maps.clamp_min(1e-300).log() / temperature).exp(), 0.0)
    return powered / powered.sum(-1, keepdim=True).clamp_min(1e-300)


def head_maps(
    query: Tensor, key: Tensor, scale: float, temperature: float = 1.0, visible: Tensor | None = None
) -> Tensor:
    """softmax(q kᵀ · scale / τ) [B, H, T, T] over the visible keys (None: causal), keys repeated for GQA."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * scale / temperature
    return masked_softmax(scores, causal_visibility(query.shape[2]) if visible is None else visible)


def student_maps(
    query: Tensor, key: Tensor, scale: float, temperature: float, visible: Tensor, head_mean: bool = False
) -> Tensor:
    """The student's maps the loss compares at τ: per head [B, H, T, T], or with `head_mean` the mean over heads of
    the τ = 1 causal maps, softened and restricted to the visible keys [B, 1, T, T]."""
    if head_mean:
        return softened(head_maps(query, key, scale).mean(1, keepdim=True), temperature, visible)
    return head_maps(query, key, scale, temperature, visible)


def row_losses(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per-row loss [B, H, T] between maps at the loss temperature: KL(t ‖ s), Σ (s − t)², or 1 − cos(s, t)."""
    if kind == "kl":
        log_ratio = teacher.clamp_min(1e-300).log() - student.clamp_min(1e-300).log()
        return torch.where(teacher > 0, teacher * log_ratio, 0.0).sum(-1)
    if kind == "mse":
        return (student - teacher).square().sum(-1)
    cosine = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1)).clamp_min(1e-300)
    return 1 - cosine


def bucket_kl(student: Tensor, teacher: Tensor, indices: Tensor) -> Tensor:
    """Per-row KL [B, H, T] over the m + 1 buckets (the keys `indices` [B, H, T, m] and the rest) of maps at the loss
    temperature: what a top-m target with its tail sum R_τ determines exactly."""

    def buckets(maps: Tensor) -> Tensor:
        return torch.cat([maps.gather(-1, indices), maps.scatter(-1, indices, 0.0).sum(-1, keepdim=True)], dim=-1)

    target, ours = buckets(teacher), buckets(student)
    log_ratio = target.clamp_min(1e-300).log() - ours.clamp_min(1e-300).log()
    return torch.where(target > 1e-15, target * log_ratio, 0.0).sum(-1)
