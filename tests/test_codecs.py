"""Compact cache forms: bit-packed integers, 8-bit log-probability codes (their error bound against a float64
reference) and the stored query rows (deterministic per sample id, stratified, every row equally likely)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.ops.kd import logit_losses, topk_targets
from pipeline.targets.codecs import (
    MAX_CODE,
    ZERO_CODE,
    bits_for,
    dequantize_log_probs,
    dequantize_logs,
    pack_bits,
    packed_bytes,
    quantize_log_probs,
    quantize_logs,
    unpack_bits,
)
from pipeline.targets.rows import stored_row_count, stored_rows


@pytest.mark.parametrize(
    ("limit", "bits"), [(2, 1), (6, 3), (4096, 12), (4097, 13), (8192, 13), (49152, 16), (128256, 17)]
)
def test_bits_for_is_the_fewest_bits_that_hold_every_index(limit: int, bits: int) -> None:
    assert bits_for(limit) == bits
    assert 2 ** bits_for(limit) >= limit > 2 ** (bits_for(limit) - 1) or limit == 2


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 13, 16, 17])
def test_packed_integers_round_trip_and_take_ceil_count_bits_over_8_bytes(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (3, 101), generator=generator)
    values[0, :4] = torch.tensor([0, 2**bits - 1, 1, 2 ** (bits - 1)])
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_bytes(101, bits)) == (
        3,
        math.ceil(101 * bits / 8),
    )
    assert torch.equal(unpack_bits(packed, bits, 101), values)
    # Little-endian bit stream: value j's bit k is bit j·b + k of the row (independent of the implementation).
    for row in range(3):
        stream = [int(value) >> k & 1 for value in values[row].tolist() for k in range(bits)]
        stream += [0] * (-len(stream) % 8)
        expected = [sum(stream[byte * 8 + k] << k for k in range(8)) for byte in range(len(stream) // 8)]
        assert packed[row].tolist() == expected


def _rows(seed: int, shape: tuple[int, ...], zeros: int = 0) -> torch.Tensor:
    """Probability rows with a wide dynamic range (down to ~1e-30) and `zeros` exact zeros per row."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator, dtype=torch.float64) * 12
    probs = logits.softmax(-1)
    if zeros:
        probs[..., -zeros:] = 0
    return probs.sort(-1, descending=True).values


@pytest.mark.parametrize("zeros", [0, 3])
def test_8_bit_codes_keep_every_log_probability_within_half_a_step_of_the_float64_value(zeros: int) -> None:
    probs = _rows(0, (4, 5, 32), zeros)
    codes, offset, step = quantize_log_probs(probs.float())
    assert codes.dtype == torch.uint8 and offset.dtype == step.dtype == torch.float16
    positive = probs > 0
    assert torch.all((codes <= MAX_CODE) == positive) and torch.all((codes == ZERO_CODE) == ~positive)
    decoded = dequantize_log_probs(codes, offset, step).double()
    assert torch.all(decoded[~positive] == 0)
    # The bound in float64: |log p̂ − log p| ≤ s/2, plus the float32 rounding of log p and of the decode.
    error = (decoded[positive].log() - probs[positive].log()).abs()
    bound = step.double()[..., None].expand_as(probs)[positive] / 2
    slack = 4 * torch.finfo(torch.float32).eps * (1 + probs[positive].log().abs())
    assert torch.all(error <= bound + slack), float((error - bound).max())
    # The grid spans the row: the largest entry gets code 0, the smallest positive one code 254 (to within one).
    assert torch.all(codes[..., 0] == 0)
    last = positive.sum(-1) - 1
    assert torch.all(codes.gather(-1, last[..., None]).long() >= MAX_CODE - 1)


def test_8_bit_codes_of_log_probabilities_match_those_of_probabilities() -> None:
    probs = _rows(1, (3, 16), zeros=2).float()
    log_probs = torch.where(probs > 0, probs.log(), -math.inf)
    assert all(torch.equal(a, b) for a, b in zip(quantize_logs(log_probs), quantize_log_probs(probs), strict=True))
    decoded = dequantize_logs(*quantize_logs(log_probs))
    assert torch.all(torch.isneginf(decoded) == torch.isneginf(log_probs))


def test_a_row_of_one_value_and_a_row_of_zeros_decode_exactly() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    codes, offset, step = quantize_log_probs(probs)
    assert codes[:2].tolist() == [[0, ZERO_CODE, ZERO_CODE], [ZERO_CODE] * 3]
    assert codes[2, 0] == codes[2, 1] <= MAX_CODE and codes[2, 2] == ZERO_CODE
    assert step[:2].tolist() == [0.0, 0.0]
    decoded = dequantize_log_probs(codes, offset, step)
    assert decoded[1].tolist() == [0.0, 0.0, 0.0] and decoded[0, 1:].tolist() == [0.0, 0.0]
    assert decoded[0, 0].item() == pytest.approx(1.0, abs=1e-3) and decoded[2, :2].tolist() == pytest.approx(
        [0.5, 0.5], rel=1e-3
    )


def test_stored_rows_depend_on_the_sample_id_alone_and_cover_every_stratum() -> None:
    seq_len, fraction = 64, 0.25
    ids = torch.tensor([7, 3, 1000, 12])
    rows = stored_rows(ids, seq_len, fraction)
    count = stored_row_count(seq_len, fraction)
    assert rows.shape == (4, count) == (4, 16) and rows.dtype == torch.int64
    for position, sample_id in enumerate(ids.tolist()):
        alone = stored_rows(torch.tensor([sample_id]), seq_len, fraction)[0]
        assert torch.equal(rows[position], alone)  # whatever else is in the batch, shard or rank
    assert torch.all(rows[:, 1:] > rows[:, :-1])  # sorted, distinct
    strata = torch.arange(count) * seq_len // count
    assert torch.all(rows >= strata) and torch.all(rows < strata + seq_len // count)  # one row in each stratum
    assert not torch.equal(rows[0], rows[1])
    assert torch.equal(stored_rows(ids, seq_len, 1.0), torch.arange(seq_len).expand(4, seq_len))
    assert stored_row_count(10, 0.01) == 1 and stored_row_count(10, 0.26) == 3


def test_every_row_is_stored_equally_often_so_row_means_are_unbiased() -> None:
    """Over many sample ids each position is stored with probability R / T (the stratified draw is uniform in each
    stratum): a per-row mean over the stored rows estimates the mean over all rows without bias."""
    seq_len, fraction, samples = 32, 0.25, 4000
    rows = stored_rows(torch.arange(samples), seq_len, fraction)
    frequency = torch.bincount(rows.flatten(), minlength=seq_len).double() / samples
    expected = stored_row_count(seq_len, fraction) / seq_len
    spread = math.sqrt(expected * (1 - expected) / samples)
    assert torch.all((frequency - expected).abs() < 5 * spread), frequency


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_from_8_bit_logit_targets_stays_within_the_documented_bound_of_the_float64_kd(temperature: float) -> None:
    """Per position, KD(τ) against decoded 8-bit targets differs from the float64 bucket KL of the exact top-k targets
    by at most τ² · ((e^{s/τ} − 1) · Σ_b t_b |log(t_b / q_b)| + s/τ) — s the position's step, t and q the teacher's
    and the student's (k+1)-bucket distributions at τ (`pipeline.targets.codecs`). The tail sums are stored exactly."""
    generator = torch.Generator().manual_seed(3)
    vocab, k = 300, 16
    teacher_logits = torch.randn(2, 7, vocab, generator=generator, dtype=torch.float64) * 4
    student_logits = torch.randn(2, 7, vocab, generator=generator, dtype=torch.float64) * 2
    values, indices, tails = topk_targets(teacher_logits.float(), k, (temperature,))
    codes, offset, step = quantize_logs(values)
    decoded = dequantize_logs(codes, offset, step)
    labels = torch.zeros(2, 7, dtype=torch.long)
    kd = torch.zeros(2, 7, dtype=torch.float64)
    for position in range(14):  # one position per call: the per-position KD
        mask = torch.zeros(14, dtype=torch.bool)
        mask[position] = True
        arguments = (decoded, indices, tails[..., 0], mask.reshape(2, 7), temperature, "sum")
        kd.view(-1)[position] = logit_losses(student_logits.float(), labels, *arguments)[1].double()
    # float64 reference: the (k+1)-bucket distributions of softmax(z/τ) on both sides, from the logits themselves
    teacher = (teacher_logits / temperature).log_softmax(-1).exp()
    student = (student_logits / temperature).log_softmax(-1).exp()

    def buckets(probs: torch.Tensor) -> torch.Tensor:
        kept = probs.gather(-1, indices)
        return torch.cat([kept, (1 - kept.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)

    target, ours = buckets(teacher), buckets(student)
    log_ratio = (target.log() - ours.log()).abs()
    reference = (target * (target.log() - ours.log())).sum(-1) * temperature**2
    scaled = step.double() / temperature
    bound = temperature**2 * (torch.expm1(scaled) * (target * log_ratio).sum(-1) + scaled) + 1e-5
    assert torch.all(step > 0) and float(step.max()) > 0.01  # the codes do lose precision here
    assert torch.all((kd.double() - reference).abs() <= bound), float(((kd.double() - reference).abs() - bound).max())
