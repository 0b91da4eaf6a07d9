"""Value checks of cached targets: what the writer refuses to write and the reader refuses to train on.

Checksums prove that a shard holds the bytes its writer wrote; these checks prove that the values can be trained on.
Every float is finite; probabilities and tail sums are ≥ 0; every causal row of a target map sums to 1 (the row of
the packed triangle, or a top-m row's values plus its τ = 1 tail); at every position the teacher's top-k
probabilities plus the tail mass sum to 1; squeeze weights α lie in [0, 1]; token ids and key indices are in range;
sample ids are unique. "Sums to 1" allows what the on-disk dtype's rounding can move a sum (`row_tolerance`), so a
correct cache always passes and a NaN, a zeroed or overwritten row, or log-probabilities stored as probabilities
never do.

Each check returns the first problem as text naming the tensor, its teacher layer, the sample id, where in the
sample, the value found and what was expected (None when the tensor is fine); the writer and the reader prefix the
file and add the fix. Tensors are checked a few million entries at a time, so the work buffers stay small.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.targets.encoding import triangle_size
from pipeline.targets.layout import expected_tensors
from pipeline.targets.logits import SAMPLE_TENSORS

COMPUTE_SLACK = 1e-4
"""Error allowed for the fp32 computation behind a stored sum (softmax, squeeze, block sums of the logits' tail)."""
CHUNK_ELEMENTS = 1 << 22
"""Entries checked at a time (fp64 work buffers of 32 MiB)."""


def tensor_roles(fingerprint: dict[str, Any]) -> dict[str, str]:
    """Tensor name → what it holds (`TensorSpec.role` of the layout): `ids`, `tokens`, `logprobs`,
    `vocab_indices`, `tail` (tail sums), `alpha`, `map` (a dense triangle), `map_values`, `map_indices` (top-m)."""
    return {name: spec.role for name, spec in expected_tensors(fingerprint, 0).items()}


def companion_name(fingerprint: dict[str, Any], name: str) -> str | None:
    """The tensor a sum check of `name` needs beside it (`TensorSpec.companion`: the τ = 1 tail of the logits or of
    a top-m map), or None."""
    return expected_tensors(fingerprint, 0)[name].companion


def row_tolerance(dtype: torch.dtype, entries: int | Tensor, mass: float | Tensor = 1.0) -> float | Tensor:
    """How far from 1 a row of `entries` stored probabilities of total `mass` may sum: each entry is rounded to
    `dtype` with a relative error of at most u = eps/2 (or by half the subnormal spacing), so the sum moves by at
    most u·mass + entries·spacing; twice that, plus `COMPUTE_SLACK`."""
    info = torch.finfo(dtype)
    return info.eps * mass + entries * info.tiny * info.eps + COMPUTE_SLACK


def _label(name: str, layer: int | None) -> str:
    """How a message names a tensor: `tensor 'attn.L3.H2.shd' (teacher layer 3)`."""
    return f"tensor '{name}'" + (f" (teacher layer {layer})" if layer is not None else "")


def _place(role: str, index: tuple[int, ...]) -> str:
    """Where inside a sample entry `index` (without the sample row) lies, in words."""
    if role == "map":
        head, offset = index
        query = (int(np.sqrt(8 * offset + 1)) - 1) // 2
        query -= triangle_size(query) > offset
        return f", head {head}, query row {query}, key {offset - triangle_size(query)}"
    if role in ("map_values", "map_indices"):
        return f", head {index[0]}, query row {index[1]}, entry {index[2]}"
    if role == "tail" and len(index) == 2:
        return f", head {index[0]}, query row {index[1]}"
    if role in ("logprobs", "vocab_indices"):
        return f", position {index[0]}, entry {index[1]}"
    if role in ("tail", "tokens"):
        return f", position {index[0]}"
    if role == "alpha":
        return f", teacher head {index[0]}"
    return ""


def _culprit(label: str, role: str, index: tuple[int, ...], sample_ids: Tensor, found: str, expected: str) -> str:
    row = index[0]
    return (
        f"{label}: {found} at sample id {int(sample_ids[row])} (shard row {row})"
        f"{_place(role, index[1:])}; expected {expected}"
    )


def _first(mask: Tensor) -> tuple[int, ...] | None:
    """Index of the first True entry of `mask`, or None."""
    hits = mask.flatten().nonzero()
    if len(hits) == 0:
        return None
    return tuple(int(value) for value in np.unravel_index(int(hits[0]), tuple(mask.shape)))


def _chunks(tensor: Tensor) -> list[tuple[int, Tensor]]:
    """(first sample row, rows) of `tensor` [N, ...] in pieces of about `CHUNK_ELEMENTS` entries."""
    per_row = max(1, tensor[0].numel()) if len(tensor) else 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(start, tensor[start : start + step]) for start in range(0, len(tensor), step)]


def _range_problem(label: str, role: str, tensor: Tensor, sample_ids: Tensor, limit: int, what: str) -> str | None:
    for start, chunk in _chunks(tensor):
        values = chunk.to(torch.int64)
        where = _first((values < 0) | (values >= limit))
        if where is not None:
            index = (where[0] + start, *where[1:])
            return _culprit(label, role, index, sample_ids, f"{what} {int(values[where])}", f"0 ≤ {what} < {limit}")
    return None


def _value_problem(label: str, role: str, tensor: Tensor, sample_ids: Tensor, upper: float | None) -> str | None:
    """Finite everywhere, and (for probabilities, tails, α) ≥ 0 and at most `upper`."""
    for start, chunk in _chunks(tensor):
        where = _first(~torch.isfinite(chunk))
        if where is not None:
            index = (where[0] + start, *where[1:])
            return _culprit(label, role, index, sample_ids, f"{float(chunk[where])}", "a finite value")
        if role == "logprobs":
            continue
        outside = chunk < 0 if upper is None else (chunk < 0) | (chunk > upper)
        where = _first(outside)
        if where is not None:
            index = (where[0] + start, *where[1:])
            bounds = "a value ≥ 0" if upper is None else f"a value in [0, {upper:g}]"
            return _culprit(label, role, index, sample_ids, f"{float(chunk[where]):.6g}", bounds)
    return None


def _sum_problem(
    label: str, role: str, sums: Tensor, tolerance: Tensor | float, start: int, sample_ids: Tensor, what: str
) -> str | None:
    where = _first((sums - 1).abs() > tolerance)
    if where is None:
        return None
    allowed = tolerance if isinstance(tolerance, float) else float(tolerance.expand_as(sums)[where])
    index = (where[0] + start, *where[1:])
    found = f"{what} sum to {float(sums[where]):.6g}"
    return _culprit(label, role, index, sample_ids, found, f"1 ± {allowed:.2g} (a probability distribution)")


def _dense_row_problem(label: str, packed: Tensor, seq_len: int, sample_ids: Tensor) -> str | None:
    """Each query row i of a packed causal triangle [N, H, T(T+1)/2] holds i + 1 probabilities summing to 1."""
    ends = torch.tensor([triangle_size(row + 1) - 1 for row in range(seq_len)])
    tolerance = row_tolerance(packed.dtype, torch.arange(1, seq_len + 1, dtype=torch.float64))
    for start, chunk in _chunks(packed):
        cumulative = chunk.double().cumsum(-1)[..., ends]
        sums = torch.diff(cumulative, dim=-1, prepend=torch.zeros_like(cumulative[..., :1]))
        problem = _sum_problem(label, "tail", sums, tolerance, start, sample_ids, "the entries of a causal row")
        if problem is not None:
            return problem
    return None


def _topk_row_problem(label: str, values: Tensor, tail: Tensor, sample_ids: Tensor) -> str | None:
    """A top-m row's values [N, H, T, m] plus its τ = 1 tail [N, H, T] sum to 1."""
    tolerance = row_tolerance(values.dtype, values.shape[-1])
    for start, chunk in _chunks(values):
        sums = chunk.double().sum(-1) + tail[start : start + len(chunk)].double()
        problem = _sum_problem(
            label, "tail", sums, tolerance, start, sample_ids, "the top-m values and the tail of a row"
        )
        if problem is not None:
            return problem
    return None


def _logit_problem(values: Tensor, tail: Tensor, sample_ids: Tensor) -> str | None:
    """At every position the top-k probabilities exp(log-prob) [N, T, k] plus the tail mass [N, T] sum to 1; a
    stored log-prob v is off by at most u·|v|, its probability p by p·expm1(u·|v|)."""
    half_eps = torch.finfo(values.dtype).eps / 2
    for start, chunk in _chunks(values):
        logprobs = chunk.double()
        probs = logprobs.exp()
        sums = probs.sum(-1) + tail[start : start + len(chunk)].double()
        tolerance = 2 * (probs * torch.expm1(half_eps * logprobs.abs())).sum(-1) + COMPUTE_SLACK
        problem = _sum_problem(
            "tensor 'topk_values'",
            "tail",
            sums,
            tolerance,
            start,
            sample_ids,
            "the top-k probabilities and the tail mass",
        )
        if problem is not None:
            return problem
    return None


def sample_id_problem(sample_ids: Tensor, low: int | None = None, high: int | None = None) -> str | None:
    """A shard's sample ids [N] are distinct and, where the manifest records the shard's range, inside [low, high]."""
    if low is not None and high is not None:
        where = _first((sample_ids < low) | (sample_ids > high))
        if where is not None:
            return (
                f"tensor 'sample_ids': sample id {int(sample_ids[where])} (shard row {where[0]}) is outside the "
                f"shard's range in the manifest; expected an id in [{low}, {high}]"
            )
    ordered, order = sample_ids.sort(stable=True)
    repeated = _first(ordered[1:] == ordered[:-1])
    if repeated is not None:
        row = int(order[repeated[0] + 1])
        first_row = int(order[repeated[0]])
        return f"sample id {int(sample_ids[row])} is held twice by this shard (rows {first_row} and {row})"
    return None


def tensor_problem(
    name: str, tensor: Tensor, fingerprint: dict[str, Any], sample_ids: Tensor, companion: Tensor | None = None
) -> str | None:
    """The first problem of shard tensor `name` (the checks of the module docstring for its role), or None.

    `companion` is the tensor `companion_name` names (the τ = 1 tail beside top-k log-probs or top-m values).
    """
    specs = expected_tensors(fingerprint, 0)
    spec = specs[name]
    role, label = spec.role, _label(name, spec.layer)
    if role == "map":
        return _value_problem(label, role, tensor, sample_ids, None) or _dense_row_problem(
            label, tensor, fingerprint["seq_len"], sample_ids
        )
    if role == "ids":
        return sample_id_problem(tensor)
    if role == "tokens" or role == "vocab_indices":
        return _range_problem(label, role, tensor, sample_ids, fingerprint["vocab_size"], "token id")
    if role == "map_indices":
        return _range_problem(label, role, tensor, sample_ids, fingerprint["seq_len"], "key index")
    problem = _value_problem(label, role, tensor, sample_ids, 1.0 + COMPUTE_SLACK if role == "alpha" else None)
    if problem is not None or companion is None or spec.companion is None:
        return problem
    tail_label = _label(spec.companion, specs[spec.companion].layer)
    if role == "map_values":
        return _value_problem(tail_label, "tail", companion, sample_ids, None) or _topk_row_problem(
            label, tensor, companion, sample_ids
        )
    if role == "logprobs":
        return _value_problem(tail_label, "tail", companion, sample_ids, None) or _logit_problem(
            tensor, companion, sample_ids
        )
    return None


def shard_problem(tensors: dict[str, Tensor], fingerprint: dict[str, Any]) -> str | None:
    """The first problem among every tensor of a shard (the writer checks a shard this way before writing it)."""
    specs = expected_tensors(fingerprint, 0)
    sample_ids = tensors["sample_ids"]
    for name in (*SAMPLE_TENSORS, *sorted(set(tensors) - set(SAMPLE_TENSORS))):
        companion = specs[name].companion
        problem = tensor_problem(name, tensors[name], fingerprint, sample_ids, tensors.get(companion or ""))
        if problem is not None:
            return problem
    return None
