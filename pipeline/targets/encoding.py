"""How a target map is stored: the encodings every target kind can use (`cache.encoding`), and the tensor specs the
layout, the writer, the reader and `cache verify` share.

- `dense`: `<name>` f16/bf16 [N, H, T(T+1)/2], the causal lower triangle row-major. Exact; bytes grow with T.
- `topk`: `<name>.values` f16/bf16 [N, H, T, m] (probabilities, descending), `<name>.indices` int16 (int32 when
  T > 32767) [N, H, T, m], and per cached τ the row tail sums R_τ = Σ_{not kept} t^{1/τ} f32 [N, H, T]:
  `<name>.tail` (τ = 1: the mass outside the top m), `<name>.tail.tau<τ>`. Bytes per token do not grow with T.

An encoding turns maps [B, H, T, T] into stored tensors (`encode`), names the tensors a reader needs at a loss
temperature (`reads`), and turns those back into the loss's target (`target`: `DenseTarget`, `SparseTarget`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cache
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pipeline.ops.map_losses import DenseTarget, MapTarget, SparseTarget
from pipeline.targets.kinds.base import MapSpec

INT16_MAX_SEQ_LEN = 32767
VALUE_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
"""On-disk dtype setting → safetensors dtype of probabilities and log-probabilities."""
INDEX_DTYPES = {torch.int16: "I16", torch.uint16: "U16", torch.int32: "I32"}


class TensorSpec(NamedTuple):
    """A stored tensor: safetensors dtype, shape (None leaves an extent open), what it holds (`role`, for the value
    checks) and the tensor its sum check reads beside it (`companion`: the τ = 1 tail of top-k/top-m values)."""

    dtype: str
    shape: tuple[int | None, ...]
    role: str
    companion: str | None = None
    layer: int | None = None
    """The teacher layer of a target tensor (named in error messages)."""


def tail_name(base: str, temperature: float) -> str:
    """Name of the tail sums R_τ of `base` (`tail_mass`, or `<map>.tail`): the base itself at τ = 1."""
    return base if temperature == 1.0 else f"{base}.tau{temperature:g}"


def index_dtype(seq_len: int) -> torch.dtype:
    """Key indices fit int16 up to T = 32767, halving their bytes."""
    return torch.int16 if seq_len <= INT16_MAX_SEQ_LEN else torch.int32


@cache
def _triangle_indices(seq_len: int) -> tuple[Tensor, Tensor]:
    rows, cols = torch.tril_indices(seq_len, seq_len)
    return rows, cols


def triangle_size(seq_len: int) -> int:
    """Entries of a causal map's lower triangle: T(T+1)/2."""
    return seq_len * (seq_len + 1) // 2


def pack_triangle(maps: Tensor) -> Tensor:
    """Keep the causal lower triangle, row-major.

    maps: [..., T, T] → [..., T(T+1)/2]. The upper triangle of a causal map is exactly 0, so nothing is lost.
    """
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


def topk_rows(maps: Tensor, m: int, temperatures: tuple[float, ...] = (1.0,)) -> tuple[Tensor, ...]:
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


class MapEncoding(ABC):
    """One way to store target maps."""

    name: str

    @abstractmethod
    def tensors(self, spec: MapSpec, fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
        """Name → spec of the stored tensors of map `spec` in a shard of `num_rows` samples."""

    @abstractmethod
    def reads(self, name: str, temperature: float) -> list[str]:
        """The stored tensors of map `name` a loss at `temperature` reads."""

    @abstractmethod
    def encode(
        self, name: str, maps: Tensor, *, attn_top_m: int, dtype: torch.dtype, temperatures: tuple[float, ...]
    ) -> dict[str, Tensor]:
        """The stored tensors of map `name` from maps [B, H, T, T] (probabilities), in their on-disk dtypes."""

    @abstractmethod
    def target(self, raw: dict[str, Tensor], name: str, temperature: float) -> MapTarget:
        """The loss's target of map `name` from the tensors `reads` named (float32)."""


class DenseEncoding(MapEncoding):
    name = "dense"

    def tensors(self, spec: MapSpec, fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
        value_dtype = VALUE_DTYPES[fingerprint["dtype"]]
        shape = (num_rows, spec.heads, triangle_size(fingerprint["seq_len"]))
        return {spec.name: TensorSpec(value_dtype, shape, "map", layer=spec.layer)}

    def reads(self, name: str, temperature: float) -> list[str]:
        return [name]

    def encode(
        self, name: str, maps: Tensor, *, attn_top_m: int, dtype: torch.dtype, temperatures: tuple[float, ...]
    ) -> dict[str, Tensor]:
        return {name: pack_triangle(maps).to(dtype)}

    def target(self, raw: dict[str, Tensor], name: str, temperature: float) -> MapTarget:
        return DenseTarget(raw[name].float())


class TopKEncoding(MapEncoding):
    name = "topk"

    def tensors(self, spec: MapSpec, fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
        seq_len, value_dtype = fingerprint["seq_len"], VALUE_DTYPES[fingerprint["dtype"]]
        rows = (num_rows, spec.heads, seq_len, fingerprint["attn_top_m"])
        tail = f"{spec.name}.tail"
        tensors = {
            f"{spec.name}.values": TensorSpec(value_dtype, rows, "map_values", tail, spec.layer),
            f"{spec.name}.indices": TensorSpec(
                INDEX_DTYPES[index_dtype(seq_len)], rows, "map_indices", None, spec.layer
            ),
        }
        for temperature in fingerprint["temperatures"]:
            tensors[tail_name(tail, temperature)] = TensorSpec("F32", rows[:-1], "tail", None, spec.layer)
        return tensors

    def reads(self, name: str, temperature: float) -> list[str]:
        return [f"{name}.values", f"{name}.indices", tail_name(f"{name}.tail", temperature)]

    def encode(
        self, name: str, maps: Tensor, *, attn_top_m: int, dtype: torch.dtype, temperatures: tuple[float, ...]
    ) -> dict[str, Tensor]:
        values, indices, tails = topk_rows(maps, attn_top_m, temperatures)
        encoded = {f"{name}.values": values.to(dtype), f"{name}.indices": indices.to(index_dtype(maps.shape[-1]))}
        for position, temperature in enumerate(temperatures):
            encoded[tail_name(f"{name}.tail", temperature)] = tails[..., position].contiguous()
        return encoded

    def target(self, raw: dict[str, Tensor], name: str, temperature: float) -> MapTarget:
        return SparseTarget(
            raw[f"{name}.values"].float(),
            raw[f"{name}.indices"].long(),
            raw[tail_name(f"{name}.tail", temperature)].float(),
        )


ENCODINGS: dict[str, MapEncoding] = {encoding.name: encoding for encoding in (DenseEncoding(), TopKEncoding())}
"""`cache.encoding` → the encoding."""
