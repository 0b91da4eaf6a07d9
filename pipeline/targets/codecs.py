"""Compact forms of cached numbers: integers in the fewest bits that hold them, and log-probabilities in 8 bits.

- `pack_bits` / `unpack_bits`: non-negative integers below 2^b as a little-endian bit stream, b bits each (12 for key
  indices when T ≤ 4096, 17 for a 128K vocabulary), one byte row per sample.
- `quantize_log_probs` / `dequantize_log_probs`: probabilities p of a row (a top-m attention row, a top-k logit row)
  as 8-bit codes of log p on a per-row grid: offset o = the row's largest log p, step s = (o − smallest) / 254 (both
  float16, rounded up so every code fits), code c = round((o − log p) / s) ∈ [0, 254]; code 255 is an exact
  zero. Decoding gives log p̂ = o − c · s with |log p̂ − log p| ≤ s / 2 for every positive entry (so
  p̂ ∈ p · [e^(−s/2), e^(s/2)]) and p̂ = 0 exactly where p = 0. The tail sums beside the codes stay float32: the
  exact-τ bucket KL depends on them. Renormalised at τ (`ops.kd.soften_topk`), every bucket of the decoded target
  is within e^(±s/τ) of the exact one, so per position the KD moves by at most
  τ² · ((e^(s/τ) − 1) · Σ_b t_b |log(t_b / q_b)| + s/τ) (t, q: teacher and student buckets at τ; tested against the
  float64 KD). A top-64 logit row spanning 12 nats has s ≈ 0.047: each probability within ±2.4 %.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ZERO_CODE = 255
"""The code of an exact zero probability (a causal zero picked by a row shorter than m, a banned token)."""
MAX_CODE = 254
"""Largest code of a positive probability: the row's smallest kept log-probability."""


def bits_for(limit: int) -> int:
    """The fewest bits that hold every integer in [0, limit): 12 for key indices up to T = 4096, 17 for 128256."""
    return max(1, (limit - 1).bit_length())


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` values of `bits` bits."""
    return math.ceil(count * bits / 8)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Integers [N, C] (each in [0, 2^bits)) → uint8 [N, ceil(C · bits / 8)], value j's bit k at bit j·bits + k of
    the row (little-endian)."""
    rows, count = values.shape
    planes = (values.long()[..., None] >> torch.arange(bits, device=values.device)) & 1
    stream = planes.reshape(rows, count * bits).to(torch.uint8)
    stream = torch.nn.functional.pad(stream, (0, -stream.shape[1] % 8))
    weights = (1 << torch.arange(8, device=values.device)).to(torch.uint8)
    return (stream.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 [N, bytes] → int64 [N, count]."""
    rows = packed.shape[0]
    stream = (packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1
    planes = stream.reshape(rows, -1)[:, : count * bits].reshape(rows, count, bits)
    return (planes << torch.arange(bits, device=packed.device)).sum(-1)


def _round_up_half(values: Tensor) -> Tensor:
    """`values` (fp32) as float16 rounded up: an offset at or above the row's largest log-probability keeps every
    code ≥ 0, a step at or above the exact one keeps every code ≤ `MAX_CODE`."""
    rounded = values.half()
    low = rounded.float() < values
    return torch.where(low, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)


def quantize_log_probs(probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of probabilities [..., m] → (codes uint8 [..., m], offset float16 [...], step float16 [...]): see the
    module docstring. A row without a positive entry has offset 0, step 0 and every code `ZERO_CODE`."""
    probs = probs.float()
    positive = probs > 0
    return quantize_logs(torch.where(positive, probs.clamp_min(torch.finfo(torch.float32).tiny).log(), -math.inf))


def quantize_logs(log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`quantize_log_probs` of rows given as log-probabilities [..., m] (−inf: an exact zero)."""
    log_probs = log_probs.float()
    positive = log_probs > -math.inf
    high = torch.where(positive, log_probs, -math.inf).amax(-1)
    low = torch.where(positive, log_probs, math.inf).amin(-1)
    empty = ~positive.any(-1)
    offset = _round_up_half(torch.where(empty, 0.0, high))
    step = _round_up_half(torch.where(empty, 0.0, (offset.float() - low) / MAX_CODE))
    finite = torch.where(positive, log_probs, 0.0)
    scaled = (offset.float()[..., None] - finite) / torch.where(step > 0, step.float(), 1.0)[..., None]
    codes = scaled.round().clamp(0, MAX_CODE)
    codes = torch.where(positive, codes, float(ZERO_CODE)).to(torch.uint8)
    return codes, offset, step


def dequantize_logs(codes: Tensor, offset: Tensor, step: Tensor) -> Tensor:
    """Log-probabilities [..., m] fp32 of `quantize_logs`' output (−inf where the code is `ZERO_CODE`)."""
    log_probs = offset.float()[..., None] - codes.float() * step.float()[..., None]
    return torch.where(codes == ZERO_CODE, -math.inf, log_probs)


def dequantize_log_probs(codes: Tensor, offset: Tensor, step: Tensor) -> Tensor:
    """Probabilities [..., m] fp32 of `quantize_log_probs`' output (exact zeros where the code is `ZERO_CODE`)."""
    return dequantize_logs(codes, offset, step).exp()


def log_error_bound(step: Tensor) -> Tensor:
    """The largest |log p̂ − log p| of a positive entry of rows with `step`: half a step."""
    return step.float() / 2
