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
import sys
from functools import cache

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


GROUP = 64
"""Values packed together: 64 values of b bits fill exactly b 64-bit words, so a value's word and shift are the same
in every group."""


@cache
def _layout(bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per value of a group: its word, its shift in the word, the mask of the bits it has there, and whether it
    spills into the next word."""
    offsets = torch.arange(GROUP, dtype=torch.int64) * bits
    word, shift = offsets // 64, offsets % 64
    spills = shift + bits > 64
    kept = torch.where(spills, 64 - shift, bits)
    return word, shift, (torch.ones_like(kept) << kept) - 1, spills


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Integers [N, C] (each in [0, 2^bits)) → uint8 [N, ceil(C · bits / 8)], value j's bit k at bit j·bits + k of
    the row (little-endian). Groups of 64 values are OR-ed into `bits` 64-bit words with a few whole-tensor shifts
    (disjoint bits, so the adds of `index_add_` are ORs), not one plane per bit."""
    rows, count = values.shape
    groups = -(-count // GROUP)
    word, shift, _, spills = (part.to(values.device) for part in _layout(bits))
    low_bits = values.long() & ((1 << bits) - 1)  # an out-of-range value keeps its low bits, never its neighbours'
    grouped = torch.nn.functional.pad(low_bits, (0, groups * GROUP - count)).view(rows, groups, GROUP)
    words = torch.zeros(rows, groups, bits, dtype=torch.int64, device=values.device)
    words.index_add_(2, word, grouped << shift)
    if bool(spills.any()):
        words.index_add_(2, word[spills] + 1, grouped[..., spills] >> (64 - shift[spills]))
    return _to_bytes(words)[:, : packed_bytes(count, bits)].contiguous()


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 [N, bytes] → int64 [N, count]."""
    rows = packed.shape[0]
    groups = -(-count // GROUP)
    word, shift, kept, spills = (part.to(packed.device) for part in _layout(bits))
    stream = torch.nn.functional.pad(packed, (0, groups * bits * 8 - packed.shape[1]))
    words = _from_bytes(stream.contiguous(), groups, bits)
    values = (words[..., word] >> shift) & kept
    if bool(spills.any()):
        high = words[..., word[spills] + 1] << (64 - shift[spills])
        values[..., spills] |= high & ((1 << bits) - 1)
    return values.view(rows, groups * GROUP)[:, :count].contiguous()


def _to_bytes(words: Tensor) -> Tensor:
    """int64 words [N, G, W] → their little-endian bytes uint8 [N, G · W · 8] (a view on a little-endian machine)."""
    raw = words.view(torch.uint8).view(*words.shape, 8)
    return (raw if sys.byteorder == "little" else raw.flip(-1).contiguous()).view(words.shape[0], -1)


def _from_bytes(stream: Tensor, groups: int, bits: int) -> Tensor:
    """Inverse of `_to_bytes`: uint8 [N, G · W · 8] → int64 words [N, G, W]."""
    raw = stream.view(stream.shape[0], groups, bits, 8)
    return (raw if sys.byteorder == "little" else raw.flip(-1)).contiguous().view(torch.int64).squeeze(-1)


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
