"""The on-disk layout of one cache shard — the one schema the writer, the reader and `cache verify` share — plus the
encodings of target maps and a deterministic serialiser.

A shard is a safetensors file holding `shard_size` samples (T tokens each):

- `sample_ids` int64 [N], `input_ids` int32 [N, T]
- logits: `topk_values` f16/bf16 [N, T, k] (teacher log-probs), `topk_indices` uint16 (int32 when the vocabulary
  exceeds 65536) [N, T, k], and per cached temperature τ the tail sum R_τ = Σ_{not kept} p^{1/τ} f32 [N, T]:
  `tail_mass` (τ = 1: the probability outside the top k), `tail_mass.tau<τ>` for the others
- target maps (row-stochastic causal T × T maps of H "heads"), per cached teacher layer L:
  - `attn.L<L>.H<H>.<squeeze>` (squeeze `shd`, `shd_pairwise`, `uniform`): the teacher's heads squeezed into H
    student heads; `alpha.L<L>.H<H>.<squeeze>` f32 [N, H_t]: each teacher head's weight inside its group
  - `attn.L<L>.H<H>.selective`: the H teacher heads with the largest output share (chosen once per cache, listed in
    the manifest), `attn.L<L>.global`: the mean over all teacher heads (H = 1)
  - `rel.L<L>.R<R>.q|k|v`: MiniLMv2 relation maps over R relation heads
  each encoded as `dense`: `<name>` f16/bf16 [N, H, T(T+1)/2] (the causal lower triangle, row-major), or `topk`:
  `<name>.values` f16/bf16 [N, H, T, m] (probabilities), `<name>.indices` int16 (int32 when T > 32767)
  [N, H, T, m], and the row tail sums `<name>.tail` (τ = 1) / `<name>.tail.tau<τ>` f32 [N, H, T]

The safetensors metadata holds the layout version and the settings the shard was written with.
"""

from __future__ import annotations

import json
import struct
from functools import cache
from typing import Any, NamedTuple

import torch
from safetensors.torch import save

LAYOUT_VERSION = 2
INT16_MAX_SEQ_LEN = 32767
UINT16_VOCAB_LIMIT = 65536

SQUEEZES = ("shd", "shd_pairwise", "uniform")
"""Headwise targets: teacher head groups merged into one map per student head."""
MAP_KINDS = (*SQUEEZES, "selective", "global", "relations")
"""Every kind of target map a cache can hold (`cache.attn_targets`)."""
RELATIONS = ("q", "k", "v")
"""MiniLMv2's three self-relations."""
VALUE_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
"""On-disk dtype setting → safetensors dtype of probabilities and log-probabilities."""
INDEX_DTYPES = {torch.int16: "I16", torch.uint16: "U16", torch.int32: "I32"}
STORED_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    **INDEX_DTYPES,
}
"""Every torch dtype a shard stores → its safetensors name."""
SAMPLE_TENSORS = ("sample_ids", "input_ids", "topk_values", "topk_indices")
"""Tensors every reader takes from every shard (plus the logits' tail sums at its temperature)."""

TensorSpec = tuple[str, tuple[int | None, ...]]
"""A tensor's safetensors dtype and shape; None leaves an extent open."""


class MapSpec(NamedTuple):
    """One cached target map of a layer: its tensor name (the prefix of its encoded tensors) and its head count."""

    name: str
    heads: int


def shard_file_name(index: int) -> str:
    """`shard-00000.safetensors` …"""
    return f"shard-{index:05d}.safetensors"


def map_name(layer: int, kind: str, heads: int | None = None) -> str:
    """Name of the target map of teacher layer `layer` of `kind` (a squeeze, `selective` or `global`) for `heads`
    student heads (ignored for `global`)."""
    if kind == "global":
        return f"attn.L{layer}.global"
    if kind not in (*SQUEEZES, "selective"):
        raise ValueError(f"map kind {kind!r}: expected one of {(*SQUEEZES, 'selective', 'global')}")
    return f"attn.L{layer}.H{heads}.{kind}"


def relation_name(layer: int, relation_heads: int, relation: str) -> str:
    """Name of the teacher's `relation` (q, k or v) relation map of layer `layer` over R relation heads."""
    return f"rel.L{layer}.R{relation_heads}.{relation}"


def alpha_name(layer: int, heads: int, squeeze: str) -> str:
    """Name of the per-sample squeeze weights behind `map_name(layer, squeeze, heads)`."""
    return f"alpha.L{layer}.H{heads}.{squeeze}"


def tail_name(base: str, temperature: float) -> str:
    """Name of the tail sums R_τ of `base` (`tail_mass`, or `<map>.tail`): the base itself at τ = 1."""
    return base if temperature == 1.0 else f"{base}.tau{temperature:g}"


def cached_maps(fingerprint: dict[str, Any]) -> list[MapSpec]:
    """Every target map a cache with this fingerprint holds, in a fixed order."""
    specs = []
    for layer in fingerprint["cached_layers"]:
        for kind in fingerprint["attn_targets"]:
            if kind == "global":
                specs.append(MapSpec(map_name(layer, kind), 1))
            elif kind == "relations":
                heads = fingerprint["rel_heads"]
                specs += [MapSpec(relation_name(layer, heads, relation), heads) for relation in RELATIONS]
            else:
                specs += [MapSpec(map_name(layer, kind, heads), heads) for heads in fingerprint["student_head_counts"]]
    return specs


def index_dtype(seq_len: int) -> torch.dtype:
    """Key indices fit int16 up to T = 32767, halving their bytes."""
    return torch.int16 if seq_len <= INT16_MAX_SEQ_LEN else torch.int32


def vocab_index_dtype(vocab_size: int) -> torch.dtype:
    """Token ids of vocabularies up to 65536 (SmolLM2, GPT-2, LLaMA-2) fit uint16: 2 bytes per kept logit, not 4."""
    return torch.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else torch.int32


def map_tensors(fingerprint: dict[str, Any], spec: MapSpec, num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of the encoded tensors of one target map."""
    seq_len, value_dtype = fingerprint["seq_len"], VALUE_DTYPES[fingerprint["dtype"]]
    if fingerprint["encoding"] == "dense":
        return {spec.name: (value_dtype, (num_rows, spec.heads, triangle_size(seq_len)))}
    rows = (num_rows, spec.heads, seq_len, fingerprint["attn_top_m"])
    tensors: dict[str, TensorSpec] = {
        f"{spec.name}.values": (value_dtype, rows),
        f"{spec.name}.indices": (INDEX_DTYPES[index_dtype(seq_len)], rows),
    }
    for temperature in fingerprint["temperatures"]:
        tensors[tail_name(f"{spec.name}.tail", temperature)] = ("F32", rows[:-1])
    return tensors


def expected_tensors(fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of every tensor a shard of `num_rows` samples must hold (and nothing else)."""
    seq_len, top_k, value_dtype = fingerprint["seq_len"], fingerprint["top_k"], VALUE_DTYPES[fingerprint["dtype"]]
    specs: dict[str, TensorSpec] = {
        "sample_ids": ("I64", (num_rows,)),
        "input_ids": ("I32", (num_rows, seq_len)),
        "topk_values": (value_dtype, (num_rows, seq_len, top_k)),
        "topk_indices": (INDEX_DTYPES[vocab_index_dtype(fingerprint["vocab_size"])], (num_rows, seq_len, top_k)),
    }
    for temperature in fingerprint["temperatures"]:
        specs[tail_name("tail_mass", temperature)] = ("F32", (num_rows, seq_len))
    for spec in cached_maps(fingerprint):
        specs.update(map_tensors(fingerprint, spec, num_rows))
    for layer in fingerprint["cached_layers"]:
        for squeeze in (kind for kind in fingerprint["attn_targets"] if kind in SQUEEZES):
            for heads in fingerprint["student_head_counts"]:
                specs[alpha_name(layer, heads, squeeze)] = ("F32", (num_rows, fingerprint["teacher_num_heads"]))
    return specs


@cache
def _triangle_indices(seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.tril_indices(seq_len, seq_len)
    return rows, cols


def triangle_size(seq_len: int) -> int:
    """Entries of a causal map's lower triangle: T(T+1)/2."""
    return seq_len * (seq_len + 1) // 2


def pack_triangle(maps: torch.Tensor) -> torch.Tensor:
    """Keep the causal lower triangle, row-major.

    maps: [..., T, T] → [..., T(T+1)/2]. The upper triangle of a causal map is exactly 0, so nothing is lost.
    """
    rows, cols = _triangle_indices(maps.shape[-1])
    return maps[..., rows.to(maps.device), cols.to(maps.device)]


def unpack_triangle(packed: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of `pack_triangle`: [..., T(T+1)/2] → [..., T, T] with exact zeros above the diagonal."""
    if packed.shape[-1] != triangle_size(seq_len):
        raise ValueError(f"packed attention has {packed.shape[-1]} entries per map, expected T(T+1)/2 for T={seq_len}")
    rows, cols = _triangle_indices(seq_len)
    maps = packed.new_zeros(*packed.shape[:-1], seq_len, seq_len)
    maps[..., rows.to(packed.device), cols.to(packed.device)] = packed
    return maps


def topk_rows(maps: torch.Tensor, m: int, temperatures: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, ...]:
    """The `topk` encoding of maps [..., T, T]: the m largest entries of every row and, for every τ, the row's tail
    sum R_τ = Σ_{not kept} t^{1/τ} (τ = 1: the mass outside the top m).

    Returns (`values` [..., T, m] fp32 probabilities, descending; `indices` [..., T, m] int64; `tails`
    [..., T, len(temperatures)] fp32), the tails summed over the complement itself, so they are exactly 0 when the
    top m hold every non-zero key. A query row shorter than m picks some causal zeros: they carry exactly 0 mass.
    """
    num_keys = maps.shape[-1]
    if not 1 <= m <= num_keys:
        raise ValueError(f"m={m}: expected 1 <= m <= number of keys {num_keys}")
    maps = maps.float()
    values, indices = maps.topk(m, dim=-1)
    rest = maps.scatter(-1, indices, 0.0)
    tails = torch.stack([(rest if tau == 1.0 else rest.pow(1 / tau)).sum(-1) for tau in temperatures], dim=-1)
    return values, indices, tails


def encode_maps(
    name: str,
    maps: torch.Tensor,
    *,
    encoding: str,
    attn_top_m: int,
    dtype: torch.dtype,
    temperatures: tuple[float, ...],
) -> dict[str, torch.Tensor]:
    """The shard tensors of target map `name` from maps [B, H, T, T] (probabilities), in their on-disk dtypes."""
    if encoding == "dense":
        return {name: pack_triangle(maps).to(dtype)}
    values, indices, tails = topk_rows(maps, attn_top_m, temperatures)
    encoded = {f"{name}.values": values.to(dtype), f"{name}.indices": indices.to(index_dtype(maps.shape[-1]))}
    for position, temperature in enumerate(temperatures):
        encoded[tail_name(f"{name}.tail", temperature)] = tails[..., position].contiguous()
    return encoded


def shard_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Serialise a shard deterministically.

    safetensors keeps its metadata in a hash map, so the same metadata comes out in a different key order from one
    process to the next; shards must be byte-identical across runs and world sizes (resume and multi-rank caching are
    checked that way). The tensors are serialised by safetensors itself (sorted, aligned); the header is then
    rewritten with its keys sorted and every metadata value a string.
    """
    raw = save({name: tensor.contiguous() for name, tensor in tensors.items()})
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header["__metadata__"] = {key: str(value) for key, value in metadata.items()}
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_len :]


def read_header(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and the metadata of a safetensors file, read from its header alone."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        raw = handle.read(header_len)
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupt safetensors header ({error})") from error
    metadata = header.pop("__metadata__", {})
    return header, metadata


def declared_file_size(path: str) -> int:
    """The byte size a safetensors file must have according to its own header (detects truncation cheaply)."""
    header, _ = read_header(path)
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    return 8 + header_len + data_end


class TargetRequest(NamedTuple):
    """The targets a run reads from each shard: maps by name, each with the temperature of the tail sums it needs
    (top-m encoding), and the KD temperature (the logits' tail sums)."""

    maps: tuple[tuple[str, float], ...]
    kd_temperature: float = 1.0


def requested_tensors(fingerprint: dict[str, Any], request: TargetRequest, num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of the tensors `request` reads from a shard of `num_rows` samples (a subset of
    `expected_tensors`); a name the cache does not hold raises a KeyError naming it."""
    every = expected_tensors(fingerprint, num_rows)
    names = [*SAMPLE_TENSORS, tail_name("tail_mass", request.kd_temperature)]
    for name, temperature in request.maps:
        if fingerprint["encoding"] == "dense":
            names.append(name)
        else:
            names += [f"{name}.values", f"{name}.indices", tail_name(f"{name}.tail", temperature)]
    missing = [name for name in names if name not in every]
    if missing:
        raise KeyError(missing[0])
    return {name: every[name] for name in names}
