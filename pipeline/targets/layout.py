"""The on-disk layout of one cache shard: tensor names, the packed causal triangle, and a deterministic writer.

A shard is a safetensors file holding `shard_size` samples:

- `sample_ids` int64 [N], `input_ids` int32 [N, T]
- `topk_values` f16/bf16 [N, T, k] (teacher log-probs), `topk_indices` uint16 (int32 when the vocabulary exceeds
  65536) [N, T, k], `tail_mass` f32 [N, T]
- per cached teacher layer L and student head count H:
  - `dense`: `attn.L<L>.H<H>` f16/bf16 [N, H, T(T+1)/2], the causal lower triangle row-major
  - `topk`: `attn.L<L>.H<H>.values` f16/bf16 [N, H, T, m] (probabilities), `attn.L<L>.H<H>.indices` int16 (int32
    when T > 32767) [N, H, T, m], `attn.L<L>.H<H>.tail` f32 [N, H, T]
  - `alpha.L<L>.H<H>` f32 [N, H_t]: the squeeze weights of every teacher head (for the α statistics)

The safetensors metadata holds the layout version and the settings the shard was written with.
"""

from __future__ import annotations

import json
import struct
from functools import cache
from typing import Any

import torch
from safetensors.torch import save

LAYOUT_VERSION = 1
INT16_MAX_SEQ_LEN = 32767
UINT16_VOCAB_LIMIT = 65536


def shard_file_name(index: int) -> str:
    """`shard-00000.safetensors` …"""
    return f"shard-{index:05d}.safetensors"


def attn_key(layer: int, heads: int) -> str:
    """Name of the attention target of teacher layer `layer` squeezed to `heads` student heads."""
    return f"attn.L{layer}.H{heads}"


def alpha_key(layer: int, heads: int) -> str:
    """Name of the per-sample squeeze weights behind `attn_key(layer, heads)`."""
    return f"alpha.L{layer}.H{heads}"


def index_dtype(seq_len: int) -> torch.dtype:
    """Key indices fit int16 up to T = 32767, halving their bytes."""
    return torch.int16 if seq_len <= INT16_MAX_SEQ_LEN else torch.int32


def vocab_index_dtype(vocab_size: int) -> torch.dtype:
    """Token ids of vocabularies up to 65536 (SmolLM2, GPT-2, LLaMA-2) fit uint16: 2 bytes per kept logit, not 4."""
    return torch.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else torch.int32


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
