"""Value checks of cached targets: what the writer refuses to write and the reader refuses to train on.

Checksums prove that a shard holds the bytes its writer wrote; these checks prove that the values can be trained on.
Every float is finite; probabilities and tail sums are ≥ 0; every causal row of a target map sums to 1 (the row of
the packed triangle, or a top-m row's values plus its τ = 1 tail); at every position the teacher's top-k
probabilities plus the tail mass sum to 1; squeeze weights α lie in [0, 1]; token ids and key indices (packed or
not) are in range; 8-bit codes have a finite offset and a step ≥ 0; the stored query rows are the ones
`rows.stored_rows` draws for each sample id; sample ids are unique. "Sums to 1" allows what the on-disk form can
move a sum — a 16-bit dtype's rounding (`row_tolerance`), or half a step of an 8-bit code in log space
(`code_tolerance`) — so a correct cache always passes and a NaN, a zeroed or overwritten row, or log-probabilities
stored as probabilities never do.

Each check returns the first problem as text naming the tensor, its teacher layer, the sample id, where in the
sample, the value found and what was expected (None when the tensor is fine); the writer and the reader prefix the
file and add the fix. Tensors are checked a few million entries at a time, so the work buffers stay small.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.targets.codecs import ZERO_CODE, bits_for, dequantize_logs, unpack_bits
from pipeline.targets.encoding import TensorSpec, triangle_size
from pipeline.targets.layout import expected_tensors
from pipeline.targets.logits import LOSS_MASK_TENSOR, SAMPLE_TENSORS, unpack_loss_mask
from pipeline.targets.rows import stored_rows

COMPUTE_SLACK = 1e-4
"""Error allowed for the fp32 computation behind a stored sum (softmax, squeeze, block sums of the logits' tail)."""
CHUNK_ELEMENTS = 1 << 22
"""Entries checked at a time (fp64 work buffers of 32 MiB)."""


def tensor_roles(fingerprint: dict[str, Any]) -> dict[str, str]:
    """Tensor name → what it holds (`TensorSpec.role` of the layout): `ids`, `tokens`, `logprobs`, `logit_codes`,
    `vocab_indices`, `tail` (tail sums), `alpha`, `map` (a dense triangle), `map_values`, `map_codes`,
    `map_indices` (top-m), `code_offset`, `code_step`, `rows`."""
    return {name: spec.role for name, spec in expected_tensors(fingerprint, 0).items()}


def companion_names(fingerprint: dict[str, Any], name: str) -> tuple[str, ...]:
    """The tensors a check of `name` reads beside it (`TensorSpec.companions`: the τ = 1 tail of the logits or of a
    top-m map, and the offset and step of 8-bit codes)."""
    return expected_tensors(fingerprint, 0)[name].companions


def row_tolerance(dtype: torch.dtype, entries: int | Tensor, mass: float | Tensor = 1.0) -> float | Tensor:
    """How far from 1 a row of `entries` stored probabilities of total `mass` may sum: each entry is rounded to
    `dtype` with a relative error of at most u = eps/2 (or by half the subnormal spacing), so the sum moves by at
    most u·mass + entries·spacing; twice that, plus `COMPUTE_SLACK`."""
    info = torch.finfo(dtype)
    return info.eps * mass + entries * info.tiny * info.eps + COMPUTE_SLACK


def code_tolerance(probs: Tensor, step: Tensor) -> Tensor:
    """How far from 1 rows of decoded 8-bit probabilities `probs` [..., m] (fp64) with `step` [...] may sum: each
    decoded p̂ is within a factor e^(±s/2) of the p it encodes (`codecs`), so the row moves by at most
    Σ p̂ (e^(s/2) − 1); twice that, plus `COMPUTE_SLACK`."""
    return 2 * probs.sum(-1) * torch.expm1(step.double() / 2) + COMPUTE_SLACK


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
    if role == "map_row":
        return f", head {index[0]}, query row {index[1]}"
    if role in ("map_values", "map_codes", "map_indices"):
        return f", head {index[0]}, stored row {index[1]}, entry {index[2]}"
    if role in ("tail", "code_offset", "code_step") and len(index) == 2:
        return f", head {index[0]}, stored row {index[1]}"
    if role in ("logprobs", "logit_codes", "vocab_indices"):
        return f", position {index[0]}, entry {index[1]}"
    if role in ("tail", "tokens", "code_offset", "code_step"):
        return f", position {index[0]}"
    if role == "rows":
        return f", stored row {index[0]}"
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


def _range_problem(
    label: str, role: str, tensor: Tensor, sample_ids: Tensor, limit: int, what: str, first_row: int = 0
) -> str | None:
    """Every integer of `tensor` (sample rows `first_row`… of the shard) is in [0, limit)."""
    for start, chunk in _chunks(tensor):
        values = chunk.to(torch.int64)
        where = _first((values < 0) | (values >= limit))
        if where is not None:
            index = (where[0] + start + first_row, *where[1:])
            return _culprit(label, role, index, sample_ids, f"{what} {int(values[where])}", f"0 ≤ {what} < {limit}")
    return None


def _value_problem(label: str, role: str, tensor: Tensor, sample_ids: Tensor, upper: float | None) -> str | None:
    """Finite everywhere, and (for probabilities, tails, α) ≥ 0 and at most `upper`."""
    for start, chunk in _chunks(tensor):
        where = _first(~torch.isfinite(chunk))
        if where is not None:
            index = (where[0] + start, *where[1:])
            return _culprit(label, role, index, sample_ids, f"{float(chunk[where])}", "a finite value")
        if role in ("logprobs", "code_offset"):
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
        problem = _sum_problem(label, "map_row", sums, tolerance, start, sample_ids, "the entries of a causal row")
        if problem is not None:
            return problem
    return None


def _decoded(values: Tensor, companions: dict[str, Tensor], start: int) -> tuple[Tensor, Tensor | None]:
    """(probabilities fp64, the step of each row or None) of a chunk of stored values starting at sample row
    `start`: 16-bit probabilities as they are, 8-bit codes decoded with their offset and step."""
    if values.dtype != torch.uint8:
        return values.double(), None
    offset, step = (companions[key][start : start + len(values)] for key in ("offset", "step"))
    return dequantize_logs(values, offset, step).double().exp(), step


def _topk_row_problem(label: str, values: Tensor, companions: dict[str, Tensor], sample_ids: Tensor) -> str | None:
    """A top-m row's values [N, H, R, m] (16-bit probabilities or 8-bit codes) plus its τ = 1 tail [N, H, R] sum
    to 1."""
    for start, chunk in _chunks(values):
        probs, step = _decoded(chunk, companions, start)
        sums = probs.sum(-1) + companions["tail"][start : start + len(chunk)].double()
        tolerance = row_tolerance(chunk.dtype, chunk.shape[-1]) if step is None else code_tolerance(probs, step)
        problem = _sum_problem(
            label, "tail", sums, tolerance, start, sample_ids, "the top-m values and the tail of a row"
        )
        if problem is not None:
            return problem
    return None


def _logit_problem(label: str, values: Tensor, companions: dict[str, Tensor], sample_ids: Tensor) -> str | None:
    """At every position the top-k probabilities [N, T, k] plus the tail mass [N, T] sum to 1. A stored 16-bit
    log-prob v is off by at most u·|v|, its probability p by p·expm1(u·|v|); an 8-bit code by half its step."""
    half_eps = torch.finfo(values.dtype).eps / 2 if values.dtype.is_floating_point else 0.0
    for start, chunk in _chunks(values):
        if chunk.dtype == torch.uint8:
            probs, step = _decoded(chunk, companions, start)
            tolerance = code_tolerance(probs, step)
        else:
            logprobs = chunk.double()
            probs = logprobs.exp()
            tolerance = 2 * (probs * torch.expm1(half_eps * logprobs.abs())).sum(-1) + COMPUTE_SLACK
        sums = probs.sum(-1) + companions["tail"][start : start + len(chunk)].double()
        problem = _sum_problem(
            label, "tail", sums, tolerance, start, sample_ids, "the top-k probabilities and the tail mass"
        )
        if problem is not None:
            return problem
    return None


def _code_problem(label: str, role: str, codes: Tensor, step: Tensor, sample_ids: Tensor) -> str | None:
    """A row with a positive step has codes in [0, 254] or the zero code; a row with step 0 holds at most one
    distinct positive value (code 0) — anything else was not written by `codecs.quantize_logs`."""
    for start, chunk in _chunks(codes):
        flat = step[start : start + len(chunk)] == 0
        where = _first(flat[..., None] & (chunk != 0) & (chunk != ZERO_CODE))
        if where is not None:
            index = (where[0] + start, *where[1:])
            found = f"code {int(chunk[where])} in a row whose step is 0"
            return _culprit(label, role, index, sample_ids, found, f"code 0 or {ZERO_CODE}")
    return None


def _rows_problem(
    label: str, packed: Tensor, spec: TensorSpec, fingerprint: dict[str, Any], ids: Tensor, trained: Tensor | None
) -> str | None:
    """The stored rows of every sample are the ones `rows.stored_rows` draws for its id (and, for chat data, its
    stored loss mask `trained`, packed)."""
    seq_len, count = fingerprint["seq_len"], spec.unpacked[0]
    for start, chunk in _chunks(packed):
        found = unpack_bits(chunk, bits_for(seq_len), count)
        mask = None if trained is None else unpack_loss_mask(trained[start : start + len(chunk)], seq_len)
        expected = stored_rows(ids[start : start + len(chunk)], seq_len, fingerprint["attn_row_fraction"], mask)
        where = _first(found != expected)
        if where is not None:
            index = (where[0] + start, *where[1:])
            return _culprit(
                label,
                "rows",
                index,
                ids,
                f"query row {int(found[where])}",
                f"row {int(expected[where])} (the rows `cache.attn_row_fraction` draws for this sample id)",
            )
    return None


def _loss_mask_problem(label: str, packed: Tensor, seq_len: int, ids: Tensor) -> str | None:
    """Every sample of chat data trains at least one position (`distill prepare` drops a conversation without a
    reply token), and never the last one (it predicts nothing)."""
    for start, chunk in _chunks(packed):
        trained = unpack_loss_mask(chunk, seq_len)
        empty = _first(~trained.any(1))
        if empty is not None:
            return _culprit(label, "loss_mask", (empty[0] + start,), ids, "no trained position", "at least one")
        last = _first(trained[:, -1])
        if last is not None:
            return _culprit(label, "loss_mask", (last[0] + start,), ids, "the last position trained", "never")
    return None


def _packed_range_problem(
    label: str, role: str, packed: Tensor, spec: TensorSpec, sample_ids: Tensor, limit: int, what: str
) -> str | None:
    """Every integer of a packed tensor is below `limit` (a bit stream of ⌈log2 limit⌉-bit values can hold more)."""
    count = 1
    for extent in spec.unpacked:
        count *= extent
    step = max(1, CHUNK_ELEMENTS // max(1, count))
    for start in range(0, len(packed), step):
        values = unpack_bits(packed[start : start + step], bits_for(limit), count).reshape(-1, *spec.unpacked)
        problem = _range_problem(label, role, values, sample_ids, limit, what, start)
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
    name: str,
    tensor: Tensor,
    fingerprint: dict[str, Any],
    sample_ids: Tensor,
    companions: dict[str, Tensor] | None = None,
) -> str | None:
    """The first problem of shard tensor `name` (the checks of the module docstring for its role), or None.

    `companions`: the tensors `companion_names` names, by name (the sum checks of top-k log-probs, top-m values and
    8-bit codes need them; without them only the tensor's own values are checked).
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
    if role == "tokens":
        return _range_problem(label, role, tensor, sample_ids, fingerprint["vocab_size"], "token id")
    if role == "vocab_indices":
        return _packed_range_problem(label, role, tensor, spec, sample_ids, fingerprint["vocab_size"], "token id")
    if role == "map_indices":
        return _packed_range_problem(label, role, tensor, spec, sample_ids, fingerprint["seq_len"], "key index")
    if role == "rows":
        trained = companions[LOSS_MASK_TENSOR] if spec.companions and companions is not None else None
        if spec.companions and trained is None:
            raise ValueError(f"{label}: chat data's stored rows are checked against their loss mask; pass it")
        return _rows_problem(label, tensor, spec, fingerprint, sample_ids, trained)
    if role == "loss_mask":
        return _loss_mask_problem(label, tensor, fingerprint["seq_len"], sample_ids)
    if role in ("map_codes", "logit_codes"):
        problem = None
    else:
        upper = 1.0 + COMPUTE_SLACK if role == "alpha" else None
        problem = _value_problem(label, role, tensor, sample_ids, upper)
    if problem is not None or not spec.companions or not companions:
        return problem
    tail, *code_parts = spec.companions
    tail_label = _label(tail, specs[tail].layer)
    problem = _value_problem(tail_label, "tail", companions[tail], sample_ids, None)
    parts = {"tail": companions[tail]}
    for part, key in zip(code_parts, ("offset", "step")[: len(code_parts)], strict=True):
        part_label = _label(part, specs[part].layer)
        problem = problem or _value_problem(part_label, specs[part].role, companions[part], sample_ids, None)
        parts[key] = companions[part]
    if problem is None and code_parts:
        problem = _code_problem(label, role, tensor, parts["step"], sample_ids)
    if problem is not None:
        return problem
    if role in ("map_values", "map_codes"):
        return _topk_row_problem(label, tensor, parts, sample_ids)
    if role in ("logprobs", "logit_codes"):
        return _logit_problem(label, tensor, parts, sample_ids)
    return None


def shard_problem(tensors: dict[str, Tensor], fingerprint: dict[str, Any]) -> str | None:
    """The first problem among every tensor of a shard (the writer checks a shard this way before writing it)."""
    specs = expected_tensors(fingerprint, 0)
    sample_ids = tensors["sample_ids"]
    for name in (*SAMPLE_TENSORS, *sorted(set(tensors) - set(SAMPLE_TENSORS))):
        companions = {key: tensors[key] for key in specs[name].companions if key in tensors}
        problem = tensor_problem(name, tensors[name], fingerprint, sample_ids, companions)
        if problem is not None:
            return problem
    return None
