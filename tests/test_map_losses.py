"""Blocked map losses from scores: equal to unblocked fp64 references (values and gradients) for every kind, encoding,
temperature, GQA and padding; exact bucket KL for top-m targets; zero for a student equal to its teacher in every
mode; bounded gradients where the old clamped-log loss exploded."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.ops.map_losses import (
    DenseTarget,
    SparseTarget,
    dense_rows,
    map_loss_sum,
    student_maps,
)
from pipeline.targets.encoding import pack_triangle
from tests import reference_maps

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 4, 2, 9, 8
SCALE = DIM**-0.5
LENGTHS = torch.tensor([9, 6])
"""Right padding: the second sample has 6 real tokens."""


def _valid() -> torch.Tensor:
    return torch.arange(SEQ)[None] < LENGTHS[:, None]


def _qk(seed: int, sharpness: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator, dtype=torch.float64) * sharpness
    key = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=generator, dtype=torch.float64) * sharpness
    return query, key


def _visible(valid: torch.Tensor) -> torch.Tensor:
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return causal[None, None] & valid[:, None, None, :]


def _targets(seed: int, heads: int = HEADS) -> torch.Tensor:
    """Random causal row-stochastic maps [B, heads, T, T] over the real keys, some entries exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, heads, SEQ, SEQ, generator=generator, dtype=torch.float64) * 2
    visible = _visible(_valid())
    zeros = torch.rand(BATCH, heads, SEQ, SEQ, generator=generator) < 0.2
    zeros[..., 0] = False
    maps = torch.softmax(logits.masked_fill(~visible | zeros, -math.inf), -1)
    return torch.nan_to_num(maps)


def _reference_student(query, key, temperature, head_mean=False):
    return reference_maps.student_maps(query, key, SCALE, temperature, _visible(_valid()), head_mean)


def _soften(maps, temperature):
    powered = maps.pow(1 / temperature)
    return powered / powered.sum(-1, keepdim=True).clamp_min(1e-300)


def _reference_loss(query, key, target, kind, temperature, head_mean=False):
    """fp64, full maps, plain formulas; rows of padding tokens are skipped."""
    student = _reference_student(query, key, temperature, head_mean)
    teacher = _soften(target.double(), temperature)
    if kind == "kl":
        terms = torch.where(
            teacher > 0, teacher * (teacher.clamp_min(1e-300).log() - student.clamp_min(1e-300).log()), 0.0
        )
        per_row = terms.sum(-1)
    elif kind == "mse":
        per_row = (student - teacher).square().sum(-1)
    else:
        cosine = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1)).clamp_min(1e-300)
        per_row = 1 - cosine
    return torch.where(_valid(), per_row.mean(1), 0.0).sum()


def _sparse(target: torch.Tensor, m: int, temperature: float) -> SparseTarget:
    values, indices = target.topk(m, dim=-1)
    rest = target.scatter(-1, indices, 0.0)
    return SparseTarget(values.float(), indices, rest.pow(1 / temperature).sum(-1).float())


def _reference_bucket_kl(query, key, target, m, temperature, head_mean=False):
    """fp64 KL between the (m+1)-bucket distributions of the softened teacher and student maps."""
    student = _reference_student(query, key, temperature, head_mean)
    teacher = _soften(target.double(), temperature)
    indices = target.topk(m, dim=-1).indices
    kept_t, kept_s = teacher.gather(-1, indices), student.gather(-1, indices)
    buckets_t = torch.cat([kept_t, (teacher.sum(-1, keepdim=True) - kept_t.sum(-1, keepdim=True)).clamp_min(0)], -1)
    rest_s = student.scatter(-1, indices, 0.0).sum(-1, keepdim=True)
    buckets_s = torch.cat([kept_s, rest_s], -1)
    terms = torch.where(
        buckets_t > 1e-15, buckets_t * (buckets_t.clamp_min(1e-300).log() - buckets_s.clamp_min(1e-300).log()), 0.0
    )
    return torch.where(_valid(), terms.sum(-1).mean(1), 0.0).sum()


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("rows_per_block", [1, 4, None])
def test_dense_loss_equals_the_unblocked_fp64_reference(kind: str, temperature: float, rows_per_block) -> None:
    query, key = _qk(0)
    target = _targets(1)
    ours_q, ours_k = query.float().requires_grad_(), key.float().requires_grad_()
    loss = map_loss_sum(
        ours_q,
        ours_k,
        SCALE,
        DenseTarget(pack_triangle(target).float()),
        kind=kind,
        temperature=temperature,
        query_mask=_valid(),
        key_mask=_valid(),
        rows_per_block=rows_per_block,
    )
    loss.backward()
    ref_q, ref_k = query.clone().requires_grad_(), key.clone().requires_grad_()
    reference = _reference_loss(ref_q, ref_k, target, kind, temperature)
    reference.backward()
    assert reference.item() > 0.05
    assert loss.item() == pytest.approx(reference.item(), rel=2e-5)
    torch.testing.assert_close(ours_q.grad.double(), ref_q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_k.grad.double(), ref_k.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("head_mean", [False, True])
def test_sparse_loss_is_the_exact_bucket_kl(temperature: float, head_mean: bool) -> None:
    """Top-m targets with R_τ: the (m+1)-bucket KL of the fp64 maps at every τ; with m = T the dense KL."""
    query, key = _qk(2)
    target = _targets(3, heads=1 if head_mean else HEADS)
    ours_q = query.float().requires_grad_()
    loss = map_loss_sum(
        ours_q,
        key.float(),
        SCALE,
        _sparse(target, 3, temperature),
        temperature=temperature,
        head_mean=head_mean,
        query_mask=_valid(),
        key_mask=_valid(),
        rows_per_block=2,
    )
    loss.backward()
    ref_q = query.clone().requires_grad_()
    reference = _reference_bucket_kl(ref_q, key, target, 3, temperature, head_mean)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=2e-5)
    torch.testing.assert_close(ours_q.grad.double(), ref_q.grad, rtol=1e-4, atol=1e-6)

    full = map_loss_sum(
        query.float(),
        key.float(),
        SCALE,
        _sparse(target, SEQ, temperature),
        temperature=temperature,
        head_mean=head_mean,
        query_mask=_valid(),
        key_mask=_valid(),
    )
    dense = _reference_loss(query, key, target, "kl", temperature, head_mean)
    assert full.item() == pytest.approx(dense.item(), rel=2e-5)
    assert loss.item() < full.item()


def test_global_mode_compares_the_mean_of_the_student_heads() -> None:
    query, key = _qk(4)
    target = _targets(5, heads=1)
    loss = map_loss_sum(
        query.float(),
        key.float(),
        SCALE,
        DenseTarget(pack_triangle(target).float()),
        head_mean=True,
        query_mask=_valid(),
        key_mask=_valid(),
    )
    assert loss.item() == pytest.approx(_reference_loss(query, key, target, "kl", 1.0, head_mean=True).item(), rel=2e-5)
    maps = student_maps(query[:1].float(), key[:1].float(), SCALE, head_mean=True)
    assert maps.shape == (1, 1, SEQ, SEQ)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 1, SEQ))


def test_padding_rows_contribute_nothing_whatever_their_targets() -> None:
    query, key = _qk(6)
    target = _targets(7)
    packed = pack_triangle(target).float()
    poisoned = target.clone()
    poisoned[1, :, 6:] = 0.5  # rows of padding tokens: garbage
    kwargs = {"query_mask": _valid(), "key_mask": _valid()}
    clean = map_loss_sum(query.float(), key.float(), SCALE, DenseTarget(packed), **kwargs)
    dirty = map_loss_sum(query.float(), key.float(), SCALE, DenseTarget(pack_triangle(poisoned).float()), **kwargs)
    assert dirty.item() == clean.item()


def test_dense_rows_are_slices_of_the_packed_triangle() -> None:
    maps = _targets(8)
    packed = pack_triangle(maps)
    for start, stop in ((0, 1), (2, 5), (5, SEQ)):
        torch.testing.assert_close(dense_rows(packed, start, stop, SEQ), maps[:, :, start:stop])
        torch.testing.assert_close(dense_rows(packed, start, stop, stop), maps[:, :, start:stop, :stop])


def test_gradients_stay_bounded_where_the_student_has_no_mass() -> None:
    """Student rows near one-hot on the last key, targets on the first key only: the student's probability there is
    ~e^-300 (0 in fp32). log of a clamped probability gives a gradient of t/p ~ 1e38 (or NaN); from scores the
    gradient of the KL w.r.t. the scores is (s − t)/τ, so ‖∂L/∂q_row‖ ≤ 2 · scale · max‖k‖ / τ per head."""
    query = torch.zeros(1, 1, SEQ, DIM)
    key = torch.zeros(1, 1, SEQ, DIM)
    key[0, 0, :, 0] = torch.arange(SEQ, dtype=torch.float32) * 40.0
    query[0, 0, :, 0] = 1.0 / SCALE
    target = torch.zeros(1, 1, SEQ, SEQ)
    target[..., 0] = 1.0
    for temperature in (1.0, 2.0):
        q = query.clone().requires_grad_()
        loss = map_loss_sum(q, key, SCALE, DenseTarget(pack_triangle(target)), temperature=temperature)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 100
        bound = 2 * SCALE * key.norm(dim=-1).max() / temperature
        assert torch.isfinite(q.grad).all()
        assert q.grad.norm(dim=-1).max() <= bound * (1 + 1e-5)
        assert q.grad.norm(dim=-1).max() > 0.25 * bound  # the gradient is real, not vanished

    probs = torch.softmax(
        (query @ key.transpose(-1, -2) * SCALE).masked_fill(~_visible(torch.ones(1, SEQ, dtype=torch.bool)), -math.inf),
        -1,
    )
    clamped = probs.clone().requires_grad_()
    old_style = (
        target * (target.clamp_min(1e-38).log() - clamped.clamp_min(torch.finfo(torch.float32).tiny).log())
    ).sum()
    old_style.backward()
    assert clamped.grad.abs().max() > 1e30


def test_malformed_targets_are_refused() -> None:
    query, key = _qk(9)
    target = _targets(9)
    with pytest.raises(ValueError, match=r"dense target \(2, 4, 44\): expected \[B, H, T\(T\+1\)/2\]"):
        map_loss_sum(query.float(), key.float(), SCALE, DenseTarget(pack_triangle(target)[..., :44]))
    with pytest.raises(ValueError, match="only 'kl'"):
        map_loss_sum(query.float(), key.float(), SCALE, _sparse(target, 3, 1.0), kind="mse")
    sparse = _sparse(target, 3, 1.0)
    with pytest.raises(ValueError, match=r"target tail \(2, 4, 8\)"):
        map_loss_sum(query.float(), key.float(), SCALE, sparse._replace(tail=sparse.tail[..., :8]))
    with pytest.raises(ValueError, match="key heads must divide"):
        map_loss_sum(query.float(), key[:, :1].expand(-1, 3, -1, -1).float(), SCALE, DenseTarget(pack_triangle(target)))


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_is_zero_when_the_target_is_the_students_own_map(kind: str, temperature: float) -> None:
    query, key = _qk(10)
    own = _reference_student(query, key, 1.0)
    loss = map_loss_sum(
        query.float(),
        key.float(),
        SCALE,
        DenseTarget(pack_triangle(own).float()),
        kind=kind,
        temperature=temperature,
        query_mask=_valid(),
        key_mask=_valid(),
    )
    assert abs(loss.item()) < 1e-5


def test_sparse_loss_grows_with_m_up_to_the_dense_kl() -> None:
    """At τ = 1 merging keys into the tail bucket can only lose information (data-processing inequality): the loss
    grows with m and reaches the dense KL at m = T; short rows (i + 1 < m) keep only exact zeros beyond their keys."""
    query, key = _qk(11)
    target = _targets(12)
    kwargs = {"query_mask": _valid(), "key_mask": _valid()}
    losses = [
        map_loss_sum(query.float(), key.float(), SCALE, _sparse(target, m, 1.0), **kwargs).item()
        for m in range(1, SEQ + 1)
    ]
    dense = map_loss_sum(query.float(), key.float(), SCALE, DenseTarget(pack_triangle(target).float()), **kwargs)
    assert all(later >= earlier - 1e-5 for earlier, later in itertools.pairwise(losses))
    assert losses[-1] == pytest.approx(dense.item(), rel=1e-5) and losses[0] < 0.9 * losses[-1]


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_masking_the_first_key_renormalises_both_sides_over_the_others(kind: str) -> None:
    """The attention-sink option: key 0 masked and row 0 left out equals the fp64 loss between target and student
    rows restricted to keys 1..i and renormalised there; top-m targets that keep key 0 agree."""
    query, key = _qk(13)
    logits = torch.randn(BATCH, HEADS, SEQ, SEQ, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    target = torch.softmax(logits.masked_fill(~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), -math.inf), -1)
    target[..., 0] += 2.0  # a sink: most of every row on key 0
    target = target / target.sum(-1, keepdim=True)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[:, 0] = False
    ours_q = query.float().requires_grad_()
    loss = map_loss_sum(
        ours_q,
        key.float(),
        SCALE,
        DenseTarget(pack_triangle(target).float()),
        kind=kind,
        query_mask=mask,
        key_mask=mask,
    )
    loss.backward()

    ref_q = query.clone().requires_grad_()
    full_key = key.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = ref_q @ full_key.transpose(-1, -2) * SCALE
    visible = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    visible[:, 0] = False
    student = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)[:, :, 1:]
    teacher = torch.where(visible, target.double(), 0.0)[:, :, 1:]
    teacher = teacher / teacher.sum(-1, keepdim=True)
    if kind == "kl":
        terms = torch.where(
            teacher > 0, teacher * (teacher.clamp_min(1e-300).log() - student.clamp_min(1e-300).log()), 0.0
        )
        reference = terms.sum(-1).mean(1).sum()
    else:
        reference = (student - teacher).square().sum(-1).mean(1).sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=2e-5) and reference.item() > 0.05
    torch.testing.assert_close(ours_q.grad.double(), ref_q.grad, rtol=1e-4, atol=1e-6)
    if kind == "kl":
        sparse = _sparse(target, SEQ, 1.0)
        assert (sparse.indices[..., 1:, :] == 0).any(-1).all()  # key 0 is kept in every row: its mass leaves exactly
        topm = map_loss_sum(query.float(), key.float(), SCALE, sparse, query_mask=mask, key_mask=mask)
        assert topm.item() == pytest.approx(loss.item(), rel=1e-5)


def test_a_nan_target_makes_the_loss_nan_instead_of_vanishing() -> None:
    """Bad cached values must stop training (the trainer refuses non-finite losses), not count as probability 0."""
    query, key = _qk(15)
    target = _targets(16)
    packed = pack_triangle(target).float()
    packed[0, 1, 7] = math.nan
    for kind in ("kl", "mse", "cosine"):
        assert math.isnan(map_loss_sum(query.float(), key.float(), SCALE, DenseTarget(packed), kind=kind).item()), kind
    sparse = _sparse(target, 3, 1.0)
    values = sparse.values.clone()
    values[1, 0, 5, 1] = math.nan
    assert math.isnan(map_loss_sum(query.float(), key.float(), SCALE, sparse._replace(values=values)).item())


def _sink_qk(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k fp64 whose maps hold most of every row on key 0 (an attention sink, as in trained models): every head's
    top few keys of every row include it, so top-m targets keep it and dropping it takes it out exactly."""
    query, key = _qk(seed, sharpness=1.0)
    key[:, :, 0] = 0.0
    key[:, :, 0, 0] = 8.0
    query[..., 0] = 2.0
    return query, key


def _sink_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[:, 0] = False
    return mask


@pytest.mark.parametrize("mode", ["headwise", "selective", "global"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("sink", ["keep", "drop"])
@pytest.mark.parametrize("target_kind", ["dense kl", "dense mse", "dense cosine", "top-m m=T", "top-m m<T"])
def test_a_student_equal_to_its_teacher_has_zero_loss(mode: str, temperature: float, sink: str, target_kind: str):
    """The teacher maps come from the very q, k the loss is given (selective: two of the heads; global: the mean over
    all heads, as the cache stores it). Student and target go through the same operation in every mode, at every τ,
    with the sink kept or dropped, dense or top-m (R_τ of the fp64 maps), so every row's loss is 0 to fp32 rounding."""
    query, key = _sink_qk(17)
    teacher = reference_maps.head_maps(query, key, SCALE)
    if mode == "selective":
        chosen = [0, 3]
        query, key = query[:, chosen], key.repeat_interleave(HEADS // KV_HEADS, dim=1)[:, chosen]
        teacher = teacher[:, chosen]
    elif mode == "global":
        teacher = teacher.mean(1, keepdim=True)
    mask, rows = (_sink_mask(), BATCH * (SEQ - 1)) if sink == "drop" else (None, BATCH * SEQ)
    kind = "kl"
    if target_kind.startswith("dense"):
        target: DenseTarget | SparseTarget = DenseTarget(pack_triangle(teacher).float())
        kind = target_kind.removeprefix("dense ")
    else:
        target = _sparse(teacher, SEQ if target_kind == "top-m m=T" else 3, temperature)
        assert (target.indices[..., 1:, :] == 0).any(-1).all()  # the sink is kept: dropping it leaves the tail exact
    loss = map_loss_sum(
        query.float(),
        key.float(),
        SCALE,
        target,
        kind=kind,
        temperature=temperature,
        head_mean=mode == "global",
        query_mask=mask,
        key_mask=mask,
        rows_per_block=4,
    )
    assert abs(loss.item()) / rows < 1e-6


@pytest.mark.parametrize("kind", ["kl", "mse", "cosine", "top-m"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_global_loss_softens_the_mean_of_the_heads_and_drops_the_sink_after(kind: str, temperature: float) -> None:
    """Global mode pins one definition: the student's heads' τ = 1 maps are averaged over all causal keys, then the
    mean map is restricted to keys 1..i, raised to 1/τ and renormalised — the operation the cached mean teacher map
    goes through. Values and gradients equal the fp64 formula on full maps."""
    query, key = _qk(18)
    logits = torch.randn(BATCH, 1, SEQ, SEQ, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    target = reference_maps.masked_softmax(logits, reference_maps.causal_visibility(SEQ))
    target[..., 0] += 1.0  # a sink, kept by every top-m row
    target = target / target.sum(-1, keepdim=True)
    mask = _sink_mask()
    if kind == "top-m":
        encoded: DenseTarget | SparseTarget = _sparse(target, 3, temperature)
        assert (encoded.indices[..., 1:, :] == 0).any(-1).all()
    else:
        encoded = DenseTarget(pack_triangle(target).float())
    ours_q, ours_k = query.float().requires_grad_(), key.float().requires_grad_()
    loss = map_loss_sum(
        ours_q,
        ours_k,
        SCALE,
        encoded,
        kind="kl" if kind == "top-m" else kind,
        temperature=temperature,
        head_mean=True,
        query_mask=mask,
        key_mask=mask,
        rows_per_block=4,
    )
    loss.backward()

    ref_q, ref_k = query.clone().requires_grad_(), key.clone().requires_grad_()
    visible = reference_maps.causal_visibility(SEQ, mask)
    mean_map = reference_maps.head_maps(ref_q, ref_k, SCALE).mean(1, keepdim=True)
    student = reference_maps.softened(mean_map, temperature, visible)
    teacher = reference_maps.softened(target, temperature, visible)
    if kind == "top-m":
        per_row = reference_maps.bucket_kl(student, teacher, target.topk(3, dim=-1).indices)
    else:
        per_row = reference_maps.row_losses(student, teacher, kind)
    reference = per_row[:, :, 1:].sum()
    reference.backward()
    assert reference.item() > 0.05
    assert loss.item() == pytest.approx(reference.item(), rel=2e-5)
    torch.testing.assert_close(ours_q.grad.double(), ref_q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_k.grad.double(), ref_k.grad, rtol=1e-4, atol=1e-6)
