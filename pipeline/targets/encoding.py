"""How a target map is stored: the encodings every target kind can use (`cache.encoding`), written block by block
of query rows, and the tensor specs the layout, the writer, the reader and `cache verify` share.

- `dense`: `<name>` f16/bf16 [N, H, T(T+1)/2], the causal lower triangle row-major: exact, every row, bytes growing
  with T.
- `topk`: for every stored row (all rows, or the `cache.attn_row_fraction` sample of `pipeline.targets.rows`) its m
  largest probabilities and their key indices, plus per cached τ the row's tail sum R_τ = Σ_{not kept} t^{1/τ}
  (`<name>.tail` at τ = 1: the mass outside the top m; `<name>.tail.tau<τ>`), f32 [N, H, R]. Values: `<name>.values`
  f16/bf16 [N, H, R, m] (`cache.attn_value_bits: 16`), or 8-bit codes of their log (`<name>.codes` u8
  [N, H, R, m] with `<name>.offset` and `<name>.step` f16 [N, H, R], `pipeline.targets.codecs`). Key indices:
  `<name>.indices`, ⌈log2 T⌉ bits each, packed per sample u8 [N, ⌈H·R·m·bits/8⌉]. Bytes per token do not grow with
  T.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pipeline.ops.map_losses import DenseTarget, MapTarget, SparseTarget
from pipeline.ops.topk_maps import topk_rows
from pipeline.targets.codecs import (
    bits_for,
    dequantize_log_probs,
    pack_bits,
    packed_bytes,
    quantize_log_probs,
    unpack_bits,
)
from pipeline.targets.kinds.base import MapSpec
from pipeline.targets.rows import stored_row_count

VALUE_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
"""On-disk dtype setting → safetensors dtype of 16-bit probabilities and log-probabilities."""


class TensorSpec(NamedTuple):
    """A stored tensor: safetensors dtype, shape (None leaves an extent open), what it holds (`role`, for the value
    checks) and the tensors its checks read beside it."""

    dtype: str
    shape: tuple[int | None, ...]
    role: str
    companions: tuple[str, ...] = ()
    """What a check of this tensor reads beside it: the τ = 1 tail of top-k/top-m values (and the offset and step of
    8-bit codes)."""
    layer: int | None = None
    """The teacher layer of a target tensor (named in error messages)."""
    unpacked: tuple[int, ...] = ()
    """Per-sample shape of the integers a packed tensor (u8 bit stream, `codecs.pack_bits`) holds."""


@dataclass(frozen=True)
class EncodeOptions:
    """What the writer of a map needs beyond its blocks."""

    attn_top_m: int
    dtype: torch.dtype
    """The 16-bit value dtype."""
    temperatures: tuple[float, ...]
    value_bits: int
    seq_len: int


def tail_name(base: str, temperature: float) -> str:
    """Name of the tail sums R_τ of `base` (`tail_mass`, or `<map>.tail`): the base itself at τ = 1."""
    return base if temperature == 1.0 else f"{base}.tau{temperature:g}"


@cache
def _triangle_indices(seq_len: int) -> tuple[Tensor, Tensor]:
    rows, cols = torch.tril_indices(seq_len, seq_len)
    return rows, cols


def triangle_size(seq_len: int) -> int:
    """Entries of a causal map's lower triangle: T(T+1)/2."""
    return seq_len * (seq_len + 1) // 2


def pack_triangle(maps: Tensor) -> Tensor:
    """Keep the causal lower triangle, row-major: [..., T, T] → [..., T(T+1)/2] (the upper triangle is exactly 0)."""
    rows, cols = _triangle_indices(maps.shape[-1])
    return maps[..., rows.to(maps.device), cols.to(maps.device)]


def unpack_triangle(packed: Tensor, seq_len: int) -> Tensor:
    """Inverse of `pack_triangle`: [..., T(T+1)/2] → [..., T, T] with exact zeros above the diagonal."""
    if packed.shape[-1] != triangle_size(seq_len):
        raise ValueError(f"packed attention has {packed.shape[-1]} entries per map, expected T(T+1)/2 for T={seq_len}")
    rows, cols = _triangle_indices(seq_len)
    maps = packed.new_zeros(*packed.shape[:-1], seq_len, seq_len)
    maps[..., rows.to(packed.device), cols.to(packed.device)] = packed
    return maps


class MapWriter(ABC):
    """Collects one map's row blocks (in row order) and gives its stored tensors."""

    @abstractmethod
    def add(self, block: Tensor, positions: Tensor) -> None:
        """Probabilities [B, H, rows, K] of the query rows `positions` [B, rows] over keys 0..K−1."""

    def add_top(self, values: Tensor, indices: Tensor, tails: Tensor) -> None:
        """The next rows already in `topk_rows`' form (values, indices [B, H, rows, m], tails [B, H, rows, τs]): only
        the writers of an encoding with `top_rows`."""
        raise NotImplementedError(f"{type(self).__name__} takes probabilities, not top-m rows")

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The map's stored tensors, in their on-disk dtypes."""


class MapEncoding(ABC):
    """One way to store target maps."""

    name: str
    top_rows: bool = False
    """Its writers store `topk_rows`' form and take it whole (`MapWriter.add_top`), so the stage may form it without
    the block of probabilities (`ops.topk_maps.topk_maps`)."""

    @abstractmethod
    def tensors(self, spec: MapSpec, fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
        """Name → spec of the stored tensors of map `spec` in a shard of `num_rows` samples."""

    @abstractmethod
    def reads(self, name: str, temperature: float, fingerprint: dict[str, Any]) -> list[str]:
        """The stored tensors of map `name` a loss at `temperature` reads from a cache with `fingerprint`."""

    @abstractmethod
    def writer(self, name: str, options: EncodeOptions) -> MapWriter:
        """A writer of map `name`'s tensors."""

    @abstractmethod
    def target(
        self, raw: dict[str, Tensor], name: str, temperature: float, fingerprint: dict[str, Any], rows: Tensor | None
    ) -> MapTarget:
        """The loss's target of map `name` from the tensors `reads` named (float32); `rows` [B, R]: the batch's stored
        query rows (None: every row)."""


class _DenseWriter(MapWriter):
    def __init__(self, name: str, options: EncodeOptions) -> None:
        self.name, self.options, self.parts = name, options, []

    def add(self, block: Tensor, positions: Tensor) -> None:
        first, keys = int(positions[0, 0]), block.shape[-1]
        rows = torch.arange(first, first + block.shape[2], device=block.device)
        visible = torch.arange(keys, device=block.device) <= rows[:, None]
        self.parts.append(block[..., visible].to(self.options.dtype))

    def tensors(self) -> dict[str, Tensor]:
        return {self.name: torch.cat(self.parts, dim=-1)}


class DenseEncoding(MapEncoding):
    name = "dense"

    def tensors(self, spec: MapSpec, fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
        value_dtype = VALUE_DTYPES[fingerprint["dtype"]]
        shape = (num_rows, spec.heads, triangle_size(fingerprint["seq_len"]))
        return {spec.name: TensorSpec(value_dtype, shape, "map", layer=spec.layer)}

    def reads(self, name: str, temperature: float, fingerprint: dict[str, Any]) -> list[str]:
        return [name]

    def writer(self, name: str, options: EncodeOptions) -> MapWriter:
        return _DenseWriter(name, options)

    def target(
        self, raw: dict[str, Tensor], name: str, temperature: float, fingerprint: dict[str, Any], rows: Tensor | None
    ) -> MapTarget:
        return DenseTarget(raw[name].float())


class _TopKWriter(MapWriter):
    def __init__(self, name: str, options: EncodeOptions) -> None:
        self.name, self.options = name, options
        self.values: list[Tensor] = []
        self.indices: list[Tensor] = []
        self.tails: list[Tensor] = []

    def add(self, block: Tensor, positions: Tensor) -> None:
        self.add_top(*topk_rows(block, self.options.attn_top_m, self.options.temperatures))

    def add_top(self, values: Tensor, indices: Tensor, tails: Tensor) -> None:
        self.values.append(values)
        self.indices.append(indices)
        self.tails.append(tails)

    def tensors(self) -> dict[str, Tensor]:
        options, name = self.options, self.name
        values, indices, tails = (torch.cat(parts, dim=2) for parts in (self.values, self.indices, self.tails))
        if options.value_bits == 8:
            codes, offset, step = quantize_log_probs(values)
            encoded = {f"{name}.codes": codes, f"{name}.offset": offset, f"{name}.step": step}
        else:
            encoded = {f"{name}.values": values.to(options.dtype)}
        encoded[f"{name}.indices"] = pack_bits(indices.flatten(1), bits_for(options.seq_len))
        for position, temperature in enumerate(options.temperatures):
            encoded[tail_name(f"{name}.tail", temperature)] = tails[..., position].contiguous()
        return encoded


class TopKEncoding(MapEncoding):
    name = "topk"
    top_rows = True

    def tensors(self, spec: MapSpec, fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
        seq_len, top_m = fingerprint["seq_len"], fingerprint["attn_top_m"]
        rows = (num_rows, spec.heads, stored_row_count(seq_len, fingerprint["attn_row_fraction"]), top_m)
        tail, layer = f"{spec.name}.tail", spec.layer
        if fingerprint["attn_value_bits"] == 8:
            offset, step = f"{spec.name}.offset", f"{spec.name}.step"
            tensors = {
                f"{spec.name}.codes": TensorSpec("U8", rows, "map_codes", (tail, offset, step), layer),
                offset: TensorSpec("F16", rows[:-1], "code_offset", (), layer),
                step: TensorSpec("F16", rows[:-1], "code_step", (), layer),
            }
        else:
            value_dtype = VALUE_DTYPES[fingerprint["dtype"]]
            tensors = {f"{spec.name}.values": TensorSpec(value_dtype, rows, "map_values", (tail,), layer)}
        count = spec.heads * rows[2] * top_m
        packed = (num_rows, packed_bytes(count, bits_for(seq_len)))
        tensors[f"{spec.name}.indices"] = TensorSpec("U8", packed, "map_indices", (), layer, rows[1:])
        for temperature in fingerprint["temperatures"]:
            tensors[tail_name(tail, temperature)] = TensorSpec("F32", rows[:-1], "tail", (), layer)
        return tensors

    def reads(self, name: str, temperature: float, fingerprint: dict[str, Any]) -> list[str]:
        values = [f"{name}.codes", f"{name}.offset", f"{name}.step"] if fingerprint["attn_value_bits"] == 8 else []
        return [*(values or [f"{name}.values"]), f"{name}.indices", tail_name(f"{name}.tail", temperature)]

    def writer(self, name: str, options: EncodeOptions) -> MapWriter:
        return _TopKWriter(name, options)

    def target(
        self, raw: dict[str, Tensor], name: str, temperature: float, fingerprint: dict[str, Any], rows: Tensor | None
    ) -> MapTarget:
        tail = raw[tail_name(f"{name}.tail", temperature)].float()
        shape = (*tail.shape, fingerprint["attn_top_m"])
        if f"{name}.codes" in raw:
            values = dequantize_log_probs(raw[f"{name}.codes"], raw[f"{name}.offset"], raw[f"{name}.step"])
        else:
            values = raw[f"{name}.values"].float()
        indices = unpack_indices(raw[f"{name}.indices"], fingerprint["seq_len"], shape)
        return SparseTarget(values, indices, tail, rows)


def unpack_indices(packed: Tensor, limit: int, shape: tuple[int, ...]) -> Tensor:
    """Packed key or token indices u8 [N, bytes] → int64 `shape` ([N, …]), each below `limit`."""
    count = 1
    for extent in shape[1:]:
        count *= extent
    return unpack_bits(packed, bits_for(limit), count).reshape(shape)


ENCODINGS: dict[str, MapEncoding] = {encoding.name: encoding for encoding in (DenseEncoding(), TopKEncoding())}
"""`cache.encoding` → the encoding."""
