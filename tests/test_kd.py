"""Logit distillation losses: reference values, masking, the tail bucket and the top-k == dense identity."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.ops import native
from pipeline.ops.kd import (
    IGNORE_INDEX,
    TOPK_BLOCK,
    cross_entropy,
    logit_losses,
    masked_reduce,
    output_topk_targets,
    soften_topk,
    sparse_kl_with_tail,
    topk_targets,
    valid_token_count,
)
from tests.reference_kd import kd_loss


def kd_loss_topk(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    tail: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The pipeline's top-k KD: the KD term of `logit_losses` (its CE over dummy labels is left aside)."""
    labels = torch.zeros(student.shape[:-1], dtype=torch.long)
    return logit_losses(student, labels, values, indices, tail, mask, temperature, reduction)[1]


BATCH, SEQ, VOCAB = 3, 7, 13


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, VOCAB, generator=generator, dtype=torch.float64).float() * scale


def _mask() -> torch.Tensor:
    """Right padding: 7, 5 and 2 valid positions."""
    lengths = torch.tensor([7, 5, 2])
    return torch.arange(SEQ)[None] < lengths[:, None]


def _reference_kd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    per_position = F.kl_div(
        F.log_softmax(student.double() / temperature, -1),
        F.log_softmax(teacher.double() / temperature, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return per_position[mask].mean() * temperature**2


def test_cross_entropy_matches_torch_and_ignores_padding() -> None:
    logits = _logits(0).requires_grad_()
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels[~_mask()] = IGNORE_INDEX
    loss = cross_entropy(logits, labels)
    expected = F.cross_entropy(logits.detach().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert valid_token_count(labels).item() == 14
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert cross_entropy(logits, labels, "sum").item() == pytest.approx(14 * expected.item(), rel=1e-6)

    loss.backward()
    assert torch.all(logits.grad[~_mask()] == 0)
    changed = logits.detach().clone()
    changed[~_mask()] = 1e4 * torch.rand(int((~_mask()).sum()), VOCAB)
    assert cross_entropy(changed, labels).item() == loss.item()


def test_cross_entropy_with_no_valid_token_is_zero() -> None:
    labels = torch.full((BATCH, SEQ), IGNORE_INDEX)
    assert cross_entropy(_logits(0), labels).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_matches_reference_and_masks(temperature: float) -> None:
    student, teacher, mask = _logits(0), _logits(1), _mask()
    loss = kd_loss(student, teacher, mask, temperature)
    assert loss.item() == pytest.approx(_reference_kd(student, teacher, mask, temperature).item(), rel=1e-5)
    assert kd_loss(student, teacher, mask, temperature, "sum").item() == pytest.approx(14 * loss.item(), rel=1e-6)
    assert kd_loss(teacher, teacher, mask, temperature).item() == 0.0

    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[~mask] = 50.0 * torch.randn(int((~mask).sum()), VOCAB)
    changed_teacher[~mask] = -50.0
    assert kd_loss(changed_student, changed_teacher, mask, temperature).item() == loss.item()


def test_kd_loss_teacher_with_zero_probabilities_is_finite() -> None:
    """A teacher with -inf logits (banned tokens) has exact zeros: 0·log 0 = 0, no NaN in value or gradient."""
    student = _logits(0).requires_grad_()
    teacher = _logits(1)
    teacher[..., :4] = -math.inf
    loss = kd_loss(student, teacher, _mask())
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


def test_topk_targets_values_and_tail(top_rows_path: str) -> None:
    teacher = _logits(2)
    values, indices, tails = topk_targets(teacher, 4)
    tail = tails[..., 0]
    logprobs = F.log_softmax(teacher, -1)
    assert values.shape == indices.shape == (BATCH, SEQ, 4) and tails.shape == (BATCH, SEQ, 1)
    assert values.dtype == tail.dtype == torch.float32 and indices.dtype == torch.int64
    torch.testing.assert_close(values, logprobs.gather(-1, indices), rtol=0, atol=1e-6)
    assert torch.all(values[..., :-1] >= values[..., 1:])
    torch.testing.assert_close(tail, 1 - values.exp().sum(-1), atol=1e-6, rtol=0)

    assert torch.all(topk_targets(teacher, VOCAB)[2] == 0)
    with pytest.raises(ValueError, match="k=0"):
        topk_targets(teacher, 0)


def test_topk_targets_rank_by_logit_beyond_exp_underflow_and_keep_banned_tokens_out(top_rows_path: str) -> None:
    """Logits 150–300 nats below the maximum all have exp(z − max) = 0 in fp32: the top k still ranks them by the
    logit (descending log-probs), and -inf (banned) tokens come last with exact-zero tails."""
    logits = torch.tensor([[[0.0, -200.0, -150.0, -300.0, -math.inf, -math.inf, -120.0, -math.inf]]])
    values, indices, tails = topk_targets(logits, 5, (1.0, 2.0))
    assert indices.tolist() == [[[0, 6, 2, 1, 3]]]
    torch.testing.assert_close(values, torch.tensor([[[0.0, -120.0, -150.0, -200.0, -300.0]]]))
    assert torch.all(tails == 0)
    values, indices, tails = topk_targets(logits, 7, (1.0,))
    assert set(indices[0, 0, 5:].tolist()) <= {4, 5, 7} and torch.all(values[0, 0, 5:] == -math.inf)
    assert torch.all(tails == 0)


def test_topk_tail_keeps_tiny_masses(top_rows_path: str) -> None:
    """1 − Σ top-k loses a 1e-20 tail to fp32 cancellation; the complement logsumexp keeps it."""
    teacher = torch.full((1, 1, 5), -46.0)
    teacher[..., :2] = 0.0
    tail = topk_targets(teacher, 2)[2][..., 0]
    expected = 3 * math.exp(-46.0) / (2 + 3 * math.exp(-46.0))
    assert tail.item() == pytest.approx(expected, rel=1e-5)
    assert expected < 1e-19


def _reference_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs, indices and the complement's mass in fp64 by the book: log-softmax, top-k, logsumexp."""
    logprobs = F.log_softmax(logits.double(), -1)
    values, indices = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, indices, -math.inf), -1).exp()
    return values, indices, tail


@pytest.mark.parametrize("vocab", [40 * TOPK_BLOCK, 40 * TOPK_BLOCK + 37])
def test_topk_targets_block_search_matches_the_reference(vocab: int, top_rows_path: str) -> None:
    """Vocabularies large enough for the block search (ragged end or not), with the largest logits planted in the
    ragged end, inside one block, split across two blocks, and a row whose tail is ~1e-17 (lost to 1 − Σ top-k in
    fp32)."""
    k = 8
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, vocab, generator=generator) * 3
    logits[0, 0, -3:] = 20.0
    logits[0, 1, 3 * TOPK_BLOCK : 3 * TOPK_BLOCK + k] = torch.arange(k) + 15.0
    logits[0, 2, TOPK_BLOCK - 4 : TOPK_BLOCK + 4] = 12.0 + torch.arange(k) / 8
    logits[1, 0] = -45.0
    logits[1, 0, 100 : 100 + k] = 0.0
    values, indices, tails = topk_targets(logits, k)
    tail = tails[..., 0]
    expected_values, expected_indices, expected_tail = _reference_topk(logits, k)
    torch.testing.assert_close(values.double(), expected_values, rtol=0, atol=2e-6)
    assert torch.equal(indices.sort(-1).values, expected_indices.sort(-1).values)
    torch.testing.assert_close(tail.double(), expected_tail, rtol=1e-5, atol=0)
    assert 1e-18 < tail[1, 0].item() < 1e-16
    assert torch.all(topk_targets(logits, vocab)[2] == 0)


def _planted_output_layer(vocab: int, width: int, bias: bool) -> tuple[torch.Tensor, torch.nn.Linear]:
    """Hidden rows [12, width] and an output layer whose logits hold what a streamed top k can get wrong: the
    largest logits in the last tokens (the running maximum rises late), a row of exact ties (hidden 0: the logits
    are the bias, or all 0; the lower token must win), ties across tokens far apart in that row, and -inf (banned)
    tokens, through a bias of -inf."""
    generator = torch.Generator().manual_seed(vocab)
    layer = torch.nn.Linear(width, vocab, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, width, generator=generator))
        layer.weight[-3:] *= 4.0
        if bias:
            layer.bias.copy_(torch.randn(vocab, generator=generator).round(decimals=1))
            layer.bias[vocab // 2] = layer.bias[7] = layer.bias.max() + 1  # tied at the top of row 0
            layer.bias[[3, vocab - 5]] = -math.inf
    hidden = torch.randn(12, width, generator=generator)
    hidden[0] = 0.0  # every logit equal (or the bias alone): ties everywhere
    return hidden, layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [5, 40])
def test_output_topk_targets_streamed_in_blocks_equal_the_reference(
    bias: bool, k: int, top_rows_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output layer's sparse targets without the logits formed whole (on a CPU: blocks of 5 rows x 16 tokens
    here, so k = 40 spans blocks before the heap fills) equal topk_targets of the whole logits — the same tokens
    in the same order (the kernel's: ties to the lower token) — and the float64 log-softmax and tails."""
    monkeypatch.setattr(native, "OUTPUT_ROW_BLOCK", 5)
    monkeypatch.setattr(native, "OUTPUT_VOCAB_BLOCK", 16)
    hidden, layer = _planted_output_layer(203, 8, bias)
    temperatures = (1.0, 0.5, 2.0)
    values, indices, tails = output_topk_targets(hidden, layer, k, temperatures)
    with torch.no_grad():
        logits = layer(hidden)
    whole = topk_targets(logits, k, temperatures)
    assert torch.equal(indices, whole[1])
    torch.testing.assert_close(values, whole[0], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(tails, whole[2], rtol=2e-5, atol=0)
    logprobs = F.log_softmax(logits.double(), -1)
    torch.testing.assert_close(values.double(), logprobs.gather(-1, indices), rtol=1e-6, atol=2e-6)
    rest = logprobs.exp().scatter(-1, indices, 0.0)
    expected = torch.stack([rest.pow(1 / tau).sum(-1) for tau in temperatures], -1)
    torch.testing.assert_close(tails.double(), expected, rtol=2e-5, atol=0)
    if top_rows_path == "native":  # the kernel breaks ties to the lower token; the torch form's topk arbitrarily
        assert torch.equal(indices, logits.sort(dim=-1, descending=True, stable=True).indices[:, :k])
    if bias:
        assert set(indices[0, :2].tolist()) == {7, 203 // 2} and torch.isneginf(logits[0, [3, 198]]).all()


def test_output_topk_targets_of_a_bf16_output_layer(top_rows_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 teacher (what `dtype: auto` picks on a CPU with AVX512-BF16): its logits are bf16 products, reduced in
    fp32, block by block as whole."""
    monkeypatch.setattr(native, "OUTPUT_ROW_BLOCK", 4)
    monkeypatch.setattr(native, "OUTPUT_VOCAB_BLOCK", 32)
    generator = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(16, 301, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(301, 16, generator=generator))
        hidden = torch.randn(10, 16, generator=generator).to(torch.bfloat16)
        logits = layer(hidden).float()
    values, indices, tails = output_topk_targets(hidden, layer, 6, (1.0, 2.0))
    expected = topk_targets(logits, 6, (1.0, 2.0))
    assert values.dtype == tails.dtype == torch.float32
    torch.testing.assert_close(values, expected[0], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(values, logits.log_softmax(-1).gather(-1, indices), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(tails, expected[2], rtol=2e-5, atol=0)


def test_output_topk_targets_keep_a_tiny_tail_across_blocks(
    top_rows_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tokens at 0 in the last block, the rest 46 nats below in earlier blocks: the stream's tail (summed from
    terms, rescaled when the maximum rises) keeps a 1e-19 tail that 1 − Σ top k would lose."""
    monkeypatch.setattr(native, "OUTPUT_VOCAB_BLOCK", 2)
    layer = torch.nn.Linear(1, 5, bias=True)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([-46.0, -46.0, -46.0, 0.0, 0.0]))
    values, indices, tails = output_topk_targets(torch.zeros(1, 1), layer, 2)
    expected = 3 * math.exp(-46.0) / (2 + 3 * math.exp(-46.0))
    assert sorted(indices[0].tolist()) == [3, 4]
    torch.testing.assert_close(values, torch.full((1, 2), -math.log(2 + 3 * math.exp(-46.0))))
    assert tails.item() == pytest.approx(expected, rel=1e-5) and expected < 1e-19
    with pytest.raises(ValueError, match="k=6"):
        output_topk_targets(torch.zeros(1, 1), layer, 6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_loss_equals_dense_when_k_is_vocab(temperature: float) -> None:
    """Values and gradients of the sparse form coincide with `kd_loss` when nothing is left in the tail."""
    teacher, mask = _logits(1), _mask()
    dense_student = _logits(0).requires_grad_()
    sparse_student = _logits(0).requires_grad_()
    dense = kd_loss(dense_student, teacher, mask, temperature)
    values, indices, tails = topk_targets(teacher, VOCAB, (temperature,))
    sparse = kd_loss_topk(sparse_student, values, indices, tails[..., 0], mask, temperature)
    dense.backward()
    sparse.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    assert dense.item() > 0.1
    torch.testing.assert_close(sparse_student.grad, dense_student.grad, atol=1e-7, rtol=1e-5)


def test_topk_loss_is_a_lower_bound_that_grows_with_k() -> None:
    """Merging the tail into one bucket can only lose information (data-processing inequality) at τ = 1."""
    student, teacher, mask = _logits(0), _logits(1), _mask()
    dense = kd_loss(student, teacher, mask).item()
    losses = []
    for k in range(1, VOCAB + 1):
        values, indices, tails = topk_targets(teacher, k)
        losses.append(kd_loss_topk(student, values, indices, tails[..., 0], mask).item())
    # The student tail is 1 − Σ top-k in fp32 (kd.STUDENT_TAIL_FLOOR): monotone up to fp32 resolution of the loss.
    assert all(later >= earlier - 1e-6 * dense for earlier, later in itertools.pairwise(losses))
    assert max(losses) <= dense * (1 + 1e-6)
    assert losses[-1] == pytest.approx(dense, rel=1e-5)
    assert losses[0] < 0.9 * dense


def test_tail_bucket_is_not_renormalised_away() -> None:
    """Teacher top-2 = (0.3, 0.2) with 0.5 spread over 4 tokens; the student keeps the 3:2 ratio but puts 0.9 on
    the top-2. A renormalised top-k KL sees identical distributions (0); the tail bucket sees the difference, and
    because both tails are uniform it is exact: equal to the full KL, at τ = 1 and τ = 2."""
    teacher_probs = torch.tensor([0.3, 0.2, 0.125, 0.125, 0.125, 0.125])
    student_probs = torch.tensor([0.54, 0.36, 0.025, 0.025, 0.025, 0.025])
    teacher, student = teacher_probs.log().view(1, 1, 6), student_probs.log().view(1, 1, 6)
    mask = torch.ones(1, 1, dtype=torch.bool)
    values, indices, tails = topk_targets(teacher, 2, (1.0, 2.0))
    tail, tail_at_2 = tails.unbind(-1)

    renormalised_teacher = values.exp() / values.exp().sum(-1, keepdim=True)
    renormalised_student = F.softmax(student.gather(-1, indices), -1)
    renormalised_kl = (renormalised_teacher * (renormalised_teacher / renormalised_student).log()).sum()
    assert renormalised_kl.abs().item() < 1e-6

    sparse = kd_loss_topk(student, values, indices, tail, mask).item()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert sparse == pytest.approx(expected, rel=1e-5)
    assert sparse == pytest.approx(kd_loss(student, teacher, mask).item(), rel=1e-5)
    assert expected > 0.5
    softened = kd_loss_topk(student, values, indices, tail_at_2, mask, temperature=2.0).item()
    assert softened == pytest.approx(kd_loss(student, teacher, mask, temperature=2.0).item(), rel=1e-5)


def test_soften_topk_rule() -> None:
    """p = 0.5 kept, tail 0.5 over 4 entries of 0.125, τ = 2: R_2 = 4 · 0.125^½, 0.5^½ vs R_2 → buckets 1/3, 2/3."""
    logprobs, log_tail = soften_topk(torch.tensor([[math.log(0.5)]]), torch.tensor([4 * 0.125**0.5]), 2.0)
    assert logprobs.exp().item() == pytest.approx(1 / 3, rel=1e-6)
    assert log_tail.exp().item() == pytest.approx(2 / 3, rel=1e-6)

    same, same_tail = soften_topk(torch.tensor([[math.log(0.5)]]), torch.tensor([0.5]), 1.0)
    assert same.exp().item() == pytest.approx(0.5, rel=1e-6) and same_tail.exp().item() == pytest.approx(0.5, rel=1e-6)

    no_tail = soften_topk(torch.tensor([[0.0], [0.0]]), torch.tensor([0.0, 0.0]), 3.0)[1]
    assert torch.all(torch.isneginf(no_tail))

    empty = soften_topk(torch.full((1, 3), -math.inf), torch.tensor([0.0]), 2.0)
    assert all(torch.isneginf(part).all() for part in empty)


def _bucket_kl_reference(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """τ² · KL between the (k+1)-bucket distributions of softmax(z_t/τ) and softmax(z_s/τ), in fp64 from the full
    logits: the teacher's top k (at τ = 1, the same set at any τ) and one bucket for the rest, on both sides."""
    teacher_probs = F.softmax(teacher.double() / temperature, -1)
    student_probs = F.softmax(student.double() / temperature, -1)
    indices = teacher.double().topk(k, dim=-1).indices
    kept_t, kept_s = teacher_probs.gather(-1, indices), student_probs.gather(-1, indices)
    buckets_t = torch.cat([kept_t, (1 - kept_t.sum(-1, keepdim=True)).clamp_min(0)], -1)
    buckets_s = torch.cat([kept_s, (1 - kept_s.sum(-1, keepdim=True)).clamp_min(1e-300)], -1)
    terms = torch.where(buckets_t > 0, buckets_t * (buckets_t.clamp_min(1e-300).log() - buckets_s.log()), 0.0)
    return terms.sum(-1) * temperature**2


@pytest.mark.parametrize("k", [3, VOCAB])
def test_topk_kd_is_the_exact_bucket_kl_at_every_cached_temperature(k: int, top_rows_path: str) -> None:
    """With R_τ cached for τ ∈ {1, 2, 4}, the top-k KD equals the fp64 (k+1)-bucket KL of the full distributions at
    each τ — values and gradients — and the full KL when k = V (soften-then-bucket is bucket-then-soften only with
    R_τ: spreading the τ = 1 tail evenly, as before, is wrong at τ ≠ 1)."""
    teacher, mask = _logits(1, scale=4.0), _mask()
    temperatures = (1.0, 2.0, 4.0)
    values, indices, tails = topk_targets(teacher, k, temperatures)
    for position, temperature in enumerate(temperatures):
        student = _logits(0).requires_grad_()
        loss = kd_loss_topk(student, values, indices, tails[..., position], mask, temperature, reduction="sum")
        loss.backward()
        reference_student = _logits(0).double().requires_grad_()
        reference = torch.where(mask, _bucket_kl_reference(reference_student, teacher, k, temperature), 0.0).sum()
        reference.backward()
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        torch.testing.assert_close(student.grad.double(), reference_student.grad, rtol=1e-4, atol=1e-6)
        if k == VOCAB:
            full = kd_loss(_logits(0), teacher, mask, temperature, reduction="sum")
            assert loss.item() == pytest.approx(full.item(), rel=1e-5)
        elif temperature > 1:
            assert loss.item() < kd_loss(_logits(0), teacher, mask, temperature, reduction="sum").item()


def test_tail_sums_match_the_fp64_definition(top_rows_path: str) -> None:
    """R_τ = Σ_tail p^{1/τ} against fp64, on the block-search path (large vocabulary) and the plain one."""
    for vocab in (VOCAB, 40 * TOPK_BLOCK + 5):
        logits = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        _, indices, tails = topk_targets(logits, 4, (0.5, 1.0, 3.0))
        probs = F.softmax(logits.double(), -1)
        rest = probs.scatter(-1, indices, 0.0)
        expected = torch.stack([rest.pow(1 / tau).sum(-1) for tau in (0.5, 1.0, 3.0)], -1)
        torch.testing.assert_close(tails.double(), expected, rtol=2e-5, atol=0)
    with pytest.raises(ValueError, match="temperatures"):
        topk_targets(logits, 4, (1.0, 0.0))


def test_sparse_kl_zero_tails_are_finite() -> None:
    """A student tail of exactly 0 where the target has tail mass gives a large finite loss and finite gradients;
    an empty target tail contributes exactly 0."""
    target = torch.tensor([[math.log(0.6), math.log(0.2)]])
    student = torch.tensor([[math.log(0.7), math.log(0.3)]], requires_grad=True)
    student_log_tail = torch.tensor([-math.inf], requires_grad=True)
    loss = sparse_kl_with_tail(target, torch.tensor([math.log(0.2)]), student, student_log_tail)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss.item() > 10
    assert torch.isfinite(student.grad).all() and torch.isfinite(student_log_tail.grad).all()

    no_tail = sparse_kl_with_tail(
        torch.tensor([[math.log(0.75), math.log(0.25)]]),
        torch.tensor([-math.inf]),
        student.detach(),
        torch.tensor([0.0]),
    )
    expected = 0.75 * math.log(0.75 / 0.7) + 0.25 * math.log(0.25 / 0.3)
    assert no_tail.item() == pytest.approx(expected, rel=1e-5)


def test_masked_reduce_drops_nan_at_padding() -> None:
    values = torch.tensor([[1.0, 2.0, math.nan], [4.0, math.inf, math.nan]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_reduce(values, mask, "sum").item() == 7.0
    assert masked_reduce(values, mask, "mean").item() == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="reduction"):
        masked_reduce(values, mask, "max")


def _reference_topk_kd(student, values, indices, tail, mask, temperature):
    """Plain-autograd tail-bucket KD in fp64, the student tail a logsumexp over the complement (no 1 − Σ)."""
    scaled = student.double() / temperature
    normaliser = torch.logsumexp(scaled, -1, keepdim=True)
    kept = scaled.gather(-1, indices) - normaliser
    rest = torch.logsumexp(scaled.scatter(-1, indices, -math.inf), -1) - normaliser.squeeze(-1)
    target, target_tail = soften_topk(values.double(), tail.double(), temperature)
    terms = target.exp() * (target - kept)
    tail_terms = torch.where(torch.isneginf(target_tail), 0.0, target_tail.exp() * (target_tail - rest))
    per_position = (terms.sum(-1) + tail_terms) * temperature**2
    return torch.where(mask, per_position, 0.0).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 4, VOCAB])
def test_fused_logit_losses_match_autograd_references(temperature: float, k: int) -> None:
    """`logit_losses` (hand-written backward) equals F.cross_entropy and an fp64 autograd KD, values and grads."""
    teacher, mask = _logits(1), _mask()
    labels = torch.where(
        mask, torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5)), IGNORE_INDEX
    )
    values, indices, tails = topk_targets(teacher, k, (temperature,))
    tail = tails[..., 0]
    fused_logits = _logits(0).requires_grad_()
    ce, kd = logit_losses(fused_logits, labels, values.half(), indices.int(), tail, mask, temperature)
    (ce + 0.7 * kd).backward()

    reference_logits = _logits(0).double().requires_grad_()
    reference_ce = F.cross_entropy(reference_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    reference_kd = _reference_topk_kd(reference_logits, values.half().float(), indices, tail, mask, temperature)
    (reference_ce + 0.7 * reference_kd).backward()

    assert ce.item() == pytest.approx(reference_ce.item(), rel=1e-5)
    assert kd.item() == pytest.approx(reference_kd.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(fused_logits.grad.double(), reference_logits.grad, rtol=1e-4, atol=1e-6)
    assert kd_loss_topk(_logits(0), values.half(), indices, tail, mask, temperature).item() == pytest.approx(kd.item())


def test_sparse_targets_of_the_wrong_shape_are_refused() -> None:
    student = _logits(0)
    values, indices, tails = topk_targets(_logits(1), 4)
    tail = tails[..., 0]
    with pytest.raises(ValueError, match=r"student logits \(3, 7, 13\), top-k values \(3, 7, 4\), indices \(3, 7, 3"):
        kd_loss_topk(student, values, indices[..., :3], tail, _mask())
    with pytest.raises(ValueError, match=r"expected \[B, T, V\], \[B, T, k\], \[B, T, k\]"):
        kd_loss_topk(student, values[:, :5], indices[:, :5], tail, _mask())
    with pytest.raises(ValueError, match=r"tail sums \(3, 6\): expected \(3, 7\)"):
        logit_losses(student, torch.zeros(BATCH, SEQ, dtype=torch.long), values, indices, tail[:, :6], _mask())
