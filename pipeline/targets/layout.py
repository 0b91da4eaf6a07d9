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
import struct
from typing import Any

import torch
from safetensors.torch import save

from pipeline.targets import kinds
from pipeline.targets.encoding import ENCODINGS, INDEX_DTYPES, TensorSpec
from pipeline.targets.kinds.base import MapSpec, TargetSettings
from pipeline.targets.logits import sample_tensors
from pipeline.targets.needs import TargetNeeds

LAYOUT_VERSION = 2
STORED_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    **INDEX_DTYPES,
}
"""Every torch dtype a shard stores → its safetensors name."""


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
    return {name: every[name] for name in needs.tensor_names(fingerprint["encoding"])}


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
