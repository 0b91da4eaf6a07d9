"""The on-disk layout of one cache shard — the one schema the writer, the reader and `cache verify` share — and a
deterministic serialiser.

A shard is a safetensors file holding `shard_size` samples (T tokens each): the ids, tokens and sparse logits
(`pipeline.targets.logits`), then for every cached teacher layer, every target kind of `attn_targets` and every
variant of it (`pipeline.targets.kinds`), its maps in the cache's encoding (`pipeline.targets.encoding`) and the
kind's per-sample extras (SHD's α). The safetensors metadata holds the layout version and the settings the shard was
written with. Every tensor's spec carries its role, which the value checks (`pipeline.targets.checks`) go by.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from safetensors.torch import save

from pipeline.targets import kinds
from pipeline.targets.codecs import bits_for, packed_bytes
from pipeline.targets.encoding import ENCODINGS, TensorSpec
from pipeline.targets.kinds.base import MapSpec, TargetSettings
from pipeline.targets.logits import LOSS_MASK_TENSOR, sample_tensors, trains_responses
from pipeline.targets.needs import TargetNeeds
from pipeline.targets.rows import ROWS_TENSOR, stored_row_count, stores_rows

LAYOUT_VERSION = 3
STORED_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}
"""Every torch dtype a shard stores → its safetensors name."""


PACKED_LIMITS = {"vocab_indices": "vocab_size", "map_indices": "seq_len", "rows": "seq_len"}
"""Role of a bit-packed integer tensor → the fingerprint field its values stay below."""


def packed_limit(role: str, fingerprint: dict[str, Any]) -> int | None:
    """The bound of a packed tensor's integers (token ids < vocabulary, key indices and rows < T), None for a tensor
    that is not packed."""
    field = PACKED_LIMITS.get(role)
    return None if field is None else fingerprint[field]


def shard_file_name(index: int) -> str:
    """`shard-00000.safetensors` …"""
    return f"shard-{index:05d}.safetensors"


def fingerprint_settings(fingerprint: dict[str, Any]) -> TargetSettings:
    """The target settings a fingerprint describes (dtype: the on-disk one)."""
    return kinds.settings_from_fingerprint(fingerprint, getattr(torch, fingerprint["dtype"]))


def cached_maps(fingerprint: dict[str, Any]) -> list[MapSpec]:
    """Every target map a cache with this fingerprint holds, in a fixed order (layer, kind, variant)."""
    settings = fingerprint_settings(fingerprint)
    specs = []
    for layer in fingerprint["cached_layers"]:
        for name in fingerprint["attn_targets"]:
            kind = kinds.get(name)
            for variant in kind.variants(settings):
                specs += kind.maps(layer, variant)
    return specs


def expected_tensors(fingerprint: dict[str, Any], num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of every tensor a shard of `num_rows` samples must hold (and nothing else)."""
    specs = sample_tensors(fingerprint, num_rows)
    seq_len, fraction = fingerprint["seq_len"], fingerprint["attn_row_fraction"]
    if stores_rows(fraction, fingerprint["attn_targets"]):
        count = stored_row_count(seq_len, fraction)
        rows = packed_bytes(count, bits_for(seq_len))
        drawn_among = (LOSS_MASK_TENSOR,) if trains_responses(fingerprint) else ()
        specs[ROWS_TENSOR] = TensorSpec("U8", (num_rows, rows), "rows", drawn_among, unpacked=(count,))
    encoding = ENCODINGS[fingerprint["encoding"]]
    for spec in cached_maps(fingerprint):
        specs.update(encoding.tensors(spec, fingerprint, num_rows))
    settings = fingerprint_settings(fingerprint)
    for layer in fingerprint["cached_layers"]:
        for name in fingerprint["attn_targets"]:
            kind = kinds.get(name)
            for variant in kind.variants(settings):
                for extra in kind.extras(layer, variant, fingerprint["teacher_num_heads"]):
                    specs[extra.name] = TensorSpec("F32", (num_rows, extra.width), extra.role, layer=extra.layer)
    return specs


def requested_tensors(fingerprint: dict[str, Any], needs: TargetNeeds, num_rows: int) -> dict[str, TensorSpec]:
    """Name → spec of the tensors a run with `needs` reads from a shard of `num_rows` samples (a subset of
    `expected_tensors`; `needs.check_cache` has made sure the cache holds them)."""
    every = expected_tensors(fingerprint, num_rows)
    return {name: every[name] for name in needs.tensor_names(fingerprint)}


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


MAX_HEADER_BYTES = 100 << 20
"""The longest safetensors header read (safetensors' own limit): a shard's header is a few KB."""


def _entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with one tensor entry of a safetensors header (None: a dict with a dtype, a shape of sizes ≥ 0
    and data offsets begin ≤ end), so that no reader of the header meets a KeyError on a crafted file."""
    if not isinstance(entry, dict):
        return f"entry {name!r} is {type(entry).__name__}, expected an object"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(entry.get("dtype"), str):
        return f"entry {name!r} has dtype {entry.get('dtype')!r}, expected a string"
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        return f"entry {name!r} has shape {shape!r}, expected a list of sizes ≥ 0"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(offset, int) for offset in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"entry {name!r} has data_offsets {offsets!r}, expected [begin, end] with 0 ≤ begin ≤ end"
    return None


def _read_header(path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(header length, tensor entries, metadata) of a safetensors file. The length is checked against the file's
    size before anything is read: a forged length (a file received from elsewhere) must not make us allocate it."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(
                f"{path}: corrupt or forged safetensors file: its header length {header_len} exceeds the "
                f"{'file' if header_len > size - 8 else 'limit'} ({min(size - 8, MAX_HEADER_BYTES)} bytes after the "
                "length)"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: corrupt safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ is {type(metadata).__name__})")
    for name, entry in header.items():
        problem = _entry_problem(name, entry)
        if problem is not None:
            raise ValueError(f"{path}: corrupt safetensors header ({problem})")
    return header_len, header, metadata


def read_header(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and the metadata of a safetensors file, read from its header alone (checked: see
    `_read_header`); a ValueError names the file and what is wrong."""
    _, header, metadata = _read_header(path)
    return header, metadata


def declared_file_size(path: str) -> int:
    """The byte size a safetensors file must have according to its own header (detects truncation cheaply)."""
    header_len, header, _ = _read_header(path)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    return 8 + header_len + data_end
