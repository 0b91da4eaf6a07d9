"""MiniLMv2 relations: teacher maps cached like attention targets, the student loss from scores against a
loop-by-loop reference, head-count independence, masking, errors."""

import math

import pytest
import torch
from torch import Tensor

from pipeline.objective.terms.relations import relation_loss_sum
from pipeline.ops.map_losses import DenseTarget, SparseTarget
from pipeline.targets.encoding import pack_triangle
from pipeline.targets.kinds.relations import relation_maps


def _qkv(batch: int, heads: int, length: int, head_dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3))


def _relation_heads(states: Tensor, relations: int) -> list[Tensor]:
    """One sequence's ``[H, T, dh]`` states as R relation heads of ``[T, H·dh / R]``."""
    concatenated = states.transpose(0, 1).reshape(states.shape[1], -1)
    width = concatenated.shape[1] // relations
    return [concatenated[:, r * width : (r + 1) * width] for r in range(relations)]


def _reference(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], relations: int, mask: Tensor) -> Tensor:
    """Row-by-row MiniLMv2 loss, mean over valid query rows: the definition, written as loops."""
    total, rows = torch.zeros(()), 0
    batch, _, length, _ = teacher[0].shape
    for b in range(batch):
        for i in range(length):
            if not mask[b, i]:
                continue
            rows += 1
            keys = [j for j in range(i + 1) if mask[b, j]]
            for student_states, teacher_states in zip(student, teacher, strict=True):
                student_heads = _relation_heads(student_states[b], relations)
                teacher_heads = _relation_heads(teacher_states[b], relations)
                for student_r, teacher_r in zip(student_heads, teacher_heads, strict=True):
                    student_logits = torch.stack([student_r[i] @ student_r[j] for j in keys])
                    teacher_logits = torch.stack([teacher_r[i] @ teacher_r[j] for j in keys])
                    log_q = torch.log_softmax(student_logits / math.sqrt(student_r.shape[1]), 0)
                    log_p = torch.log_softmax(teacher_logits / math.sqrt(teacher_r.shape[1]), 0)
                    total = total + (log_p.exp() * (log_p - log_q)).sum() / (3 * relations)
    return total / rows


def _dense(teacher: tuple[Tensor, ...], relations: int, mask: Tensor | None) -> list[DenseTarget]:
    """The teacher's relation maps as the cache stores them (packed triangle)."""
    key_mask = None if mask is None else mask.bool()
    return [DenseTarget(pack_triangle(relation_maps(states, relations, key_mask))) for states in teacher]


def relation_loss(student, teacher, relations, mask=None):
    """Mean over valid query rows of our relation loss, against dense cached teacher maps."""
    key_mask = None if mask is None else mask.bool()
    total = relation_loss_sum(student, _dense(teacher, relations, mask), relations, key_mask, key_mask)
    rows = teacher[0].shape[0] * teacher[0].shape[2] if mask is None else int(mask.sum())
    return total / max(rows, 1)


def test_matches_reference_with_different_head_counts_and_padding() -> None:
    student = _qkv(2, 3, 6, 8, seed=0)  # 3 heads × 8 = 24 = 4 relation heads of 6
    teacher = _qkv(2, 9, 6, 8, seed=1)  # 9 heads × 8 = 72 = 4 relation heads of 18
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    loss = relation_loss(student, teacher, 4, mask)
    assert loss > 0
    torch.testing.assert_close(loss, _reference(student, teacher, 4, mask), rtol=1e-5, atol=1e-6)


def test_top_m_relation_targets_with_m_equal_to_t_give_the_dense_loss() -> None:
    student = _qkv(2, 3, 6, 8, seed=11)
    teacher = _qkv(2, 9, 6, 8, seed=12)
    sparse = []
    for states in teacher:
        maps = relation_maps(states, 4)
        values, indices = maps.topk(6, dim=-1)
        sparse.append(SparseTarget(values, indices, maps.scatter(-1, indices, 0.0).sum(-1)))
    dense = relation_loss_sum(student, _dense(teacher, 4, None), 4)
    torch.testing.assert_close(relation_loss_sum(student, sparse, 4), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense / 12, _reference(student, teacher, 4, torch.ones(2, 6)), rtol=1e-5, atol=1e-6)


def test_zero_for_identical_states_whatever_the_head_split() -> None:
    teacher = _qkv(2, 9, 7, 8, seed=2)
    assert relation_loss(teacher, teacher, 4).abs() < 1e-6
    # The same concatenated states split as 6 heads × 12: relations see [T, 72] either way.
    resplit = tuple(x.transpose(1, 2).reshape(2, 7, 6, 12).transpose(1, 2) for x in teacher)
    assert relation_loss(resplit, teacher, 4).abs() < 1e-6
    assert relation_loss(resplit, teacher, 3).abs() < 1e-6


def test_padding_rows_contribute_nothing() -> None:
    student = _qkv(2, 3, 6, 8, seed=3)
    teacher = _qkv(2, 9, 6, 8, seed=4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loss = relation_loss(student, teacher, 4, mask)
    padding = ~mask.bool()
    noise = _qkv(2, 9, 6, 8, seed=5)

    def perturbed(states: tuple[Tensor, ...], heads: int) -> tuple[Tensor, ...]:
        return tuple(x + 10 * n[:, :heads] * padding[:, None, :, None] for x, n in zip(states, noise, strict=True))

    torch.testing.assert_close(relation_loss(perturbed(student, 3), perturbed(teacher, 9), 4, mask), loss)
    nothing_valid = torch.zeros_like(mask)
    assert relation_loss(student, teacher, 4, nothing_valid) == 0


def test_gradients_are_finite_and_reach_the_student() -> None:
    student = tuple(x.requires_grad_() for x in _qkv(2, 3, 6, 8, seed=6))
    teacher = _qkv(2, 9, 6, 8, seed=7)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    relation_loss(student, teacher, 4, mask).backward()
    for states in student:
        assert torch.isfinite(states.grad).all()
        assert states.grad[1].abs().sum() > 0
        assert (states.grad[0, :, :3] == 0).all()


def test_errors_name_the_argument() -> None:
    student = _qkv(1, 3, 4, 8, seed=8)
    teacher = _qkv(1, 9, 4, 8, seed=9)
    with pytest.raises(ValueError, match="num_relation_heads=5"):
        relation_maps(teacher[0], 5)
    with pytest.raises(ValueError, match="num_relation_heads=9"):
        relation_loss_sum(student, _dense(teacher, 9, None), 9)  # divides 72 but not 24
    with pytest.raises(ValueError, match=r"dense target \(1, 4, 10\): expected .* = \(1, 4, 15\)"):
        relation_loss_sum(_qkv(1, 3, 5, 8, seed=10), _dense(teacher, 4, None), 4)
    with pytest.raises(ValueError, match="relations"):
        relation_loss_sum(student[:2], _dense(teacher, 4, None), 4)
